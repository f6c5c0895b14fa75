"""pytest-benchmark suites over gptfast.bench's machinery: `pytest benchmarks/ --benchmark-json=out.json`.

Each bench_<op>.py is one suite; its cases are (phase, shape, peer) from the same suite `gptfast bench` runs,
with the same check against the reference (a FAIL fails the test, after its timing is recorded). Options:
--bench-size tiny|quick|full, --bench-device cpu|cuda, --bench-dtype fp32|bf16|fp16.
`make test` runs tests/ only (pyproject's testpaths), so these run when asked for.
"""

import re

import pytest
import torch

from gptfast.bench import ceilings, runner
from gptfast.bench.core import Settings, Skip, check, first_line
from gptfast.bench.suite import select_peers
from gptfast.bench.timing import synchronize, time_fn


def pytest_addoption(parser):
    group = parser.getgroup("gptfast-bench")
    group.addoption("--bench-size", choices=runner.MODES, default="quick", help="gptfast.bench size mode")
    group.addoption(
        "--bench-device", choices=("cpu", "cuda"), default=None, help="default: cuda when available"
    )
    group.addoption(
        "--bench-dtype", choices=sorted(runner.DTYPES), default=None, help="default: bf16 cuda, fp32 cpu"
    )


def pytest_collect_file(file_path, parent):
    # bench_*.py are not test_*.py; collect them here so that `pytest benchmarks/` finds them. A file named on
    # the command line is collected by pytest itself.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _settings(config) -> Settings:
    device = torch.device(config.getoption("--bench-device") or runner.default_device())
    dtype_name = config.getoption("--bench-dtype")
    dtype = runner.DTYPES[dtype_name] if dtype_name else runner.default_dtype(device)
    mode = config.getoption("--bench-size")
    return Settings(device, dtype, mode, runner.BUDGETS[(mode, device.type)])


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    settings = _settings(metafunc.config)
    suite = runner.suite_for(metafunc.module.OP)
    if suite.unavailable():
        metafunc.parametrize(
            "bench_case", [pytest.param(None, marks=pytest.mark.skip(reason=suite.unavailable()))]
        )
        return
    suite.setup(settings)
    peers, _ = select_peers(suite, settings)
    cases, ids = [], []
    for shape in suite.shapes(settings.device, settings.mode):
        for peer in peers:
            for phase in suite.phases:
                cases.append((suite, shape, peer, phase))
                ids.append(re.sub(r"[^\w.+:\[\]-]+", "_", f"{phase}-{suite.label(shape)}-{peer.name}"))
    metafunc.parametrize("bench_case", cases, ids=ids)


@pytest.fixture(scope="session")
def bench_settings(request) -> Settings:
    return _settings(request.config)


@pytest.fixture(scope="session")
def bench_ceilings(bench_settings) -> dict:
    return ceilings.measure(bench_settings.device, bench_settings.dtype, bench_settings.mode).as_dict()


class _ShapeCache:
    """Inputs and the reference for the last shape: cases of one shape run one after another."""

    key = None
    inputs = expected = None


@pytest.fixture
def run_case(benchmark, bench_settings, bench_ceilings):
    def run(case):
        suite, shape, peer, phase = case
        settings = bench_settings
        key = (suite.name, suite.label(shape))
        if _ShapeCache.key != key:
            _ShapeCache.key, _ShapeCache.inputs, _ShapeCache.expected = key, None, None
            torch.manual_seed(0)
            _ShapeCache.inputs = suite.inputs(shape, settings.dtype, settings.device)
            _ShapeCache.expected = suite.expected(shape, _ShapeCache.inputs)
        try:
            runnable = suite.bind(peer, shape, _ShapeCache.inputs, settings)
            got = runnable.run(phase)
        except Skip as e:
            pytest.skip(str(e))
        except Exception as e:  # a compile failure is a skip, as in the report
            if peer.kind == "compile":
                pytest.skip(f"torch.compile failed: {first_line(e)}")
            raise
        want, select = _ShapeCache.expected
        error, verdict, detail = check(got, want(phase), select) if got is not None else (None, "n/a", "")
        call = runnable.timed(phase)
        timing = time_fn(call, settings.device, settings.budget)
        work = suite.work(shape, settings.dtype, phase)
        rate = suite.rate(work, timing.median)
        ceiling = bench_ceilings["copy_GBps" if suite.ceiling == "copy" else "matmul_TFLOPs"]
        benchmark.extra_info.update(
            {
                "op": suite.name,
                "shape": suite.label(shape),
                "peer": peer.name,
                "phase": phase,
                "median_ms": timing.median,
                "p20_ms": timing.p20,
                "p80_ms": timing.p80,
                "metric": suite.metric,
                "rate": rate,
                "pct_of_ceiling": 100 * rate / ceiling if suite.metric != "tokens/s" else None,
                "check": verdict,
                "max_error": error,
                "check_detail": detail,
            }
        )

        def timed():
            call()
            synchronize(settings.device)

        benchmark.pedantic(
            timed, rounds=max(3, min(len(timing.samples_ms), 20)), iterations=1, warmup_rounds=1
        )
        assert verdict != "FAIL", f"{peer.name} {phase} {suite.label(shape)}: {detail}"

    return run
