"""Triton cross-entropy over (M, V) logits: a one-read forward and a one-read, one-write backward.

Per row, with lse = logsumexp(x), t the target and eps the label smoothing:
    loss = (1 - eps) * (lse - x[t]) + eps * (lse - mean(x)) + z_loss * lse^2      (0 when t == ignore_index)
    dloss/dx_j = p_j * (1 + 2 * z_loss * lse) - (1 - eps) * [j == t] - eps / V,   p_j = exp(x_j - lse)

Forward: one program per row streams the vocab in blocks, keeping a running max m and sum d
(d <- d * exp(m_old - m_new) + sum exp(x - m_new)), the sum of x (label smoothing) and, by a single load,
x[t]. It writes loss[M] and lse[M].
Backward: a (row, vocab block) grid; each program reads its block of logits once, recomputes p from the saved
lse and writes dlogits. Rows whose target is ignore_index are not read; their gradient is 0.

In-place gradient (off by default): `cross_entropy_forward(..., grad_in_place=True)` also overwrites the
logits with the gradient of loss.sum() (dloss = 1 per row) in a second pass over the row (often still in L2).
linear_cross_entropy uses it so that a chunk's logits buffer becomes its dlogits without a second buffer.
`cross_entropy_backward(..., out=logits)` is the same in place for a given dloss (the kernel reads each
element before writing it).

Out-of-range targets (not ignore_index and outside [0, V)): the kernels never read them. The row's loss is NaN
and its gradient row is NaN, so the error cannot pass as a finite loss (checking on a GPU would need a host
sync). On CPU tensors (the interpreter) the pair raises an IndexError first, as every backend does on the CPU.

Dtypes: logits fp32/fp16/bf16 with fp32 math, loss/lse fp32; fp64 logits are supported and run in fp64 with
fp64 loss/lse, but on GPUs label_smoothing and z_loss arrive as fp32 scalars, so they are exact only when fp32
represents them (0.25, 0.125, ...). Targets int32 or int64. Row offsets are int64, so M * V beyond 2^31
(32k rows x 128k vocab) indexes correctly.
"""

import torch
import triton
import triton.language as tl

from gptfast.ops import _checks

from .softmax import acc_dtype, launch, num_warps_for, with_alignment

FWD_BLOCK = 8192  # vocab columns per step of the forward's online loop
BWD_BLOCK = 4096  # vocab columns per backward program


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _row_grad(x, c, t, lse, coef, scale, valid, bad, V, label_smoothing):
    """scale * (p * coef - (1 - eps) [c == t] - eps / V) for one block of a row, NaN for a bad target, 0 for
    an ignored row (even when its lse is NaN or inf: the row is not in the loss)."""
    g = tl.exp(x - lse) * coef - label_smoothing / V
    g = tl.where(c == t, g - (1.0 - label_smoothing), g) * scale
    return tl.where(bad, float("nan"), tl.where(valid, g, 0.0))


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,
    target_ptr,
    loss_ptr,
    lse_ptr,
    stride,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    BLOCK: tl.constexpr,
    SMOOTHING: tl.constexpr,
    GRAD_IN_PLACE: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride
    # fp32 scalar arguments would round eps / V and z for fp64 logits
    label_smoothing = label_smoothing + tl.zeros((), ACC)
    z_loss = z_loss + tl.zeros((), ACC)
    t = tl.load(target_ptr + row).to(tl.int64)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < V)
    bad = valid & ((t < 0) | (t >= V))
    cols = tl.arange(0, BLOCK)
    # 1. online logsumexp over vocab blocks, plus the row sum of x for label smoothing
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((), ACC)
    sum_x = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
        if SMOOTHING:
            sum_x += tl.sum(tl.where(c < V, x, 0.0), axis=0)
    lse = m + tl.log(d)
    # 2. the target logit: one load, never outside the row
    x_t = tl.load(x_row + t, mask=valid & in_range, other=0.0).to(ACC)
    loss = lse - x_t
    if SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / V)
    loss = tl.where(valid, loss + z_loss * lse * lse, 0.0)
    tl.store(loss_ptr + row, tl.where(bad, float("nan"), loss))
    tl.store(lse_ptr + row, lse)
    # 3. optionally overwrite the row with d loss / d x (dloss = 1), re-reading it while it is in L2
    if GRAD_IN_PLACE:
        coef = 1.0 + 2.0 * z_loss * lse
        scale = tl.where(valid, 1.0, 0.0).to(ACC)
        n_read = tl.where(valid, V, 0)  # ignored rows are written as 0 without being read
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < n_read, other=0.0).to(ACC)
            g = _row_grad(x, c, t, lse, coef, scale, valid, bad, V, label_smoothing)
            tl.store(x_row + c, g.to(logits_ptr.dtype.element_ty), mask=c < V)


@triton.jit
def _cross_entropy_bwd_kernel(
    dloss_ptr,
    logits_ptr,
    target_ptr,
    lse_ptr,
    dlogits_ptr,
    stride,
    out_stride,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    label_smoothing = label_smoothing + tl.zeros((), ACC)
    z_loss = z_loss + tl.zeros((), ACC)
    t = tl.load(target_ptr + row).to(tl.int64)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= V))
    lse = tl.load(lse_ptr + row).to(ACC)
    # dx_j = dloss * (p_j (1 + 2 z lse) - (1 - eps) [j == t] - eps / V); ignored rows are 0 and never read
    scale = tl.where(valid, tl.load(dloss_ptr + row).to(ACC), 0.0)
    x = tl.load(logits_ptr + row * stride + c, mask=c < tl.where(valid, V, 0), other=0.0).to(ACC)
    g = _row_grad(x, c, t, lse, 1.0 + 2.0 * z_loss * lse, scale, valid, bad, V, label_smoothing)
    tl.store(dlogits_ptr + row * out_stride + c, g.to(dlogits_ptr.dtype.element_ty), mask=c < V)


# ---------------------------------------------------------------------------------------------- launchers
def _check_rows(logits: torch.Tensor) -> torch.Tensor:
    # Rows may be strided (a slice of a wider buffer); each row must be contiguous.
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    grad_in_place: bool = False,
    loss: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss[M], lse[M]) of logits[M, V]. grad_in_place=True also overwrites `logits` (which must then be
    row-contiguous already) with the gradient of loss.sum(). loss/lse may be given (contiguous [M] views) to
    write into; `block` forces the vocab columns per step (the tests use small blocks)."""
    if grad_in_place and logits.stride(-1) != 1:
        raise ValueError("cross_entropy_forward: grad_in_place needs logits with contiguous rows")
    logits = _check_rows(logits)
    M, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = logits.new_empty(M, dtype=acc) if loss is None else loss
    lse = logits.new_empty(M, dtype=acc) if lse is None else lse
    if M == 0:
        return loss, lse
    block = block or min(triton.next_power_of_2(V), FWD_BLOCK)
    launch(_cross_entropy_fwd_kernel)[(M,)](
        logits,
        target,
        loss,
        lse,
        logits.stride(0),
        V,
        ignore_index,
        label_smoothing,
        z_loss,
        BLOCK=block,
        SMOOTHING=label_smoothing > 0.0,
        GRAD_IN_PLACE=grad_in_place,
        ACC=acc_dtype(logits.dtype),
        num_warps=num_warps_for(block),
    )
    return loss, lse


def cross_entropy_backward(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    out: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """dlogits[M, V] from the saved lse[M]; out=logits computes it in place."""
    if out is not None and out.stride(-1) != 1:
        raise ValueError("cross_entropy_backward: out needs contiguous rows")
    logits = _check_rows(logits)
    M, V = logits.shape
    out = torch.empty_like(logits) if out is None else out
    if M == 0:
        return out
    block = block or min(triton.next_power_of_2(V), BWD_BLOCK)
    launch(_cross_entropy_bwd_kernel)[(M, triton.cdiv(V, block))](
        dloss.contiguous(),
        logits,
        target,
        lse.contiguous(),
        out,
        logits.stride(0),
        out.stride(0),
        V,
        ignore_index,
        label_smoothing,
        z_loss,
        BLOCK=block,
        ACC=acc_dtype(logits.dtype),
        num_warps=num_warps_for(block),
    )
    return out


# ---------------------------------------------------------------------------------------------- the pair
def cross_entropy_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss[M], lse[M]) of logits[M, V] and target[M]; fp32 (fp64 for fp64 logits); ignored rows give 0."""
    _checks.target_values("cross_entropy", target, logits.shape[1], ignore_index)
    return cross_entropy_forward(logits, target.contiguous(), ignore_index, label_smoothing, z_loss)


def cross_entropy_bwd(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """dlogits[M, V] (logits' dtype) for the upstream dloss[M], from the saved lse[M]."""
    return cross_entropy_backward(
        dloss, logits, target.contiguous(), lse, ignore_index, label_smoothing, z_loss
    )


# ---------------------------------------------------------------------------------- sm_90a compile grid
def _compile_cases() -> list[dict]:
    cases = []
    for dtype in ("fp32", "fp16", "bf16"):
        for tdtype in ("i64", "i32"):
            # vocab blocks the launchers pick: small vocabularies (next power of two) up to the 8192 cap;
            # every flag combination with int64 targets, the plain forward with int32 ones
            for block in (128, 1024, FWD_BLOCK):
                for smoothing in (False, True) if tdtype == "i64" else (False,):
                    for in_place in (False, True) if tdtype == "i64" else (False,):
                        consts = dict(
                            BLOCK=block, SMOOTHING=smoothing, GRAD_IN_PLACE=in_place, ACC=tl.float32
                        )
                        sig = {
                            "logits_ptr": f"*{dtype}",
                            "target_ptr": f"*{tdtype}",
                            "loss_ptr": "*fp32",
                            "lse_ptr": "*fp32",
                            "stride": "i32",
                            "V": "i32",
                            "ignore_index": "i32",
                            "label_smoothing": "fp32",
                            "z_loss": "fp32",
                            **{k: "constexpr" for k in consts},
                        }
                        cases.append(
                            dict(
                                name=f"cross_entropy_fwd_{dtype}_{tdtype}_B{block}_ls{int(smoothing)}_ip{int(in_place)}",
                                fn=_cross_entropy_fwd_kernel,
                                signature=sig,
                                constexprs=consts,
                                num_warps=num_warps_for(block),
                                num_stages=3,
                            )
                        )
            for block in (128, 1024, BWD_BLOCK) if tdtype == "i64" else (BWD_BLOCK,):
                consts = dict(BLOCK=block, ACC=tl.float32)
                sig = {
                    "dloss_ptr": "*fp32",
                    "logits_ptr": f"*{dtype}",
                    "target_ptr": f"*{tdtype}",
                    "lse_ptr": "*fp32",
                    "dlogits_ptr": f"*{dtype}",
                    "stride": "i32",
                    "out_stride": "i32",
                    "V": "i32",
                    "ignore_index": "i32",
                    "label_smoothing": "fp32",
                    "z_loss": "fp32",
                    **{k: "constexpr" for k in consts},
                }
                cases.append(
                    dict(
                        name=f"cross_entropy_bwd_{dtype}_{tdtype}_B{block}",
                        fn=_cross_entropy_bwd_kernel,
                        signature=sig,
                        constexprs=consts,
                        num_warps=num_warps_for(block),
                        num_stages=3,
                    )
                )
    return cases


COMPILE_CASES = with_alignment(_compile_cases())
