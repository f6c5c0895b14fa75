"""design.md's tolerance rule, shared by the tests and the benchmark's PASS/FAIL column.

A result is correct when  max|out - ref| <= 2 * max|torch_same_dtype - ref| + floor,  where ref is the
reference computed in higher precision (fp32 for fp16/bf16 inputs, fp64 for fp32 inputs) and
torch_same_dtype is torch's own implementation run in the dtype under test (never taken as better than
rounding the reference to that dtype). NaN and inf must sit where the reference has them.
"""
import dataclasses

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


def closeness(out: Tensor, ref: Tensor, torch_out: Tensor, floor: float | None = None) -> Closeness:
    if out.shape != ref.shape:
        return Closeness(False, float("inf"), 0.0, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o, r, t = out.detach().double(), ref.detach().double(), torch_out.detach().double()
    if not torch.equal(o.isnan(), r.isnan()):
        return Closeness(False, float("nan"), 0.0, "NaN where the reference has none, or the reverse")
    inf_r = r.isinf()
    if not torch.equal(o.isinf() & ~o.isnan(), inf_r) or not torch.equal(o[inf_r], r[inf_r]):
        return Closeness(False, float("inf"), 0.0, "inf where the reference is finite, or the reverse")
    finite = r.isfinite()
    err = (o - r)[finite].abs().max().item() if finite.any() else 0.0
    torch_finite = finite & t.isfinite()
    torch_err = (t - r)[torch_finite].abs().max().item() if torch_finite.any() else 0.0
    # No result in out's dtype can beat rounding the reference to it, which may cost half an ulp of its largest
    # value: the baseline is that half ulp, not the rounding error this particular reference happens to have
    # (near 0 for a lucky scalar, where a correctly rounded loss would then fail). Where torch itself
    # overflowed (fp16 sums past 65504) its error is unbounded, so that rounding, not a zero, is the baseline.
    rr = r.to(out.dtype).double()
    representable = finite & rr.isfinite()
    rounding = 0.0
    if representable.any():
        largest = r[representable].abs().max()
        half_ulp = torch.finfo(out.dtype).eps * 2.0 ** (torch.frexp(largest).exponent.item() - 2)
        rounding = max((rr - r)[representable].abs().max().item(), half_ulp if largest > 0 else 0.0)
    bound = 2.0 * max(torch_err, rounding) + (FLOOR.get(out.dtype, 1e-6) if floor is None else floor)
    return Closeness(err <= bound, err, bound)


def assert_close(out: Tensor, ref: Tensor, torch_out: Tensor, name: str = "output", floor: float | None = None):
    c = closeness(out, ref, torch_out, floor)
    assert c.ok, (
        f"{name}: max|out - ref| = {c.error:.3e} > bound {c.bound:.3e} (2 x torch's own error + floor) {c.detail}"
    )


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the reference runs in when checking `dtype`: fp64 for fp32/fp64, fp32 for half types."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
