"""ops.softmax: softmax(scale * x) along `dim`, optionally with a causal mask, on any backend."""
import torch
from torch import Tensor

from . import _checks, _library


def _fake_fwd(x, scale, causal_rows):
    return torch.empty_like(x)


def _fake_bwd(dy, y, scale, causal_rows):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    _, ctx.scale, ctx.causal_rows = inputs
    ctx.save_for_backward(output)


def _backward(ctx, bwd, dy):
    (y,) = ctx.saved_tensors
    return bwd(dy.contiguous(), y, ctx.scale, ctx.causal_rows), None, None


_library.register_spec(_library.OpSpec("softmax", _fake_fwd, _fake_bwd, _setup_context, _backward))


def softmax(x: Tensor, dim: int = -1, *, scale: float | None = None, causal: bool = False,
            backend: str | None = None) -> Tensor:
    """softmax(scale * x) along `dim`, in x's dtype with fp32 math inside.

    causal=True masks x[..., i, j] for j > i, where the last two dims are the (L, S) score matrix (top-left
    aligned, as torch's is_causal); it needs dim to be the last dim. A fully masked row returns zeros, never NaN.
    """
    op = "softmax"
    _checks.tensor(op, "x", x)
    if not -x.dim() <= dim < max(x.dim(), 1):
        raise IndexError(f"{op}: dim must be in [{-x.dim()}, {max(x.dim(), 1) - 1}] for a {x.dim()}-d x, got {dim}")
    dim = dim % max(x.dim(), 1)
    scale = 1.0 if scale is None else _checks.number(op, "scale", scale, -float("inf"), float("inf"))
    if causal and (x.dim() < 2 or dim != x.dim() - 1):
        raise ValueError(
            f"{op}: causal=True needs x with >= 2 dims and dim=-1 (the key axis of an (L, S) score matrix), "
            f"got x.dim()={x.dim()} and dim={dim}"
        )
    name = _library.resolve(op, x.device, backend)
    # The usual case, a contiguous (rows, columns) x along its last dim, takes no view (see as_rows).
    xt = (x.movedim(dim, -1) if dim != x.dim() - 1 else x) if x.dim() else x.reshape(1)
    # reshape(-1, 0) is ambiguous: rows of no columns are (0, 0), as is the result before its reshape back.
    rows = _library.as_rows(xt) if xt.shape[-1] else xt.reshape(0, 0)
    y = _library.call(op, name, rows, scale, x.shape[-2] if causal else 0)
    if y.shape != xt.shape:
        y = y.reshape(xt.shape)
    if xt is not x:
        y = y.movedim(-1, dim) if x.dim() else y.reshape(x.shape)
    return y
