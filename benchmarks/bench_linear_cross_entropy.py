"""pytest-benchmark suite for linear_cross_entropy: gptfast.bench's cases (see benchmarks/conftest.py)."""

OP = "linear_cross_entropy"


def test_linear_cross_entropy(bench_case, run_case):
    run_case(bench_case)
