"""This device's ceilings, measured at the start of every run: copy bandwidth and matmul throughput.

- copy: dst.copy_(src) on a buffer far larger than any cache; GB/s counts bytes read plus bytes written
  (2 * nbytes), the same accounting the memory-bound ops use.
- matmul: an n x n x n torch.matmul in the benchmark dtype; TFLOP/s = 2 * n^3 / time.
"""

import dataclasses

import torch

from .timing import Budget, Timing, time_fn

# (copy bytes per buffer, matmul n) by size mode and device type.
SIZES = {
    ("tiny", "cpu"): (16 * 2**20, 256),
    ("quick", "cpu"): (256 * 2**20, 1024),
    ("full", "cpu"): (512 * 2**20, 2048),
    ("tiny", "cuda"): (256 * 2**20, 2048),
    ("quick", "cuda"): (1 * 2**30, 8192),
    ("full", "cuda"): (2 * 2**30, 8192),
}


@dataclasses.dataclass
class Ceilings:
    copy_gbps: float
    matmul_tflops: float
    copy_bytes: int
    matmul_n: int
    dtype: str
    copy_timing: Timing
    matmul_timing: Timing

    def as_dict(self) -> dict:
        return {
            "copy_GBps": self.copy_gbps,
            "matmul_TFLOPs": self.matmul_tflops,
            "copy_formula": f"2 * {self.copy_bytes} bytes (read + write) / median time",
            "matmul_formula": f"2 * {self.matmul_n}^3 FLOPs in {self.dtype} / median time",
            "copy_timing": self.copy_timing.as_dict(),
            "matmul_timing": self.matmul_timing.as_dict(),
        }


def copy_bandwidth(nbytes: int, device, budget: Budget) -> tuple[float, Timing]:
    """GB/s of a device-to-device copy of nbytes, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, budget, flush=False)
    return 2 * nbytes / (timing.median * 1e-3) / 1e9, timing


def matmul_throughput(n: int, dtype: torch.dtype, device, budget: Budget) -> tuple[float, Timing]:
    """TFLOP/s of an n x n by n x n matmul in dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_fn(lambda: a @ b, device, budget, flush=False)
    return 2 * n**3 / (timing.median * 1e-3) / 1e12, timing


def measure(device, dtype: torch.dtype, mode: str) -> Ceilings:
    device = torch.device(device)
    nbytes, n = SIZES[(mode, device.type)]
    budget = Budget(warmup=2, budget_ms=300.0 if mode != "tiny" else 50.0, min_reps=5, max_reps=50)
    gbps, copy_t = copy_bandwidth(nbytes, device, budget)
    tflops, mm_t = matmul_throughput(n, dtype, device, budget)
    return Ceilings(gbps, tflops, nbytes, n, str(dtype).replace("torch.", ""), copy_t, mm_t)
