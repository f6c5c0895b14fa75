"""The engine every suite runs on: peers, rows, and one run of a suite over its shapes.

For each shape the engine builds the inputs once, then for every peer and phase ("fwd", "fwd+bwd", or the
model's "step"):
1. runs it once and checks every output and gradient against the reference by design.md's rule
   (gptfast.testing.closeness): the row gets max error and PASS/FAIL, so a fast wrong kernel shows FAIL;
2. times it (warm-up first, median with p20/p80);
3. measures peak memory when the suite asks for it;
4. turns the suite's byte or FLOP count into GB/s or TFLOP/s and a % of this device's ceiling.
Speedups against the torch eager and torch.compile rows of the same shape and phase come last.
A peer that fails or cannot run gives a row that says why; the run goes on.
"""

import dataclasses
import time
import traceback
from typing import Callable

import torch

from ..testing import closeness
from . import memory
from .timing import Budget, Timing, time_fn

PHASES = ("fwd", "fwd+bwd")


class Skip(Exception):
    """Raised by a peer builder: this peer cannot run this case, for the reason in the message."""


@dataclasses.dataclass
class Inputs:
    """A case's args: args[i] for i in diff get gradients; grad_out seeds the backward (None: scalar)."""

    args: tuple
    diff: tuple[int, ...] = ()
    grad_out: torch.Tensor | None = None


@dataclasses.dataclass
class Peer:
    """One contender. make(shape, inputs) -> fn(*args) -> output; it raises Skip when it cannot run the case.

    kind: "gptfast" (a gptfast backend), "eager" (torch's own op), "compile" (torch.compile), "external"
    (Liger-Kernel, flash-attn). prepare/restore convert a canonical tensor to the peer's layout and back
    (flash-attn wants (B, L, H, D)); they are applied to the differentiable args, grad_out, outputs and grads.
    compiled: a suite that compiles its "compile" peers (the model suite) compiles this one too, whatever
    its kind: gptfast's GPT under torch.compile is a gptfast row, set against torch's GPT under torch.compile.
    """

    name: str
    kind: str
    make: Callable
    prepare: Callable | None = None
    restore: Callable | None = None
    compiled: bool = False


class Runnable:
    """A peer bound to one case: run(phase) -> (output, grads) for the check, timed(phase) -> a callable."""

    def __init__(self, fn: Callable, inputs: Inputs, peer: Peer):
        self.fn, self.inputs = fn, inputs
        self.prep = peer.prepare or (lambda t: t)
        self.restore = peer.restore or (lambda t: t)
        self.args = self._private_args()
        self.grad_out = self.prep(inputs.grad_out) if inputs.grad_out is not None else None

    def _private_args(self) -> tuple:
        # A private copy: some peers (Liger's cross-entropy) overwrite their input with the gradient.
        args = list(self.inputs.args)
        for i in self.inputs.diff:
            args[i] = self.prep(args[i].detach().clone()).requires_grad_(True)
        return tuple(args)

    def _fwd(self, args=None):
        with torch.no_grad():
            return self.fn(*(args or self.args))

    def _fwd_bwd(self, args=None):
        args = args or self.args
        out = self.fn(*args)
        return out, torch.autograd.grad(out, [args[i] for i in self.inputs.diff], self.grad_out)

    def run(self, phase: str):
        """The checked call, on fresh copies of the inputs (a timed repeat may have overwritten its own)."""
        args = self._private_args()
        if phase == "fwd":
            return self.restore(self._fwd(args)), []
        out, grads = self._fwd_bwd(args)
        return self.restore(out.detach()), [self.restore(g) for g in grads]

    def timed(self, phase: str) -> Callable:
        return self._fwd if phase == "fwd" else self._fwd_bwd


@dataclasses.dataclass
class Row:
    op: str
    shape: dict
    label: str
    size: float
    phase: str
    peer: str
    kind: str
    status: str = "ok"  # ok | skipped | error
    note: str = ""
    timing: Timing | None = None
    work: float = 0.0
    rate: float | None = None  # GB/s or TFLOP/s (tokens/s for the model)
    pct_ceiling: float | None = None
    speedup_eager: float | None = None
    speedup_compile: float | None = None
    peak_bytes: int | None = None
    max_error: float | None = None
    check: str = "n/a"  # PASS | FAIL | n/a
    check_detail: str = ""
    extra: dict = dataclasses.field(default_factory=dict)  # suite-specific numbers (the model's TFLOP/s)

    @property
    def median_ms(self) -> float | None:
        return self.timing.median if self.timing else None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["timing"] = self.timing.as_dict() if self.timing else None
        return d


@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    mode: str  # tiny | quick | full
    budget: Budget
    deadline: float | None = None  # time.monotonic() after which no new shape starts (this suite's share)
    hard_deadline: float | None = None  # after which no new case starts at all (the whole run's budget)
    exclude: tuple[str, ...] = ()  # peer kinds not to run ("compile", "external", ...)

    def out_of_time(self, hard: bool = False) -> bool:
        deadline = self.hard_deadline if hard else self.deadline
        return deadline is not None and time.monotonic() > deadline


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def check(got, want, select: Callable) -> tuple[float, str, str]:
    """(max error, PASS/FAIL, detail) of the peer's (out, grads) vs want = [(name, ref, torch_same_dtype)]."""
    out, grads = got
    tensors = [out, *grads]
    if len(tensors) != len(want):
        return float("inf"), "FAIL", f"{len(tensors)} results, expected {len(want)}"
    worst, failed = 0.0, []
    for t, (name, ref, torch_out) in zip(tensors, want):
        c = closeness(select(name, t), ref, torch_out)
        worst = max(worst, c.error) if c.error == c.error else float("nan")
        if not c.ok:
            failed.append(f"{name}: err {c.error:.3g} > bound {c.bound:.3g} {c.detail}".strip())
    return worst, "FAIL" if failed else "PASS", "; ".join(failed)


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_peer(
    suite, settings: Settings, shape: dict, inputs: Inputs, peer: Peer, phases, expected
) -> list[Row]:
    """Every phase of one peer on one shape, as rows (skipped / error rows say why).

    expected: (want(phase) -> [(name, reference, torch_same_dtype)], select(name, tensor)), or the exception
    the reference raised (the rows are then timed but their check is n/a).
    """
    base = dict(
        op=suite.name,
        shape=shape,
        label=suite.label(shape),
        size=suite.size(shape),
        peer=peer.name,
        kind=peer.kind,
    )
    rows = [Row(phase=p, **base) for p in phases]
    if settings.out_of_time(hard=True):
        return [dataclasses.replace(r, status="skipped", note="time budget exhausted") for r in rows]
    try:
        runnable = suite.bind(peer, shape, inputs, settings)
    except Skip as e:
        return [dataclasses.replace(r, status="skipped", note=str(e)) for r in rows]
    except Exception as e:  # noqa: BLE001 - a peer that cannot even be built is reported, not fatal
        return [dataclasses.replace(r, status="error", note=first_line(e)) for r in rows]
    for row in rows:
        if settings.out_of_time(hard=True):
            row.status, row.note = "skipped", "time budget exhausted"
            continue
        try:
            _measure(suite, settings, shape, runnable, row, expected)
        except Skip as e:
            row.status, row.note = "skipped", str(e)
        except Exception as e:  # noqa: BLE001
            # torch's own compile failing is a note; gptfast's GPT failing to compile is an error of ours
            row.status = "skipped" if peer.kind == "compile" and _is_compile_error(e) else "error"
            row.note = ("torch.compile failed: " if row.status == "skipped" else "") + first_line(e)
            if not isinstance(
                e, (torch.OutOfMemoryError, NotImplementedError, RuntimeError, TypeError, ValueError)
            ):
                row.check_detail = traceback.format_exc(limit=3)
        finally:
            _release(settings.device)
    return rows


def _is_compile_error(e: BaseException) -> bool:
    mod = type(e).__module__
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "compile" in type(e).__name__.lower()


def _measure(suite, settings: Settings, shape, runnable, row: Row, expected) -> None:
    got = runnable.run(row.phase)
    if got is None:
        row.check, row.check_detail = "n/a", getattr(runnable, "unchecked", "")
    elif isinstance(expected, BaseException):
        row.check, row.check_detail = "n/a", f"the reference could not run: {first_line(expected)}"
    else:
        want, select = expected
        row.max_error, row.check, row.check_detail = check(got, want(row.phase), select)
    del got
    call = runnable.timed(row.phase)
    row.timing = time_fn(call, settings.device, settings.budget)
    row.work = suite.work(shape, settings.dtype, row.phase)
    row.rate = suite.rate(row.work, row.timing.median)
    if suite.measure_memory or settings.device.type == "cuda":  # free on a GPU, so every suite gets it there
        row.peak_bytes = memory.peak_bytes(call, settings.device)
    suite.finish_row(row, runnable)


def add_speedups(rows: list[Row], eager: Callable[[Row], bool], compiled: Callable[[Row], bool]) -> None:
    """speedup = baseline median / row median per (shape, phase); eager baseline: the fastest eager row.

    A row that FAILs its check is no baseline: a fast wrong answer would make every correct row look slower
    than it is (sdpa[efficient] FAILs the H200 report's attention fwd+bwd check at 2baac1f)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.label, r.phase), []).append(r)
    for group in groups.values():
        timed = [r for r in group if r.timing]
        bases = [r for r in timed if r.check != "FAIL"]
        base_eager = min((r.median_ms for r in bases if eager(r)), default=None)
        base_compile = min((r.median_ms for r in bases if compiled(r)), default=None)
        for r in timed:
            if base_eager:
                r.speedup_eager = base_eager / r.median_ms
            if base_compile:
                r.speedup_compile = base_compile / r.median_ms


def add_ceiling_pct(rows: list[Row], ceiling: float | None, rate_of: Callable[[Row], float | None]) -> None:
    """% of the ceiling, from the row's rate in the ceiling's unit (rate_of: GB/s or TFLOP/s)."""
    for r in rows:
        rate = rate_of(r)
        if rate is not None and ceiling:
            r.pct_ceiling = 100.0 * rate / ceiling
