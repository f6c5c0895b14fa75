"""pytest-benchmark suite for cross_entropy: gptfast.bench's cases and checks (see benchmarks/conftest.py)."""

OP = "cross_entropy"


def test_cross_entropy(bench_case, run_case):
    run_case(bench_case)
