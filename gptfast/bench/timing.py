"""Timing: CUDA events on GPUs, perf_counter after a synchronize on CPUs; median with p20 and p80.

Every measurement warms up first, so compilation and autotuning stay out of the numbers, then picks a
repeat count from a time budget (as triton.testing.do_bench does). On GPUs the L2 cache is flushed before
each repeat (outside the timed region), so a kernel is never timed on inputs the previous repeat left in
cache. CPUs are not flushed: the last-level cache of a server CPU is hundreds of MiB, and the report says so.
"""

import dataclasses
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Timing:
    """Repeat times of one measurement, in milliseconds."""

    samples_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples_ms)
        if len(s) == 1:
            return s[0]
        # Linear interpolation between order statistics (numpy's default rule).
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def p20(self) -> float:
        return self.quantile(0.2)

    @property
    def p80(self) -> float:
        return self.quantile(0.8)

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median,
            "p20_ms": self.p20,
            "p80_ms": self.p80,
            "samples_ms": self.samples_ms,
        }


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long one measurement may run: warm-up calls, then repeats filling budget_ms (within the bounds)."""

    warmup: int = 2
    budget_ms: float = 200.0
    min_reps: int = 5
    max_reps: int = 100


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flush:
    """Overwrites a buffer twice the size of the GPU's L2 before each repeat, as triton's do_bench does."""

    def __init__(self, device: torch.device):
        self.buffer = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
            self.buffer = torch.empty(max(2 * l2, 64 * 2**20), dtype=torch.int8, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


_flushers: dict[torch.device, _L2Flush] = {}


def _flusher(device: torch.device) -> _L2Flush:
    if device not in _flushers:
        _flushers[device] = _L2Flush(device)
    return _flushers[device]


def _repeat_count(estimate_ms: float, budget: Budget) -> int:
    return int(min(budget.max_reps, max(budget.min_reps, budget.budget_ms / max(estimate_ms, 1e-3))))


def time_fn(fn: Callable[[], object], device, budget: Budget = Budget(), flush: bool = True) -> Timing:
    """Times fn() on `device`: budget.warmup untimed calls, then repeats; returns every repeat's time."""
    device = torch.device(device)
    if device.type == "cuda":
        for _ in range(max(1, budget.warmup)):
            fn()
        synchronize(device)
        return _time_cuda(fn, device, budget, flush)
    return _time_cpu(fn, budget)


def _time_cpu(fn, budget: Budget) -> Timing:
    # The last warm-up call doubles as the estimate: a slow CPU case should not pay for an extra call.
    for _ in range(max(1, budget.warmup)):
        start = time.perf_counter()
        fn()
        estimate = (time.perf_counter() - start) * 1e3
    samples = []
    for _ in range(_repeat_count(estimate, budget)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(samples)


def _time_cuda(fn, device: torch.device, budget: Budget, flush: bool) -> Timing:
    flush_l2 = _flusher(device) if flush else (lambda: None)
    # 1. Estimate one call from a few back-to-back calls (events, so the launch queue is not timed).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    reps = _repeat_count(start.elapsed_time(end) / 3, budget)
    # 2. One event pair per repeat around fn only; the flush runs between them, untimed.
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush_l2()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)])
