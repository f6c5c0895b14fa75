"""ops.linear_cross_entropy: cross_entropy(hidden @ weight.T + bias, target) without the full logits.

Two autograd paths over the backend's pair:
- fp32/fp64 inputs, reduction 'mean'/'sum', with gradients: the forward also computes the gradients, chunk by
  chunk, while each chunk's logits are in hand (no recompute); the backward only scales them by the incoming
  scalar gradient.
- otherwise (reduction 'none', no gradients, or fp16/bf16 inputs): the forward keeps only the row LSEs and
  the backward recomputes the logits, turning them into dlogits for the incoming per-row gradient. A per-row
  gradient cannot be applied to an already-summed dweight. For fp16/bf16 inputs the first path would round
  dhidden and dweight once more than torch does (scaled after their rounding to the input dtype: up to 1.2x
  the tolerance rule's bound in the long hypothesis runs), and over several chunks hold a (V, H) fp32
  dweight accumulator, which the triton and cuda backends avoid (where it saves memory) by taking dweight by
  vocab slices once every row's lse is known (takes_vocab_slices, kernels/linear_cross_entropy.py). The
  price is one more logits-sized matmul (four, against unfused torch's three).
"""
import math

import torch
from torch import Tensor

from . import _checks, _library
from .cross_entropy import check_options, check_target, reduce, result_dtype, sum_rows

OP = "linear_cross_entropy"


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fake_fwd(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, chunk_size, with_grad):
    rows = hidden.new_empty(hidden.shape[0], dtype=_acc(hidden))
    if not with_grad:
        return rows, torch.empty_like(rows), rows.new_empty(0), rows.new_empty(0), rows.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else rows.new_empty(0)
    return rows, torch.empty_like(rows), torch.empty_like(hidden), torch.empty_like(weight), dbias


def _fake_bwd(dloss, hidden, weight, target, bias, lse, ignore_index, label_smoothing, z_loss, chunk_size):
    dbias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0, dtype=_acc(hidden))
    return torch.empty_like(hidden), torch.empty_like(weight), dbias


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, *ctx.options, _with_grad = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, target, bias, output[1])


def _backward(ctx, bwd, dloss, *_unused):
    hidden, weight, target, bias, lse = ctx.saved_tensors
    dh, dw, db = bwd(dloss.contiguous(), hidden, weight, target, bias, lse, *ctx.options)
    return dh, dw, None, db if ctx.has_bias else None, None, None, None, None, None


_REDUCED_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, float label_smoothing,"
    " float z_loss, int chunk_size, bool mean) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _register_reduced(backend: str, fwd) -> None:
    """gptfast::linear_cross_entropy_reduced_<backend>: (loss, dhidden, dweight, dbias) of the reduced loss."""
    qualname = f"gptfast::{OP}_reduced_{backend}"

    def impl(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, chunk_size, mean):
        rows, _, dh, dw, db = fwd(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, chunk_size, True)
        total = sum_rows(rows)
        if mean:
            count = (target != ignore_index).sum().to(rows.dtype)
            # With every row ignored torch's mean is 0 / 0 = NaN but its gradients are 0: the gradients here
            # are 0 then too, and scaling them by 1 / 0 would make them NaN.
            loss, scale = total / count, 1.0 / count.clamp_min(1)
        else:
            loss, scale = total, rows.new_ones(())
        # The gradients are fresh buffers owned by this op: scale them in place rather than copy weight-sized ones.
        return loss, dh.mul_(scale), dw.mul_(scale), db.mul_(scale)

    def fake(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, chunk_size, mean):
        dbias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0, dtype=_acc(hidden))
        return hidden.new_empty((), dtype=_acc(hidden)), torch.empty_like(hidden), torch.empty_like(weight), dbias

    def setup_context(ctx, inputs, output):
        ctx.has_bias = inputs[3] is not None
        ctx.save_for_backward(*output[1:], inputs[0], inputs[1], inputs[3])

    def backward(ctx, dloss, *_unused):
        dh, dw, db, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            dh, dw, db = _TakenInForward.apply(dh, dw, db, *inputs)
        g = dloss.to(dh.dtype)
        return dh * g, dw * g, None, (db * g) if ctx.has_bias else None, None, None, None, None, None

    op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=_REDUCED_SCHEMA)
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)


class _TakenInForward(torch.autograd.Function):
    """The reduced op's gradients (dh, dw, db), as outputs that depend on (hidden, weight, bias).

    They were computed in the forward, so a create_graph=True graph over them alone would treat them as
    constants: their derivative with respect to hidden, weight or bias would be silently zero. Through this
    node it raises instead, while the derivative with respect to the upstream gradient (dloss), which is
    exact, stays available (torch.autograd.functional.jvp and hvp-style double backward through dloss)."""

    @staticmethod
    def forward(ctx, dh, dw, db, *inputs):
        return dh.view_as(dh), dw.view_as(dw), db.view_as(db)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{OP}: the gradients of a reduced loss are computed in its forward and have no derivative with "
            "respect to hidden, weight or bias (double backward through gptfast ops is not supported)"
        )


_library.register_spec(_library.OpSpec(OP, _fake_fwd, _fake_bwd, _setup_context, _backward, _register_reduced))


MIN_SLICE = 256  # vocab columns a slice has at least, so that its GEMMs stay wide


def slice_columns(rows: int, vocab: int, chunk_size: int) -> int:
    """Columns per vocab slice: (rows, slice) logits about the size of the (chunk_size, V) token-pass ones."""
    return max(1, min(vocab, max(MIN_SLICE, chunk_size * vocab // max(rows, 1))))


def takes_vocab_slices(rows: int, hidden: int, vocab: int, chunk_size: int, dtype: torch.dtype) -> bool:
    """Whether fp16/bf16 gradients are taken by vocab slices (kernels/linear_cross_entropy.py) in the backward
    of the triton and cuda backends; csrc/cuda/linear_cross_entropy_binding.cpp has the same rule.

    Only several chunks of fp16/bf16 rows need a wider dweight accumulator at all, and slices are taken where
    they hold less. Beyond the gradients, in 2-byte units: summing over token chunks holds the (V, H) fp32
    accumulator (2 V H) and (chunk, V) logits; slices hold the (M, H) fp32 dhidden accumulator (2 M H) and
    (M, slice) logits. So slices win when M (2 H + slice) < V (2 H + chunk): at 8k tokens x 4096 x 128k by
    6x, and not once M passes about V.
    """
    if dtype not in (torch.float16, torch.bfloat16) or rows <= chunk_size:
        return False
    cols = slice_columns(rows, vocab, chunk_size)
    return rows * (2 * hidden + cols) < vocab * (2 * hidden + chunk_size)


GPU_MIN_CHUNK = 1024


def default_chunk_size(rows: int, vocab: int, hidden: int, device: torch.device | None = None) -> int:
    """Liger's rule: about as many chunks as vocab/hidden, so a chunk's logits are about the size of hidden.

    On CUDA at least GPU_MIN_CHUNK rows: where dweight is summed over token chunks (fp32 inputs, or half ones
    with more tokens than classes: takes_vocab_slices), every chunk reads and writes the whole (V, H)
    accumulator, so at 8k tokens, H=4096, V=128k the rule's 256-row chunks would move 32 x 4.2 GB of fp32
    accumulator traffic (about 31 ms at an H200's measured 4.3 TB/s, by count, not timed), while 1024-row
    chunks move a quarter of it and hold only 1024 * V more logits. Vocab slices take their width from it.
    """
    chunks = max(1, math.ceil(vocab / max(hidden, 1)))
    size = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(rows / chunks)))))
    if device is not None and device.type == "cuda":
        size = max(size, GPU_MIN_CHUNK)
    return max(1, min(rows, size))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, chunk_size: int | None = None,
                         out_dtype: torch.dtype | None = None, backend: str | None = None) -> Tensor:
    """cross_entropy(hidden @ weight.T + bias, target, ...) holding about chunk_size * V logits at once.

    hidden: (N, H) or (B, T, H); weight: (V, H); bias: (V,) or None; target: (N,) or (B, T) int64/int32.
    Same options, result and target contract (out-of-range targets, ignored rows) as ops.cross_entropy on the
    full logits. The logits are live chunk_size rows at a time (default: Liger's rule, about N * H / V rows,
    at least 1024 on CUDA), or in the fp16/bf16 backward of the triton and cuda backends N rows of a vocab
    slice of about as many elements (at least 256 columns; takes_vocab_slices), so peak extra memory is
    O(chunk_size * V) plus the gradients and one fp32 accumulator: dweight's or, with slices, dhidden's. The
    result's dtype follows ops.cross_entropy's rule (hidden's, float32 for fp16/bf16 under autocast, or
    out_dtype).
    """
    op = OP
    _checks.tensor(op, "hidden", hidden)
    _checks.tensor(op, "weight", weight)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{op}: hidden must be (N, H) or (B, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: weight must be (V, {hidden.shape[-1]}) to match hidden's last dim, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must have at least one row (class), got shape {tuple(weight.shape)}")
    _checks.same_dtype(op, hidden=hidden, weight=weight)
    if bias is not None:
        _checks.tensor(op, "bias", bias)
        _checks.same_dtype(op, hidden=hidden, bias=bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    device = _checks.same_device(op, hidden=hidden, weight=weight, bias=bias)
    check_target(op, target, hidden, "hidden")
    ignore_index, ls, z = check_options(op, ignore_index, reduction, label_smoothing, z_loss)
    dtype = result_dtype(op, hidden, out_dtype)
    h2 = _library.as_rows(hidden)
    t1 = target.reshape(-1).contiguous()
    rows, vocab = h2.shape[0], weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(rows, vocab, h2.shape[1], device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{op}: chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    elif chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size}")
    name = _library.resolve(op, device, backend, label_smoothing=ls, z_loss=z)
    weight, bias = weight.contiguous(), bias.contiguous() if bias is not None else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    half = h2.dtype in (torch.float16, torch.bfloat16)
    if needs_grad and reduction != "none" and rows > 0 and not half:
        reduced = getattr(torch.ops.gptfast, f"{OP}_reduced_{name}")
        loss, *_ = reduced(h2, weight, t1, bias, ignore_index, ls, z, chunk_size, reduction == "mean")
        return loss.to(dtype)
    loss_rows, *_ = _library.call(op, name, h2, weight, t1, bias, ignore_index, ls, z, chunk_size, False)
    return reduce(loss_rows, target, ignore_index, reduction).to(dtype)
