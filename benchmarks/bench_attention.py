"""pytest-benchmark suite for attention: gptfast.bench's cases and checks (see benchmarks/conftest.py)."""

OP = "attention"


def test_attention(bench_case, run_case):
    run_case(bench_case)
