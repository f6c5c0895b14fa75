"""pytest-benchmark suite for softmax: gptfast.bench's cases and checks (see benchmarks/conftest.py)."""

OP = "softmax"


def test_softmax(bench_case, run_case):
    run_case(bench_case)
