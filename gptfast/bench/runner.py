"""One benchmark run: ceilings first, then each op's suite, then report.md, results.json and the plots.

The report and results.json are rewritten after every suite, so a run stopped early still leaves a report of
what it measured. A time budget (--time-budget) turns the cases left when it runs out into skipped rows.
"""

import datetime
import importlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import ceilings as ceilings_mod
from . import memory, report
from .core import Settings, add_ceiling_pct
from .suite import count_steps, run_suite
from .timing import Budget

OPS = ("softmax", "cross_entropy", "linear_cross_entropy", "attention", "model")
MODES = ("tiny", "quick", "full")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# Repeats per measurement by mode and device: GPUs are fast and precise, CPUs slow and noisy.
BUDGETS = {
    ("tiny", "cpu"): Budget(warmup=1, budget_ms=10.0, min_reps=3, max_reps=10),
    ("quick", "cpu"): Budget(warmup=1, budget_ms=100.0, min_reps=5, max_reps=30),
    ("full", "cpu"): Budget(warmup=3, budget_ms=500.0, min_reps=10, max_reps=100),
    ("tiny", "cuda"): Budget(warmup=2, budget_ms=20.0, min_reps=5, max_reps=20),
    ("quick", "cuda"): Budget(warmup=3, budget_ms=100.0, min_reps=10, max_reps=100),
    ("full", "cuda"): Budget(warmup=5, budget_ms=150.0, min_reps=10, max_reps=200),
}


# `gptfast bench` on a CPU with no --time-budget: it must end within 5 minutes even on a slow 2-core machine.
QUICK_CPU_BUDGET_S = 240.0


# Relative time shares under a time budget: attention and the model (torch.compile of a whole GPT) cost most.
SHARES = {"softmax": 1.0, "cross_entropy": 1.0, "linear_cross_entropy": 1.0, "attention": 1.5, "model": 2.0}


def suite_for(op: str):
    if op not in OPS:
        raise ValueError(f"unknown benchmark op {op!r}; known: {', '.join(OPS)}")
    return importlib.import_module(f"gptfast.bench.{op}").SUITE


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def git_commit() -> str | None:
    if os.environ.get("GPTFAST_COMMIT"):
        return os.environ["GPTFAST_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+uncommitted changes" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(device: torch.device, dtype: torch.dtype, mode: str) -> dict:
    triton, _ = _version("triton")
    meta = {
        "device": device.type,
        "device_name": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "mode": mode,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton,
        "python": platform.python_version(),
        "gptfast_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "memory_method": memory.method(device),
        "timing_method": (
            "CUDA events around each call; L2 flushed before each repeat"
            if device.type == "cuda"
            else "time.perf_counter around each call; caches not flushed"
        ),
        "command": " ".join(sys.argv),
    }
    for name in ("liger_kernel", "flash_attn", "matplotlib", "tqdm"):
        meta[name] = _version(name)[0]
    return meta


def _version(name: str) -> tuple[str | None, str]:
    try:
        module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        return None, str(e)
    return getattr(module, "__version__", "installed"), ""


class Progress:
    """tqdm when importable, else one plain line per case on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, unit="case", desc="gptfast bench", file=sys.stderr, dynamic_ncols=True
                )
            except ImportError:
                pass

    def __call__(self, n: int, what: str) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60], refresh=False)
            self.bar.update(n)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(
    device: str | None = None,
    ops=OPS,
    mode: str = "quick",
    dtype: torch.dtype | None = None,
    out: str | Path = "bench-out",
    time_budget: float | None = None,
    threads: int | None = None,
    plots: bool = True,
    progress: bool = True,
    extra_peers: dict | None = None,
    exclude=(),
) -> dict:
    """Runs the benchmark and writes report.md, results.json and the plots into `out`; returns the results.

    time_budget (seconds) is shared equally among the suites; a case that would start after its suite's share
    is a skipped row. The quick CPU run defaults to QUICK_CPU_BUDGET_S; time_budget=0 means no limit.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available in this torch build or on this machine")
    dtype = dtype or default_dtype(device)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    suites = [suite_for(op) for op in ops]
    if time_budget is None and (mode, device.type) == ("quick", "cpu"):
        time_budget = QUICK_CPU_BUDGET_S
    settings = Settings(device, dtype, mode, BUDGETS[(mode, device.type)], exclude=tuple(exclude))
    if time_budget:
        settings.hard_deadline = start + time_budget
    results = {
        "meta": metadata(device, dtype, mode),
        "ceilings": None,
        "suites": {},
        "plots": [],
        "plot_note": "",
    }
    results["ceilings"] = ceilings_mod.measure(device, dtype, mode).as_dict()
    extra_peers = extra_peers or {}
    bar = Progress(sum(count_steps(s, settings, extra_peers.get(s.name, ())) for s in suites), progress)
    try:
        for i, suite in enumerate(suites):
            if time_budget:
                # Each suite gets its weighted share of what is left, so a slow one cannot starve the rest.
                left = start + time_budget - time.monotonic()
                weights = [SHARES.get(s.name, 1.0) for s in suites[i:]]
                settings.deadline = time.monotonic() + left * weights[0] / sum(weights)

            def save(res, suite=suite):
                ceiling = results["ceilings"]["copy_GBps" if suite.ceiling == "copy" else "matmul_TFLOPs"]
                add_ceiling_pct(res.rows, ceiling, suite.ceiling_rate)
                results["suites"][suite.name] = report.suite_dict(res)
                results["meta"]["elapsed_s"] = time.monotonic() - start
                report.write(results, out)

            save(run_suite(suite, settings, extra_peers.get(suite.name, ()), bar, partial=save))
    finally:
        bar.close()
    if plots:
        results["plots"], results["plot_note"] = report.plots(results, out)
    results["meta"]["elapsed_s"] = time.monotonic() - start
    report.write(results, out)
    return results
