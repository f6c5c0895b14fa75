"""ops.cross_entropy: F.cross_entropy over class-last logits, with z_loss, on any backend."""

import torch
from torch import Tensor

from . import _checks, _library

REDUCTIONS = ("mean", "sum", "none")


def _fake_fwd(logits, target, ignore_index, label_smoothing, z_loss):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc)


def _fake_bwd(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, ctx.ignore_index, ctx.label_smoothing, ctx.z_loss = inputs
    ctx.save_for_backward(logits, target, output[1])


def _backward(ctx, bwd, dloss, _dlse):
    logits, target, lse = ctx.saved_tensors
    dlogits = bwd(dloss.contiguous(), logits, target, lse, ctx.ignore_index, ctx.label_smoothing, ctx.z_loss)
    return dlogits, None, None, None, None


def _fake_bwd_inplace(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss) -> None:
    return None


_library.register_spec(
    _library.OpSpec(
        "cross_entropy", _fake_fwd, _fake_bwd, _setup_context, _backward,
        extras=(("bwd_inplace", _fake_bwd_inplace),),
    )
)


class _InplaceBackward(torch.autograd.Function):
    """The backend's forward, and a backward that writes dlogits over the saved logits instead of a new
    (M, V) buffer. The in-place op bumps the logits' version counter, so anything else in the graph that
    saved these logits and runs its backward later (or a second backward through a retained graph) fails
    autograd's check rather than reading gradients. It has no double backward: a create_graph=True backward
    raises, rather than hand on a gradient that a second differentiation would treat as constant."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, backend):
        options = (ignore_index, label_smoothing, z_loss)
        loss_rows, lse = _library.call("cross_entropy", backend, logits, target, *options)
        ctx.save_for_backward(logits, target, lse)
        ctx.options, ctx.backend = options, backend
        return loss_rows

    @staticmethod
    def backward(ctx, dloss):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "cross_entropy: inplace_backward=True has no double backward, and this backward was asked to "
                "build one (create_graph=True); use inplace_backward=False where the gradient is "
                "differentiated"
            )
        logits, target, lse = ctx.saved_tensors
        bwd_inplace = _library.fwd("cross_entropy", ctx.backend, "bwd_inplace")
        bwd_inplace(dloss.contiguous(), logits, target, lse, *ctx.options)
        return logits.detach(), None, None, None, None, None  # the storage, without the forward's grad_fn


def check_target(op: str, target, input: Tensor, input_name: str = "input") -> Tensor:
    """target: index dtype, the shape of input's rows (all dims but the last), on input's device."""
    _checks.tensor(op, "target", target, _checks.INDEX_DTYPES)
    if target.shape != input.shape[:-1]:
        expected, got = tuple(input.shape[:-1]), tuple(target.shape)
        raise ValueError(f"{op}: target must have shape {expected} to match {input_name}, got {got}")
    _checks.same_device(op, **{input_name: input, "target": target})
    return target


def check_options(op: str, ignore_index, reduction, label_smoothing, z_loss) -> tuple[int, float, float]:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    _checks.choice(op, "reduction", reduction, REDUCTIONS)
    ls = _checks.number(op, "label_smoothing", label_smoothing, 0.0, 1.0)
    z = _checks.number(op, "z_loss", z_loss, 0.0, float("inf"))
    return ignore_index, ls, z


def sum_rows(loss_rows: Tensor) -> Tensor:
    """The sum of the fp32 row losses, added in fp64 and rounded once: the rows are cheap to add (M values),
    and an fp32 sum of thousands of them would put an error of its own on top of the kernels' (torch's fp32
    sum; a loss compared by design.md's rule with torch's is then at the mercy of the summation order)."""
    if loss_rows.device.type == "mps":  # no float64 there
        return loss_rows.sum()
    return loss_rows.sum(dtype=torch.float64).to(loss_rows.dtype)


def reduce(loss_rows: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Row losses to the requested reduction, on device, with no host sync. 'mean' over non-ignored rows."""
    if reduction == "none":
        return loss_rows if loss_rows.shape == target.shape else loss_rows.reshape(target.shape)
    total = sum_rows(loss_rows)
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum()


def result_dtype(op: str, input: Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    """The loss's dtype: out_dtype when given; float32 for half-precision input under autocast (torch's
    autocast runs cross_entropy in float32, and these custom ops are outside its lists); else input's dtype,
    as torch."""
    if out_dtype is not None:
        if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
            raise TypeError(f"{op}: out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
        return out_dtype
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type):
        return torch.float32
    return input.dtype


def cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    out_dtype: torch.dtype | None = None,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Cross-entropy of class-last logits, as torch.nn.functional.cross_entropy, plus PaLM's z_loss.

    input: (C,), (N, C) or (B, T, C) logits, fp32/fp16/bf16/fp64. target: (), (N,) or (B, T) int64/int32
    class indices; rows whose target is ignore_index contribute nothing. Per row:
        loss = (1 - eps) * (lse - x[t]) + eps * (lse - mean(x)) + z_loss * lse^2,   lse = logsumexp(x)
    'mean' divides by the number of non-ignored rows (NaN when all are ignored, as torch); 'none' returns
    target's shape. The result has input's dtype (float32 for fp16/bf16 input under autocast, as torch's
    autocast gives), or out_dtype: the row losses are fp32 inside, so out_dtype=torch.float32 reports a
    half-precision model's loss unrounded, without upcasting its logits (as transformers' loss does).

    A target outside [0, C) that is not ignore_index raises IndexError on CPU tensors (every backend). On CUDA
    tensors the triton and cuda kernels give that row a NaN loss and a NaN gradient row instead (no host sync,
    no device-side assert); the reference backend hits gather's device-side assert, as torch does. A row whose
    target is ignore_index gets a zero gradient, even when its logits hold NaN or inf.

    inplace_backward=True (off by default) saves the (N, C) gradient buffer, the largest allocation of an LM
    loss: the triton, cuda and cpu backends write d loss / d input over input itself (or over its contiguous
    copy, when input is not contiguous) and hand that storage on as the gradient; the reference backend, a
    spec, computes the same values out of place and copies them there. Values and gradients are the same as
    without it. Until the backward, input is untouched, so reading the logits after the forward (accuracy,
    sampling) is safe; after it their contents are unspecified (the gradient, where it was written in place),
    and the gradient may share their storage with the .grad of a leaf reached through ops that pass gradients
    through unchanged (clone, an add). input must not be a leaf that requires grad, nor a view of one. If
    something else in the graph saved input and runs its backward later, or a retained graph is run backward
    twice, autograd raises its in-place modification error. Under saved-tensor hooks (non-reentrant
    activation checkpointing, save_on_cpu), which skip that check, the backward stays out of place. A
    create_graph=True backward through it raises: it has no double backward.
    """
    op = "cross_entropy"
    _checks.tensor(op, "input", input)
    if input.dim() not in (1, 2, 3):
        raise ValueError(
            f"{op}: input must be (C,), (N, C) or (B, T, C) logits, got shape {tuple(input.shape)}"
        )
    check_target(op, target, input)
    ignore_index, ls, z = check_options(op, ignore_index, reduction, label_smoothing, z_loss)
    dtype = result_dtype(op, input, out_dtype)
    if input.shape[-1] == 0:
        raise ValueError(f"{op}: input must have at least one class, got shape {tuple(input.shape)}")
    inplace = _check_inplace(op, inplace_backward, input)
    name = _library.resolve(op, input.device, backend, label_smoothing=ls, z_loss=z)
    logits = _library.as_rows(input)
    rows_target = target.reshape(-1).contiguous()
    if inplace:
        loss_rows = _InplaceBackward.apply(logits, rows_target, ignore_index, ls, z, name)
    else:
        loss_rows, _ = _library.call(op, name, logits, rows_target, ignore_index, ls, z)
    return reduce(loss_rows, target, ignore_index, reduction).to(dtype)


def _check_inplace(op: str, inplace_backward, input: Tensor) -> bool:
    """Whether this call takes the in-place backward: asked for, a gradient will flow into input, and
    autograd can check the saved logits' version. Saved-tensor hooks (non-reentrant activation checkpointing,
    save_on_cpu, offloading) skip that check, so under them the backward stays out of place: the same values,
    without the saving, rather than another node silently reading overwritten logits."""
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"{op}: inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if not (inplace_backward and input.requires_grad and torch.is_grad_enabled()):
        return False
    root = input if input._base is None else input._base
    if root.is_leaf:
        what = "a leaf" if root is input else f"a view of shape {tuple(input.shape)} of a leaf"
        raise ValueError(
            f"{op}: inplace_backward=True writes the gradient over input, so input must be computed (a "
            "model's logits), not a leaf tensor that requires grad or a view of one, whose .grad would then "
            f"be its own storage; got {what} of shape {tuple(root.shape)}"
        )
    return not _saved_tensor_hooks_active()


def _saved_tensor_hooks_active() -> bool:
    # torch.compile traces saved tensors itself (its backward graph holds them), so the check is eager-only.
    if torch.compiler.is_compiling():
        return False
    top = torch._C._autograd._top_saved_tensors_default_hooks
    try:
        return top(False) is not None  # False: not ignoring hooks while tracing (torch >= 2.5's signature)
    except TypeError:
        return top() is not None
