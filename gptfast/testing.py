"""design.md's tolerance rule, shared by the tests and the benchmark's PASS/FAIL column.

A result is correct when  max|out - ref| <= 2 * max|torch_same_dtype - ref| + floor,  where ref is the
reference computed in higher precision (fp32 for fp16/bf16 inputs, fp64 for fp32 inputs) and
torch_same_dtype is torch's own implementation run in the dtype under test (never taken as better than
rounding the reference to that dtype). NaN and inf must sit where the reference has them.
"""
import dataclasses
import math

import torch
from torch import Tensor

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@dataclasses.dataclass
class Closeness:
    ok: bool
    error: float
    bound: float
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok


# Elements compared per step: the comparison works in float64, so a whole 16k x 128k gradient at once would
# need several 16 GiB temporaries (the H200 benchmark ran out of memory that way); chunks keep it to ~0.3 GiB.
CHUNK = 1 << 22


def closeness(out: Tensor, ref: Tensor, torch_out: Tensor, floor: float | None = None) -> Closeness:
    if out.shape != ref.shape:
        return Closeness(False, float("inf"), 0.0, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o_all, r_all, t_all = (x.detach().reshape(-1) for x in (out, ref, torch_out))
    zero = torch.zeros((), dtype=torch.float64, device=r_all.device)
    err, torch_err, rounding, largest = zero, zero, zero, zero
    nan_mismatch = inf_mismatch = torch.zeros((), dtype=torch.bool, device=r_all.device)
    for lo in range(0, r_all.numel(), CHUNK):
        o, r, t = (x[lo : lo + CHUNK].to(r_all.device, torch.float64) for x in (o_all, r_all, t_all))
        nan_mismatch = nan_mismatch | (o.isnan() != r.isnan()).any()
        inf_r = r.isinf()
        # (o != r) & inf_r rather than o[inf_r] != r[inf_r]: boolean indexing would sync the host per chunk
        inf_mismatch = inf_mismatch | ((o.isinf() & ~o.isnan()) != inf_r).any() | ((o != r) & inf_r).any()
        finite = r.isfinite()
        err = torch.maximum(err, _masked_max((o - r).abs(), finite))
        torch_err = torch.maximum(torch_err, _masked_max((t - r).abs(), finite & t.isfinite()))
        # No result in out's dtype can beat rounding the reference to it, which may cost half an ulp of its
        # largest value: the baseline is that half ulp, not the rounding error this particular reference
        # happens to have (near 0 for a lucky scalar, where a correctly rounded loss would then fail). Where
        # torch itself overflowed (fp16 sums past 65504) its error is unbounded, so that rounding, not a zero,
        # is the baseline.
        rr = r.to(out.dtype).double()
        representable = finite & rr.isfinite()
        rounding = torch.maximum(rounding, _masked_max((rr - r).abs(), representable))
        largest = torch.maximum(largest, _masked_max(r.abs(), representable))
    # One host sync for the whole comparison, whatever the number of chunks.
    nan_mismatch, inf_mismatch, err, torch_err, rounding, largest = torch.stack(
        [nan_mismatch.double(), inf_mismatch.double(), err, torch_err, rounding, largest]
    ).tolist()
    if largest > 0:
        half_ulp = torch.finfo(out.dtype).eps * 2.0 ** (math.frexp(largest)[1] - 2)
        rounding = max(rounding, half_ulp)
    if nan_mismatch:
        return Closeness(False, float("nan"), 0.0, "NaN where the reference has none, or the reverse")
    if inf_mismatch:
        return Closeness(False, float("inf"), 0.0, "inf where the reference is finite, or the reverse")
    bound = 2.0 * max(torch_err, rounding) + (FLOOR.get(out.dtype, 1e-6) if floor is None else floor)
    return Closeness(err <= bound, err, bound)


def _masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """max of values where mask holds, 0 where it holds nowhere (errors are >= 0)."""
    return torch.where(mask, values, 0.0).max() if values.numel() else values.new_zeros(())


def assert_close(out: Tensor, ref: Tensor, torch_out: Tensor, name: str = "output", floor: float | None = None):
    c = closeness(out, ref, torch_out, floor)
    assert c.ok, (
        f"{name}: max|out - ref| = {c.error:.3e} > bound {c.bound:.3e} (2 x torch's own error + floor) {c.detail}"
    )


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the reference runs in when checking `dtype`: fp64 for fp32/fp64, fp32 for half types."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
