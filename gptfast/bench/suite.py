"""What an op suite is: shapes per device and size mode, the byte or FLOP formula, inputs, peers, the check.

A suite subclasses OpSuite and fills in the marked hooks; run_suite drives it through core's engine.
"""

import dataclasses
import importlib
from typing import Callable

import torch

from .. import backends
from ..testing import reference_dtype
from .core import PHASES, Inputs, Peer, Row, Runnable, Settings, Skip, add_speedups, run_peer

_COMPILE_LIMIT = 256


@dataclasses.dataclass
class SuiteResult:
    name: str
    rows: list[Row]
    notes: list[str]
    formulas: dict[str, str]
    metric: str
    ceiling: str
    baselines: str = ""


class OpSuite:
    name = ""
    metric = "GB/s"  # or "TFLOP/s"
    ceiling = "copy"  # which ceiling the % column divides by: "copy" or "matmul"
    measure_memory = False
    phases = PHASES
    formulas: dict[str, str] = {}
    baselines = ""  # what "vs torch eager" and "vs torch.compile" divide by
    eager_prefix = "torch"  # rows whose peer name starts with this are the eager baseline (fastest one wins)
    compile_prefix = "torch.compile"

    # ----------------------------------------------------------------------------------- hooks to fill in
    def shapes(self, device: torch.device, mode: str) -> list[dict]:
        raise NotImplementedError

    def label(self, shape: dict) -> str:
        raise NotImplementedError

    def size(self, shape: dict) -> float:
        """The x axis of the plots."""
        raise NotImplementedError

    def work(self, shape: dict, dtype: torch.dtype, phase: str) -> float:
        """Bytes (metric GB/s) or FLOPs (metric TFLOP/s) that one call of `phase` must move or compute."""
        raise NotImplementedError

    def inputs(self, shape: dict, dtype: torch.dtype, device: torch.device) -> Inputs:
        raise NotImplementedError

    def peers(self, device: torch.device, dtype: torch.dtype) -> tuple[list[Peer], list[str]]:
        """The peers to run, and notes for those that cannot run here (not importable, not built)."""
        raise NotImplementedError

    def reference(self, *args):
        """The high-precision reference (args already upcast); differentiable."""
        raise NotImplementedError

    def torch_same_dtype(self, *args):
        """torch's own implementation in the dtype under test: the error yardstick of design.md's rule."""
        raise NotImplementedError

    def subset(self, shape: dict, inputs: Inputs) -> tuple[Inputs, Callable]:
        """A smaller problem the check runs on, and select(name, tensor) cutting a full result down to it.

        Big shapes check a slice of independent rows or heads so the fp32 reference fits in memory.
        """
        return inputs, lambda name, t: t

    # ----------------------------------------------------------------------------------------- machinery
    def rate(self, work: float, median_ms: float) -> float:
        scale = 1e9 if self.metric == "GB/s" else 1e12
        return work / (median_ms * 1e-3) / scale

    def is_eager(self, row: Row) -> bool:
        return row.kind == "eager" and row.peer.startswith(self.eager_prefix)

    def is_compile(self, row: Row) -> bool:
        return row.kind == "compile" and row.peer.startswith(self.compile_prefix)

    def unavailable(self) -> str | None:
        """Why this whole suite cannot run in this install (None when it can)."""
        return None

    def ceiling_rate(self, row: Row) -> float | None:
        """The row's rate in the ceiling's unit (GB/s or TFLOP/s), for the % column."""
        return row.rate

    def setup(self, settings: Settings) -> None:
        """Called once before the suite's shapes run."""

    def finish_row(self, row: Row, runnable) -> None:
        """Last touches to a measured row (the model adds its static memory and TFLOP/s)."""

    def bind(self, peer: Peer, shape: dict, inputs: Inputs, settings: Settings) -> Runnable:
        return Runnable(peer.make(shape, inputs), inputs, peer)

    def expected(self, shape: dict, inputs: Inputs):
        """(want(phase) -> [(name, reference, torch_same_dtype)], select) for this shape, computed once."""
        sub, select = self.subset(shape, inputs)
        ref = _evaluate(
            self.reference, sub, reference_dtype(sub.args[sub.diff[0]].dtype) if sub.diff else None
        )
        tor = _evaluate(self.torch_same_dtype, sub, None)
        names = ["out"] + [f"grad_{i}" for i in sub.diff]
        both = list(zip(names, ref, tor))
        return (lambda phase: both[:1] if phase == "fwd" else both), select


def _evaluate(fn, inputs: Inputs, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """fn's output and the gradients of its differentiable args, optionally on args cast to dtype."""
    args = list(inputs.args)
    for i in inputs.diff:
        a = args[i].detach()
        args[i] = (a.to(dtype) if dtype else a.clone()).requires_grad_(True)
    grad_out = inputs.grad_out
    if grad_out is not None and dtype is not None:
        grad_out = grad_out.to(dtype)
    with torch.enable_grad():
        out = fn(*args)
        grads = torch.autograd.grad(out, [args[i] for i in inputs.diff], grad_out) if inputs.diff else ()
    return [out.detach(), *grads]


# --------------------------------------------------------------------------------------- shared peer helpers
def gptfast_peers(
    op: str, device: torch.device, make: Callable[[str], Callable]
) -> tuple[list[Peer], list[str]]:
    """A peer for every gptfast backend that can run `op` on `device`; notes say why the others cannot."""
    peers, notes = [], []
    for name in backends_for(device):
        if name == "triton" and device.type == "cpu":
            reason = "triton runs CPU tensors only in its interpreter, a correctness tool, so it is not timed"
        else:
            reason = backends.why_not(name, op, device)
        if reason:
            notes.append(f"gptfast:{name} not run: {reason}")
        else:
            peers.append(Peer(f"gptfast:{name}", "gptfast", make(name)))
    return peers, notes


def backends_for(device: torch.device) -> list[str]:
    """The gptfast backends that could run on this device type (the C++ "cpu" backend is no GPU contender)."""
    other = "cuda" if device.type == "cpu" else "cpu"
    return [n for n in backends.NAMES if n != other]


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) specialised to each shape, as a user with fixed training shapes gets it.

    The recompile limit is raised so that a run over many shapes never falls back to eager silently.
    """
    config = torch._dynamo.config
    for key in ("cache_size_limit", "recompile_limit"):
        if hasattr(config, key):
            setattr(config, key, max(getattr(config, key), _COMPILE_LIMIT))
    return torch.compile(fn, dynamic=False)


def optional_module(name: str) -> tuple[object | None, str]:
    """(module, "") when importable, else (None, the reason)."""
    try:
        return importlib.import_module(name), ""
    except Exception as e:  # noqa: BLE001 - any import failure (missing, broken CUDA build) means skip
        return None, f"{type(e).__name__}: {e}"


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def require_memory(nbytes: float, device: torch.device, what: str) -> None:
    """Skip a peer whose working set would not fit comfortably (a fraction of the device's memory)."""
    if device.type == "cuda":
        limit = 0.6 * torch.cuda.get_device_properties(device).total_memory
    else:
        limit = 2 * 2**30
    if nbytes > limit:
        raise Skip(f"{what} needs ~{nbytes / 2**30:.1f} GiB (limit {limit / 2**30:.1f} GiB here)")


def select_peers(suite: OpSuite, settings: Settings, extra_peers=()) -> tuple[list[Peer], list[str]]:
    peers, notes = suite.peers(settings.device, settings.dtype)
    kept = [p for p in list(peers) + list(extra_peers) if p.kind not in settings.exclude]
    notes += [
        f"{p.name} not run: excluded by --exclude {p.kind}" for p in peers if p.kind in settings.exclude
    ]
    return kept, notes


def run_suite(suite: OpSuite, settings: Settings, extra_peers=(), progress=None, partial=None) -> SuiteResult:
    """Every shape x peer x phase of `suite`, as rows, with speedups filled in.

    progress(n, what) is called after each peer; partial(result so far) too, so a caller can save early.
    """
    reason = suite.unavailable()
    if reason:
        return _result(suite, [], [f"suite not run: {reason}"])
    suite.setup(settings)
    peers, notes = select_peers(suite, settings, extra_peers)
    rows: list[Row] = []
    torch._dynamo.reset()
    shapes = suite.shapes(settings.device, settings.mode)
    if settings.mode == "full":
        # Full runs measure the target (largest) shapes first, so a short time budget drops the small ones.
        shapes = sorted(shapes, key=suite.size, reverse=True)
    for shape in shapes:
        if settings.out_of_time():
            # A shape starts whole or not at all, so its rows always have their baselines to compare with.
            _skip_shape(suite, settings, shape, peers, rows, progress)
            continue
        torch.manual_seed(0)
        inputs = suite.inputs(shape, settings.dtype, settings.device)
        want = None
        for peer in peers:
            if want is None and not settings.out_of_time(hard=True):
                want = _expected_or_error(suite, shape, inputs, settings.device)
            got = run_peer(suite, settings, shape, inputs, peer, suite.phases, want)
            rows.extend(got)
            if progress:
                progress(len(got), f"{suite.name} {suite.label(shape)} {peer.name}")
            if partial:
                add_speedups(rows, suite.is_eager, suite.is_compile)
                partial(_result(suite, rows, notes))
        del inputs, want
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows, suite.is_eager, suite.is_compile)
    return _result(suite, rows, notes)


def _skip_shape(suite: OpSuite, settings: Settings, shape: dict, peers, rows: list[Row], progress) -> None:
    for peer in peers:
        rows.extend(
            Row(
                op=suite.name,
                shape=shape,
                label=suite.label(shape),
                size=suite.size(shape),
                phase=phase,
                peer=peer.name,
                kind=peer.kind,
                status="skipped",
                note="time budget exhausted",
            )
            for phase in suite.phases
        )
        if progress:
            progress(len(suite.phases), f"{suite.name} {suite.label(shape)} skipped")


def _result(suite: OpSuite, rows: list[Row], notes: list[str]) -> SuiteResult:
    return SuiteResult(
        suite.name, rows, notes, dict(suite.formulas), suite.metric, suite.ceiling, suite.baselines
    )


def _expected_or_error(suite: OpSuite, shape: dict, inputs: Inputs, device: torch.device):
    try:
        return suite.expected(shape, inputs)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: the rows say the check could not run
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return e


def count_steps(suite: OpSuite, settings: Settings, extra_peers=()) -> int:
    if suite.unavailable():
        return 0
    peers, _ = select_peers(suite, settings, extra_peers)
    return len(suite.shapes(settings.device, settings.mode)) * len(peers) * len(suite.phases)
