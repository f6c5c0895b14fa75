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
element before writing it); `cross_entropy_bwd_inplace` is that for ops.cross_entropy's inplace_backward=True.
The public flag writes in the backward, not the forward: the memory saved is the same (the logits' buffer
becomes dlogits either way), but only the backward knows dloss. A forward that wrote d loss.sum() would need a
further pass to scale it by dloss, and in fp16/bf16 it would round twice, which the tolerance rule does not
allow; and the logits would be gone right after the forward, before a caller reads them.

Out-of-range targets (not ignore_index and outside [0, V)): the kernels never read them. The row's loss is NaN
and its gradient row is NaN, so the error cannot pass as a finite loss (checking on a GPU would need a host
sync). On CPU tensors (the interpreter) the pair raises an IndexError first, as every backend does on the CPU.

Dtypes: logits fp32/fp16/bf16 with fp32 math, loss/lse fp32; fp64 logits are supported and run in fp64 with
fp64 loss/lse, but on GPUs label_smoothing and z_loss arrive as fp32 scalars, so they are exact only when fp32
represents them (0.25, 0.125, ...). Targets int32 or int64. Row offsets are int64, so M * V beyond 2^31
(32k rows x 128k vocab) indexes correctly.
"""

import functools

import torch
import triton
import triton.language as tl

from gptfast.ops import _checks

from . import _tuning
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
    ROWS_BUCKET,
    BLOCK: tl.constexpr,
    SMOOTHING: tl.constexpr,
    GRAD_IN_PLACE: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid (M,). ROWS_BUCKET (M's power of two) only keys the autotuner."""
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
    col_start,
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss,
    ROWS_BUCKET,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid (M, cdiv(n_cols, BLOCK)) over the vocab columns [col_start, col_start + n_cols) of V, held at
    column 0 of each row of logits and dlogits. ROWS_BUCKET only keys the autotuner."""
    row = tl.program_id(0).to(tl.int64)
    local = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    c = col_start + local
    label_smoothing = label_smoothing + tl.zeros((), ACC)
    z_loss = z_loss + tl.zeros((), ACC)
    t = tl.load(target_ptr + row).to(tl.int64)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= V))
    lse = tl.load(lse_ptr + row).to(ACC)
    # dx_j = dloss * (p_j (1 + 2 z lse) - (1 - eps) [j == t] - eps / V); ignored rows are 0 and never read
    scale = tl.where(valid, tl.load(dloss_ptr + row).to(ACC), 0.0)
    x = tl.load(logits_ptr + row * stride + local, mask=local < tl.where(valid, n_cols, 0), other=0.0).to(ACC)
    g = _row_grad(x, c, t, lse, 1.0 + 2.0 * z_loss * lse, scale, valid, bad, V, label_smoothing)
    tl.store(dlogits_ptr + row * out_stride + local, g.to(dlogits_ptr.dtype.element_ty), mask=local < n_cols)


# ---------------------------------------------------------------------------------------------- launchers
# (BLOCK, num_warps) the GPU autotuner times beside the default (BLOCK = min(next_pow2(V), default block) at
# num_warps_for(BLOCK)). One program per row holds few rows in flight per SM when the row's block is wide and
# its warps many; smaller blocks on fewer warps keep more rows' loads in flight, at more loop steps (forward)
# or programs (backward) per row. 8 to 32 values a thread, which ptxas builds without spills.
_FWD_TRIES = ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16))
_BWD_TRIES = ((2048, 4), (4096, 4), (8192, 8), (8192, 16))


def _bucket(n) -> int:
    """n's power-of-two bucket, for autotune keys; 0 for a symbolic size (torch.compile with dynamic shapes),
    which int() would specialise."""
    return _tuning.next_power_of_2(max(n, 1)) if isinstance(n, int) else 0


@functools.lru_cache(maxsize=1024)
def _candidates(V: int, default_block: int, tries) -> tuple[dict, ...]:
    """The default config first, then the tries whose block does not pass the padded vocab (cached: built
    on every launch, they cost 5 us of host time; read-only)."""
    padded = _tuning.next_power_of_2(max(int(V), 1))  # the block depends on V, so V is specialised anyway
    first = min(padded, default_block)
    configs = [dict(BLOCK=first, num_warps=num_warps_for(first))]
    configs += [dict(BLOCK=b, num_warps=w) for b, w in tries if b <= padded]
    return tuple(_tuning.unique(configs))


def _rows_contiguous(t: torch.Tensor) -> bool:
    # A one-column tensor's column stride is arbitrary (torch calls it contiguous whatever it is), and the
    # kernels never step along it.
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def _check_rows(logits: torch.Tensor) -> torch.Tensor:
    # Rows may be strided (a slice of a wider buffer); each row must be contiguous.
    return logits if _rows_contiguous(logits) else logits.contiguous()


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
    if grad_in_place and not _rows_contiguous(logits):
        raise ValueError("cross_entropy_forward: grad_in_place needs logits with contiguous rows")
    logits = _check_rows(logits)
    M, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = logits.new_empty(M, dtype=acc) if loss is None else loss
    lse = logits.new_empty(M, dtype=acc) if lse is None else lse
    if M == 0:
        return loss, lse
    args = (logits, target, loss, lse, logits.stride(0), V, ignore_index, label_smoothing, z_loss, _bucket(M))
    flags = dict(SMOOTHING=label_smoothing > 0.0, GRAD_IN_PLACE=grad_in_place, ACC=acc_dtype(logits.dtype))
    # The in-place forward is never timed against itself: each timing run would overwrite the logits again.
    cands = _candidates(int(V), FWD_BLOCK, _FWD_TRIES) if block is None and not grad_in_place else ()
    if len(cands) > 1 and _tuning.enabled():
        tuned = _tuning.autotuned(_cross_entropy_fwd_kernel, cands, ["V", "ROWS_BUCKET", "SMOOTHING"])
        launch(tuned)[(M,)](*args, **flags)
    else:
        block = block or min(_tuning.next_power_of_2(V), FWD_BLOCK)
        launch(_cross_entropy_fwd_kernel)[(M,)](*args, BLOCK=block, **flags, num_warps=num_warps_for(block))
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
    col_start: int = 0,
    vocab: int | None = None,
) -> torch.Tensor:
    """dlogits[M, n] from the saved lse[M]; out=logits computes it in place.

    logits[M, n] are the vocab columns [col_start, col_start + n) of a vocab of `vocab` classes (default: all
    n of them): linear_cross_entropy's weight-gradient pass hands over one vocab slice at a time."""
    if out is not None and not _rows_contiguous(out):
        raise ValueError("cross_entropy_backward: out needs contiguous rows")
    logits = _check_rows(logits)
    M, n = logits.shape
    V = n if vocab is None else vocab
    if col_start < 0 or col_start + n > V:
        raise ValueError(f"cross_entropy_backward: columns [{col_start}, {col_start + n}) lie outside V={V}")
    # Only a fresh output is autotuned: out=logits is in place, which timing runs would compound.
    cands = _candidates(int(n), BWD_BLOCK, _BWD_TRIES) if block is None and out is None else ()
    out = torch.empty_like(logits) if out is None else out
    if M == 0 or n == 0:
        return out
    args = (dloss.contiguous(), logits, target, lse.contiguous(), out, logits.stride(0), out.stride(0), V)
    args += (col_start, n, ignore_index, label_smoothing, z_loss, _bucket(M))
    acc = acc_dtype(logits.dtype)
    if len(cands) > 1 and _tuning.enabled():
        tuned = _tuning.autotuned(_cross_entropy_bwd_kernel, cands, ["V", "n_cols", "ROWS_BUCKET"])
        launch(tuned)[lambda meta: (M, triton.cdiv(n, meta["BLOCK"]))](*args, ACC=acc)
    else:
        block = block or min(_tuning.next_power_of_2(n), BWD_BLOCK)
        launch(_cross_entropy_bwd_kernel)[(M, triton.cdiv(n, block))](
            *args, BLOCK=block, ACC=acc, num_warps=num_warps_for(block)
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


def cross_entropy_bwd_inplace(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """cross_entropy_bwd's dlogits written over the (contiguous) logits[M, V]."""
    _checks.contiguous_matrix("cross_entropy_bwd_inplace", "logits", logits)
    cross_entropy_backward(
        dloss, logits, target.contiguous(), lse, ignore_index, label_smoothing, z_loss, out=logits
    )


# ---------------------------------------------------------------------------------- sm_90a compile grid
_SCALARS = {
    "V": "i32",
    "ignore_index": "i32",
    "label_smoothing": "fp32",
    "z_loss": "fp32",
    "ROWS_BUCKET": "i32",
}


def _fwd_case(dtype, tdtype, block, num_warps, smoothing=False, in_place=False) -> dict:
    consts = dict(BLOCK=block, SMOOTHING=smoothing, GRAD_IN_PLACE=in_place, ACC=tl.float32)
    pointers = {"logits_ptr": f"*{dtype}", "target_ptr": f"*{tdtype}"}
    pointers.update(loss_ptr="*fp32", lse_ptr="*fp32")
    return dict(
        name=f"cross_entropy_fwd_{dtype}_{tdtype}_B{block}w{num_warps}_ls{int(smoothing)}_ip{int(in_place)}",
        fn=_cross_entropy_fwd_kernel,
        signature={**pointers, "stride": "i32", **_SCALARS, **{k: "constexpr" for k in consts}},
        constexprs=consts,
        num_warps=num_warps,
        num_stages=3,
    )


def _bwd_case(dtype, tdtype, block, num_warps) -> dict:
    consts = dict(BLOCK=block, ACC=tl.float32)
    pointers = {
        "dloss_ptr": "*fp32",
        "logits_ptr": f"*{dtype}",
        "target_ptr": f"*{tdtype}",
        "lse_ptr": "*fp32",
        "dlogits_ptr": f"*{dtype}",
    }
    strides = {"stride": "i32", "out_stride": "i32"}
    scalars = {"V": "i32", "col_start": "i32", "n_cols": "i32", **_SCALARS}
    return dict(
        name=f"cross_entropy_bwd_{dtype}_{tdtype}_B{block}w{num_warps}",
        fn=_cross_entropy_bwd_kernel,
        signature={**pointers, **strides, **scalars, **{k: "constexpr" for k in consts}},
        constexprs=consts,
        num_warps=num_warps,
        num_stages=3,
    )


def _compile_cases() -> list[dict]:
    """The default blocks for every dtype, target dtype and flag combination (small vocabularies, their next
    power of two, up to the caps), and every autotune try in bf16."""
    cases = []
    for dtype in ("fp32", "fp16", "bf16"):
        for tdtype in ("i64", "i32"):
            # every flag combination with int64 targets, the plain forward with int32 ones
            flags = [(a, b) for a in (False, True) for b in (False, True)] if tdtype == "i64" else [(0, 0)]
            for block in (128, 1024, FWD_BLOCK):
                for smoothing, in_place in flags:
                    cases.append(
                        _fwd_case(dtype, tdtype, block, num_warps_for(block), bool(smoothing), bool(in_place))
                    )
            for block in (128, 1024, BWD_BLOCK) if tdtype == "i64" else (BWD_BLOCK,):
                cases.append(_bwd_case(dtype, tdtype, block, num_warps_for(block)))
    cases += [_fwd_case("bf16", "i64", b, w) for b, w in _FWD_TRIES]
    cases += [_bwd_case("bf16", "i64", b, w) for b, w in _BWD_TRIES]
    return cases


COMPILE_CASES = with_alignment(_compile_cases())
