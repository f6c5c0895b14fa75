"""The benchmark harness on tiny sizes: timing, formulas, the correctness column, the written report.

torch.compile peers are excluded here (compiling costs tens of seconds on a 2-core CPU); the dry run of
scripts/gpu_check.sh and `gptfast bench --tiny` run them.
"""

import contextlib
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from gptfast.bench import Budget, Peer, Settings, memory, report, runner, time_fn
from gptfast.bench.attention import SUITE as ATTENTION
from gptfast.bench.cross_entropy import SUITE as CROSS_ENTROPY
from gptfast.bench.linear_cross_entropy import SUITE as LINEAR_CROSS_ENTROPY
from gptfast.bench.model import SUITE as MODEL
from gptfast.bench.model import model_flops
from gptfast.bench.softmax import SUITE as SOFTMAX
from gptfast.bench.suite import run_suite

ROOT = Path(__file__).resolve().parents[1]
TINY = Settings(
    torch.device("cpu"),
    torch.float32,
    "tiny",
    Budget(warmup=1, budget_ms=5, min_reps=3, max_reps=5),
    exclude=("compile",),
)


@contextlib.contextmanager
def one_thread():
    # The machine is shared; one thread keeps a descheduled second thread from stretching a single repeat.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_timings_positive_and_a_4x_larger_copy_takes_longer():
    budget = Budget(warmup=2, budget_ms=100, min_reps=9, max_reps=40)
    # 8 MiB and 32 MiB: well above timer resolution, and the larger one is four times the bytes.
    small_src, big_src = torch.randn(2**21), torch.randn(2**23)
    small_dst, big_dst = torch.empty_like(small_src), torch.empty_like(big_src)
    with one_thread():
        small = time_fn(lambda: small_dst.copy_(small_src), "cpu", budget)
        big = time_fn(lambda: big_dst.copy_(big_src), "cpu", budget)
    assert all(t > 0 for t in small.samples_ms + big.samples_ms)
    assert small.p20 <= small.median <= small.p80
    assert big.median > small.median


def test_timing_quantiles_on_known_samples():
    from gptfast.bench.timing import Timing

    # Sorted 1..5: p20 sits 0.8 of the way from 1 to 2, p80 0.2 of the way from 4 to 5 (numpy's rule).
    timing = Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (timing.median, timing.p20, timing.p80) == pytest.approx((3.0, 1.8, 4.2))


def test_byte_and_flop_formulas_on_a_hand_computed_case():
    # softmax 3 x 5 in fp16 (2 bytes): forward reads and writes 30 bytes each; backward reads y, dy, writes dx
    assert SOFTMAX.work({"M": 3, "N": 5}, torch.float16, "fwd") == 60
    assert SOFTMAX.work({"M": 3, "N": 5}, torch.float16, "fwd+bwd") == 150
    # cross-entropy 3 x 10 bf16: one read of the logits; fwd+bwd reads them twice and writes dlogits.
    assert CROSS_ENTROPY.work({"M": 3, "V": 10}, torch.bfloat16, "fwd") == 60
    assert CROSS_ENTROPY.work({"M": 3, "V": 10}, torch.bfloat16, "fwd+bwd") == 180
    # linear cross-entropy M=4, H=8, V=16: 2*4*8*16 for the logits, three such matmuls with the backward.
    assert LINEAR_CROSS_ENTROPY.work({"M": 4, "H": 8, "V": 16}, torch.float32, "fwd") == 1024
    assert LINEAR_CROSS_ENTROPY.work({"M": 4, "H": 8, "V": 16}, torch.float32, "fwd+bwd") == 3072
    # attention B=1, H=2, L=S=4, D=8: 4*1*2*4*4*8 = 1024 FLOPs, 512 causal, 3.5x that with the backward.
    shape = {"B": 1, "H": 2, "L": 4, "D": 8, "causal": True}
    assert ATTENTION.work({**shape, "causal": False}, torch.float32, "fwd") == 1024
    assert ATTENTION.work(shape, torch.float32, "fwd") == 512
    assert ATTENTION.work(shape, torch.float32, "fwd+bwd") == 1792
    # 1e9 bytes in 1 ms is 1000 GB/s; 2e12 FLOPs in 1 s is 2 TFLOP/s.
    assert SOFTMAX.rate(1e9, 1.0) == pytest.approx(1000.0)
    assert ATTENTION.rate(2e12, 1000.0) == pytest.approx(2.0)


def test_model_flops_on_a_hand_counted_config():
    # vocab 16, n_embd 8, 1 layer, learned positions (excluded): wte 128, ln_1 16, c_attn 8*24+24 = 216,
    # c_proj 72, ln_2 16, c_fc 8*32+32 = 288, mlp c_proj 32*8+8 = 264, ln_f 16 -> N = 1016 (head tied to wte).
    cfg = types.SimpleNamespace(
        vocab_size=16,
        block_size=8,
        n_layer=1,
        n_head=2,
        n_embd=8,
        dropout=0.0,
        bias=True,
        pos_encoding="learned",
    )
    assert model_flops(cfg, batch=2, seq_len=8) == (6 * 1016 + 12 * 1 * 8 * 8) * 2 * 8


def test_peak_memory_counts_a_temporary():
    def make():
        t = torch.ones(2**20)  # 4 MiB, freed before returning
        return t.sum()

    peak = memory.peak_bytes(make, "cpu")
    assert 4 * 2**20 <= peak < 5 * 2**20


class _WrongGradient(torch.autograd.Function):
    """softmax with a correct forward and a backward that is off by 10%: only fwd+bwd may catch it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return 1.1 * y * (dy - (dy * y).sum(-1, keepdim=True))


def test_a_wrong_kernel_is_reported_fail():
    wrong_out = Peer("wrong-output", "gptfast", lambda shape, inp: lambda x: torch.softmax(x, -1) * 1.001)
    wrong_grad = Peer("wrong-gradient", "gptfast", lambda shape, inp: _WrongGradient.apply)
    with one_thread():
        res = run_suite(SOFTMAX, TINY, extra_peers=[wrong_out, wrong_grad])
    check = {(r.peer, r.phase): r.check for r in res.rows}
    assert check[("wrong-output", "fwd")] == check[("wrong-output", "fwd+bwd")] == "FAIL"
    assert check[("wrong-gradient", "fwd")] == "PASS"
    assert check[("wrong-gradient", "fwd+bwd")] == "FAIL"
    assert check[("torch", "fwd+bwd")] == check[("gptfast:reference", "fwd+bwd")] == "PASS"
    text = report.markdown(
        {"meta": _meta(), "ceilings": _ceilings(), "suites": {"softmax": report.suite_dict(res)}}
    )
    assert "**FAIL**" in text and "wrong-gradient" in text


def test_cross_entropy_rows_report_peak_memory_and_pass():
    with one_thread():
        res = run_suite(CROSS_ENTROPY, TINY)
    ok = [r for r in res.rows if r.status == "ok"]
    assert {r.peer for r in ok} >= {"gptfast:reference", "torch"}
    assert all(r.check == "PASS" and r.peak_bytes > 0 and r.timing.median > 0 for r in ok)
    eager = {r.phase: r for r in ok if r.peer == "torch"}
    assert all(eager[r.phase].speedup_eager == 1.0 for r in ok if r.peer == "torch")


def test_an_exhausted_time_budget_skips_whole_shapes():
    # A suite's share ran out before it began: every case is a skipped row that says why, none is timed.
    late = dataclasses.replace(TINY, deadline=time.monotonic() - 1.0)
    res = run_suite(SOFTMAX, late)
    assert res.rows and all(r.status == "skipped" and r.note == "time budget exhausted" for r in res.rows)


def test_model_suite_skips_with_a_note_without_gptfast_model(monkeypatch):
    def missing():
        raise ImportError("No module named 'gptfast.model'")

    monkeypatch.setattr("gptfast.bench.model._model_module", missing)
    res = run_suite(MODEL, TINY)
    assert res.rows == [] and "gptfast.model is not in this install" in res.notes[0]


@pytest.mark.skipif(
    importlib.util.find_spec("gptfast.model") is None, reason="gptfast.model is not in this tree"
)
def test_model_step_rows_check_against_the_reference_gpt():
    with one_thread():
        res = run_suite(MODEL, TINY)
    rows = {r.peer: r for r in res.rows}
    assert rows["gptfast:reference"].check == "PASS", rows["gptfast:reference"].check_detail
    # The torch-ops baseline took the GPT's weights (same loss in fp64), so its check is a real one.
    assert rows["torch eager"].check == "PASS", rows["torch eager"].check_detail
    assert all(
        r.rate > 0 and r.peak_bytes > r.extra["static_bytes"] for r in rows.values() if r.status == "ok"
    )


def test_run_writes_report_results_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    with one_thread():
        results = runner.run(
            "cpu",
            ops=("softmax", "linear_cross_entropy"),
            mode="tiny",
            out=tmp_path,
            progress=False,
            exclude=("compile",),
        )
    text = (tmp_path / "report.md").read_text()
    for heading in (
        "## Ceilings",
        "## Headline",
        "## softmax",
        "## linear_cross_entropy",
        "| shape | backend |",
    ):
        assert heading in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["torch"] == torch.__version__ and data["ceilings"]["copy_GBps"] > 0
    rows = data["suites"]["linear_cross_entropy"]["rows"]
    assert rows and all(len(r["timing"]["samples_ms"]) >= 3 for r in rows if r["status"] == "ok")
    names = {Path(p).name for p in results["plots"]}
    assert {"speedup_softmax.png", "memory_linear_cross_entropy.png"} <= names
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    written, note = report.plots({"suites": {}}, tmp_path)
    assert written == [] and "matplotlib is not importable" in note


def test_cli_main_takes_argv(tmp_path):
    from gptfast.bench import cli

    with one_thread():
        rc = cli.main(
            [
                "--device",
                "cpu",
                "--tiny",
                "--ops",
                "softmax",
                "--exclude",
                "compile",
                "--out",
                str(tmp_path),
                "--no-plots",
                "--no-progress",
            ]
        )
    assert rc == 0 and (tmp_path / "report.md").exists()
    with pytest.raises(SystemExit):
        cli.main(["--ops", "softmax,bogus"])


@pytest.mark.skipif(
    importlib.util.find_spec("pytest_benchmark") is None, reason="pytest-benchmark not installed"
)
def test_pytest_benchmark_suites_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "benchmarks" / "bench_softmax.py"),
        "--bench-size",
        "tiny",
        "-k",
        "torch and not compile",
        f"--benchmark-json={out}",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmarks"] and all(b["extra_info"]["check"] == "PASS" for b in data["benchmarks"])


@pytest.mark.gpu
def test_tiny_run_on_cuda(tmp_path):
    # The GPU path (events, L2 flush, max_memory_allocated) before gpu_check's full run relies on it.
    results = runner.run("cuda", mode="tiny", out=tmp_path, progress=False, exclude=("compile",), plots=False)
    rows = [r for s in results["suites"].values() for r in s["rows"] if r["status"] == "ok"]
    assert rows and all(r["timing"]["median_ms"] > 0 and r["peak_bytes"] is not None for r in rows)
    assert all(r["check"] == "PASS" for r in rows if r["peer"] in ("torch", "gptfast:reference"))


def _meta() -> dict:
    return runner.metadata(torch.device("cpu"), torch.float32, "tiny")


def _ceilings() -> dict:
    from gptfast.bench import ceilings

    return ceilings.measure("cpu", torch.float32, "tiny").as_dict()


@pytest.mark.skipif(
    importlib.util.find_spec("gptfast.model") is None, reason="gptfast.model is not in this tree"
)
def test_model_suite_compiles_a_peer_marked_compiled():
    # The GPU report's "gptfast:auto fused_loss + torch.compile" row, here on the reference backend: its step
    # runs under torch.compile (the only compiled peer: TINY excludes torch's) and is checked like the others.
    name = "gptfast:reference + torch.compile"
    peer = Peer(name, "gptfast", MODEL._gpt(backend="reference"), compiled=True)
    torch._dynamo.utils.counters.clear()
    with one_thread():
        res = run_suite(MODEL, TINY, extra_peers=[peer])
    row = next(r for r in res.rows if r.peer == peer.name)
    assert row.status == "ok" and row.check == "PASS", (row.note, row.check_detail)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_host_overhead_script_runs_both_tables():
    # scripts/gpu_check.sh runs it on the GPU machine; here only that it runs and prints both tables for every
    # backend asked for (the figures themselves are the benchmark's, never asserted).
    cmd = [sys.executable, str(ROOT / "benchmarks/host_overhead.py"), "--backend", "cpu,reference",
           "--rounds", "1", "--calls", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout
    for backend in ("cpu", "reference"):
        assert f"backend {backend} on cpu" in out
    assert out.count("dispatch path") == 2 and out.count("cross_entropy fwd+bwd") == 4


def test_headline_names_a_larger_shape_left_unmeasured():
    # A time budget drops the largest shape first in quick mode: the headline then falls back to a smaller
    # one, and must say so rather than pass it off as the op's largest size.
    def row(label, size, peer, kind, status="ok"):
        timing = {"median_ms": 1.0} if status == "ok" else None
        return {"label": label, "size": size, "phase": "fwd", "peer": peer, "kind": kind, "status": status,
                "timing": timing, "peak_bytes": 10, "rate": 1.0, "pct_ceiling": None, "speedup_eager": 1.0,
                "speedup_compile": None, "check": "PASS"}

    rows = [row("small", 1, "gptfast:cpu", "gptfast"), row("small", 1, "torch", "eager"),
            row("big", 2, "gptfast:cpu", "gptfast", status="skipped")]
    results = {"suites": {"softmax": {"rows": rows, "metric": "GB/s"}}}
    (line,) = report.headline(results)
    assert line["label"] == "small" and line["unmeasured"] == "big"
    assert "| small (big: no gptfast row) |" in "\n".join(report._headline_md(results))


def test_a_failing_row_is_no_speedup_baseline():
    # The fastest eager row answers wrongly: the correct rows' speedups are against the fastest correct one.
    from gptfast.bench.core import Row, add_speedups
    from gptfast.bench.timing import Timing

    def row(peer, kind, ms, check):
        return Row("softmax", {}, "s", 1, "fwd", peer, kind, timing=Timing([ms]), check=check)

    rows = [row("torch fast-but-wrong", "eager", 1.0, "FAIL"), row("torch", "eager", 4.0, "PASS"),
            row("gptfast:cpu", "gptfast", 2.0, "PASS")]
    add_speedups(rows, eager=lambda r: r.kind == "eager", compiled=lambda r: False)
    assert rows[2].speedup_eager == 2.0 and rows[1].speedup_eager == 1.0
