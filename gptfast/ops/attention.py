"""ops.scaled_dot_product_attention: torch's SDPA contract, with FlashAttention-style kernels behind it."""
import math

import torch
from torch import Tensor

from . import _checks, _library

OP = "attention"


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fake_fwd(q, k, v, attn_mask, dropout_p, is_causal, scale, rng):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    return out, q.new_empty(q.shape[:-1], dtype=_acc(q))


def _fake_bwd(dout, q, k, v, attn_mask, out, lse, dropout_p, is_causal, scale, rng):
    # Every backend returns contiguous gradients, whatever the strides of the q/k/v views.
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, rng = inputs
    ctx.save_for_backward(q, k, v, attn_mask, output[0], output[1], rng)


def _backward(ctx, bwd, dout, _dlse):
    q, k, v, attn_mask, out, lse, rng = ctx.saved_tensors
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq, dk, dv = bwd(dout, q, k, v, attn_mask, out, lse, ctx.dropout_p, ctx.is_causal, ctx.scale, rng)
    return dq, dk, dv, None, None, None, None, None


_library.register_spec(_library.OpSpec(OP, _fake_fwd, _fake_bwd, _setup_context, _backward))


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, backend: str | None = None) -> Tensor:
    """softmax(query @ key^T * scale + mask) @ value, exactly as torch.nn.functional.scaled_dot_product_attention.

    query (B, Hq, L, D), key (B, Hk, S, D), value (B, Hk, S, Dv) -> (B, Hq, L, Dv); the batch dim may be left
    out. Hk == Hq unless enable_gqa, which lets Hk divide Hq (query head h reads kv head h // (Hq // Hk)).
    is_causal keeps key j for query i when j <= i: the mask is top-left aligned, tril(ones(L, S)), as in torch,
    so with L < S the last queries do not see the last keys. attn_mask: bool (True = attend) or a float added
    to the scores, broadcastable to (B, Hq, L, S); not together with is_causal. scale defaults to 1/sqrt(D).
    A query row with no key left returns zeros. dropout_p drops attention probabilities with an RNG seeded
    from torch's default generator, so torch.manual_seed makes it reproducible.

    Under gptfast.backends.deterministic(True) (or torch.use_deterministic_algorithms(True)) a call that needs
    gradients runs on a backend whose backward is bitwise reproducible: every one but 'cuda', whose backward
    adds dQ with fp32 atomics; automatic selection skips it, and asking for it by name raises.
    """
    op = "scaled_dot_product_attention"
    for n, t in (("query", query), ("key", key), ("value", value)):
        _checks.tensor(op, n, t)
        if t.dim() not in (3, 4):
            raise ValueError(f"{op}: {n} must be (B, H, L, D) or (H, L, D), got shape {tuple(t.shape)}")
    if not query.dim() == key.dim() == value.dim():
        raise ValueError(
            f"{op}: query, key and value must have the same number of dims, got "
            f"{query.dim()}, {key.dim()} and {value.dim()}"
        )
    _checks.same_dtype(op, query=query, key=key, value=value)
    device = _checks.same_device(op, query=query, key=key, value=value, attn_mask=attn_mask)
    unbatched = query.dim() == 3
    q, k, v = (t.unsqueeze(0) if unbatched else t for t in (query, key, value))
    B, Hq, L, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{op}: key and value batch must equal query's ({B}), got {k.shape[0]} and {v.shape[0]}")
    if k.shape[-1] != D:
        raise ValueError(f"{op}: key head dim must equal query's ({D}), got {k.shape[-1]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"{op}: key and value must have the same heads and length, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    Hk, S = k.shape[1], k.shape[2]
    if Hk != Hq and not (enable_gqa and Hk > 0 and Hq % Hk == 0):
        raise ValueError(
            f"{op}: query heads ({Hq}) must equal key/value heads ({Hk}), or be a multiple of them with "
            f"enable_gqa=True; got enable_gqa={enable_gqa}"
        )
    dropout_p = _checks.number(op, "dropout_p", dropout_p, 0.0, 1.0, high_open=True)
    if scale is None:
        # With an empty head dim every score is 0 whatever the scale: each query averages the values (torch).
        scale = 1.0 / math.sqrt(D) if D else 1.0
    else:
        scale = _checks.number(op, "scale", scale, -math.inf, math.inf)
    mask = None
    if attn_mask is not None:
        if is_causal:
            raise ValueError(f"{op}: pass either attn_mask or is_causal=True, not both (as torch)")
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype not in (torch.bool, q.dtype):
            got = attn_mask.dtype if isinstance(attn_mask, Tensor) else type(attn_mask).__name__
            raise TypeError(f"{op}: attn_mask must be a bool tensor or have query's dtype ({q.dtype}), got {got}")
        if attn_mask.requires_grad:
            raise ValueError(f"{op}: gradients with respect to attn_mask are not supported; detach it")
        try:
            mask = attn_mask.expand(B, Hq, L, S)
        except RuntimeError:
            raise ValueError(
                f"{op}: attn_mask must broadcast to (B, Hq, L, S) = {(B, Hq, L, S)}, got {tuple(attn_mask.shape)}"
            ) from None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    name = _library.resolve(
        OP, device, backend, attn_mask=mask is not None, dropout=dropout_p > 0, head_dim=D, value_dim=v.shape[-1],
        dtype=q.dtype, grad=needs_grad,
    )
    # (seed, offset) on the CPU: drawn from torch's default generator, read by both passes, never synced.
    rng = torch.randint(0, 2**62, (2,), dtype=torch.int64) if dropout_p > 0 else torch.zeros(2, dtype=torch.int64)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, _ = _library.call(OP, name, q, k, v, mask, dropout_p, bool(is_causal), scale, rng)
    return out.squeeze(0) if unbatched else out
