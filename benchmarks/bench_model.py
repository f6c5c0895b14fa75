"""pytest-benchmark suite for model: gptfast.bench's cases and checks (see benchmarks/conftest.py)."""

OP = "model"


def test_model(bench_case, run_case):
    run_case(bench_case)
