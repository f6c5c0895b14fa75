"""Peak memory of one call, above what was allocated before it.

GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats (the caching allocator's own count).
CPU: torch.profiler's memory accounting. The profiler records every allocation and free of torch's CPU
allocator; the running sum of those events, in time order, peaks at the same number max_memory_allocated
reports on a GPU. It counts tensors, not the Python heap or the allocator's cached pages, so it is fair
between peers (RSS would charge one peer for pages another left mapped).
"""

import contextlib
import os
import sys

import torch

CPU_METHOD = "torch.profiler memory accounting (peak of the running sum of CPU allocator events)"
CUDA_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"


def method(device) -> str:
    return CUDA_METHOD if torch.device(device).type == "cuda" else CPU_METHOD


def peak_bytes(fn, device) -> int:
    """Bytes allocated at the peak of fn(), above what was allocated before (fn's results included)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _peak_cuda(fn, device)
    return _peak_cpu(fn)


def _peak_cuda(fn, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2: kineto prints two lines per profile from C++, tearing the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_cpu(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    # fn already ran (checked and timed) before this, so nothing it would print is lost.
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            current += e.nbytes()
            peak = max(peak, current)
    return peak
