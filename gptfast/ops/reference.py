"""The plain PyTorch spec of every op pair (contracts in gptfast/ops/schemas.py).

This is the `reference` backend and what every kernel is tested against. Math runs in fp32 for fp16/bf16
inputs and stays in fp64 for fp64 inputs, so float64 gradcheck works. Nothing here is tuned for speed except
linear_cross_entropy, whose point is memory: it never holds more than chunk_size rows of logits.
"""
import torch
from torch import Tensor

from . import _checks


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------- softmax
def causal_mask(rows: int, cols: int, causal_rows: int, device) -> Tensor:
    """True where row r (of a flattened stack of (L, cols) matrices, L = causal_rows) masks column j > r % L."""
    i = torch.arange(rows, device=device) % causal_rows
    j = torch.arange(cols, device=device)
    return j[None, :] > i[:, None]


def softmax_fwd(x: Tensor, scale: float, causal_rows: int) -> Tensor:
    if x.shape[-1] == 0:
        return torch.empty_like(x)  # rows of nothing (amax has no identity to reduce them to)
    s = x.to(compute_dtype(x.dtype)) * scale
    if causal_rows:
        s = s.masked_fill(causal_mask(*x.shape, causal_rows, x.device), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    # A row whose every entry is masked has m = -inf; it returns zeros instead of NaN.
    e = torch.exp(s - torch.where(m == float("-inf"), 0.0, m))
    return (e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)).to(x.dtype)


def softmax_bwd(dy: Tensor, y: Tensor, scale: float, causal_rows: int) -> Tensor:
    ct = compute_dtype(y.dtype)
    yf, dyf = y.to(ct), dy.to(ct)
    # d softmax(s)/ds contracted with dy is y * (dy - <dy, y>); ds/dx = scale.
    dx = scale * yf * (dyf - (dyf * yf).sum(dim=-1, keepdim=True))
    return dx.to(y.dtype)


# ---------------------------------------------------------------------------------------- cross entropy
def cross_entropy_fwd(
    logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[Tensor, Tensor]:
    _checks.target_values("cross_entropy", target, logits.shape[1], ignore_index)
    return _cross_entropy_rows(logits, target, ignore_index, label_smoothing, z_loss)


def _cross_entropy_rows(
    logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[Tensor, Tensor]:
    x = logits.to(compute_dtype(logits.dtype))
    lse = torch.logsumexp(x, dim=-1)
    valid = target != ignore_index
    t = torch.where(valid, target, 0).long()
    nll = lse - x.gather(1, t[:, None]).squeeze(1)
    loss = nll
    if label_smoothing:
        # Smoothing mixes in the uniform distribution: its cross-entropy is lse - mean_j x_j.
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, 0.0), lse


def cross_entropy_bwd(
    dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float,
) -> Tensor:
    M, V = logits.shape
    ct = compute_dtype(logits.dtype)
    x = logits.to(ct)
    valid = target != ignore_index
    t = torch.where(valid, target, 0).long()
    # d loss / d x_j = p_j (1 + 2 z lse) - (1 - eps) [j == t] - eps / V, with p = exp(x - lse).
    p = torch.exp(x - lse[:, None])
    g = p * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / V
    g.scatter_add_(1, t[:, None], torch.full((M, 1), label_smoothing - 1.0, dtype=ct, device=x.device))
    # An ignored row's gradient is 0 even when its logits hold NaN or inf (0 * NaN would be NaN): the row does
    # not enter the loss. (torch's gradient is NaN there; every gptfast backend gives 0.)
    g = torch.where(valid[:, None], g * dloss.to(ct)[:, None], 0.0)
    return g.to(logits.dtype)


def cross_entropy_bwd_inplace(
    dloss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float,
    z_loss: float,
) -> None:
    """cross_entropy_bwd's dlogits written over logits (the spec of the in-place backward, not its memory)."""
    _checks.contiguous_matrix("cross_entropy_bwd_inplace", "logits", logits)
    logits.copy_(cross_entropy_bwd(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss))


# --------------------------------------------------------------------------------- linear cross entropy
def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int) -> Tensor:
    ct = compute_dtype(hidden.dtype)
    logits = hidden[start:stop].to(ct) @ weight.to(ct).T
    return logits if bias is None else logits + bias.to(ct)


def linear_cross_entropy_fwd(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int,
    label_smoothing: float, z_loss: float, chunk_size: int, with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _checks.target_values("linear_cross_entropy", target, weight.shape[0], ignore_index)
    M = hidden.shape[0]
    ct = compute_dtype(hidden.dtype)
    loss = hidden.new_empty(M, dtype=ct)
    lse = hidden.new_empty(M, dtype=ct)
    if with_grad:
        dhidden, dweight = torch.empty_like(hidden, dtype=ct), torch.zeros_like(weight, dtype=ct)
        dbias = torch.zeros_like(bias, dtype=ct) if bias is not None else _empty(loss)
    for start in range(0, M, chunk_size):
        stop = min(start + chunk_size, M)
        logits = _chunk_logits(hidden, weight, bias, start, stop)
        args = (target[start:stop], ignore_index, label_smoothing, z_loss)
        loss[start:stop], lse[start:stop] = _cross_entropy_rows(logits, *args)
        if with_grad:
            ones = torch.ones(stop - start, dtype=ct, device=hidden.device)
            dlogits = cross_entropy_bwd(ones, logits, target[start:stop], lse[start:stop], *args[1:])
            _accumulate(dlogits, hidden, weight, bias, start, stop, dhidden, dweight, dbias)
    if not with_grad:
        return loss, lse, _empty(loss), _empty(loss), _empty(loss)
    return loss, lse, dhidden.to(hidden.dtype), dweight.to(weight.dtype), dbias.to(ct if bias is None else bias.dtype)


def _accumulate(dlogits, hidden, weight, bias, start, stop, dhidden, dweight, dbias) -> None:
    ct = dlogits.dtype
    dhidden[start:stop] = dlogits @ weight.to(ct)
    dweight += dlogits.T @ hidden[start:stop].to(ct)
    if bias is not None:
        dbias += dlogits.sum(dim=0)


def linear_cross_entropy_bwd(
    dloss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, lse: Tensor,
    ignore_index: int, label_smoothing: float, z_loss: float, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    M = hidden.shape[0]
    ct = compute_dtype(hidden.dtype)
    dhidden, dweight = torch.empty_like(hidden, dtype=ct), torch.zeros_like(weight, dtype=ct)
    dbias = torch.zeros_like(bias, dtype=ct) if bias is not None else hidden.new_empty(0, dtype=ct)
    for start in range(0, M, chunk_size):
        stop = min(start + chunk_size, M)
        logits = _chunk_logits(hidden, weight, bias, start, stop)
        dlogits = cross_entropy_bwd(
            dloss[start:stop], logits, target[start:stop], lse[start:stop], ignore_index, label_smoothing, z_loss
        )
        _accumulate(dlogits, hidden, weight, bias, start, stop, dhidden, dweight, dbias)
    return dhidden.to(hidden.dtype), dweight.to(weight.dtype), dbias.to(ct if bias is None else bias.dtype)


# -------------------------------------------------------------------------------------------- attention
def dropout_keep(rng: Tensor, shape, dropout_p: float, device) -> Tensor:
    """The reference's dropout pattern: a torch.Generator seeded from rng = (seed, offset)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(rng[0]) ^ (int(rng[1]) * 0x9E3779B97F4A7C15 % 2**63))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _attention_probs(q, k, attn_mask, dropout_p, is_causal, scale, rng):
    """(P, dropout multiplier or None, lse) in compute_dtype; GQA by repeating kv heads. P is before dropout."""
    ct = compute_dtype(q.dtype)
    B, Hq, L, D = q.shape
    S = k.shape[-2]
    k = k.to(ct).repeat_interleave(Hq // k.shape[1], dim=1)
    s = (q.to(ct) @ k.transpose(-2, -1)) * scale  # (B, Hq, L, S)
    if is_causal:
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).tril().logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            s = s + attn_mask.to(ct)
    # softmax as exp(s - max) / sum, not exp(s - lse): a finite mask that swamps a whole row (transformers'
    # finfo.min padding) absorbs both the scores and log(sum) into the same huge number, and only this form
    # still gives that row torch's uniform weights. Rows with no key left (max = -inf) give P = 0, as torch's
    # SDPA does.
    m = s.amax(dim=-1, keepdim=True) if S else s.new_full((*s.shape[:-1], 1), float("-inf"))  # S = 0: no key
    dead = m == float("-inf")
    e = torch.exp(s - m.masked_fill(dead, 0.0))
    total = e.sum(dim=-1, keepdim=True)
    p = e / total.masked_fill(dead, 1.0)
    lse = (m + torch.log(total)).squeeze(-1)
    drop = None
    if dropout_p > 0.0:
        drop = dropout_keep(rng, p.shape, dropout_p, q.device).to(ct) / (1.0 - dropout_p)
    return p, drop, lse


def _repeat_kv(t: Tensor, heads: int, dtype) -> Tensor:
    return t.to(dtype).repeat_interleave(heads // t.shape[1], dim=1)


def _sum_groups(t: Tensor, kv_heads: int) -> Tensor:
    B, Hq, S, D = t.shape
    return t.reshape(B, kv_heads, Hq // kv_heads, S, D).sum(dim=2)


def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float, is_causal: bool, scale: float,
    rng: Tensor,
) -> tuple[Tensor, Tensor]:
    p, drop, lse = _attention_probs(q, k, attn_mask, dropout_p, is_causal, scale, rng)
    pd = p if drop is None else p * drop
    return (pd @ _repeat_kv(v, q.shape[1], p.dtype)).to(q.dtype), lse


def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, out: Tensor, lse: Tensor,
    dropout_p: float, is_causal: bool, scale: float, rng: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    # With O = (P * Z) V (Z the dropout multiplier, 1 without dropout) and P = softmax(S), S = scale * Q K^T:
    #   1. dV = (P * Z)^T dO                      (summed over the query heads that share a kv head)
    #   2. dP = (dO V^T) * Z
    #   3. dS = P * (dP - delta), delta = rowsum(dP * P) = rowsum(dO * O)
    #   4. dQ = scale * dS K,  dK = scale * dS^T Q (summed over the group)
    p, drop, _ = _attention_probs(q, k, attn_mask, dropout_p, is_causal, scale, rng)
    ct, Hq, Hk = p.dtype, q.shape[1], k.shape[1]
    do = dout.to(ct)
    pd = p if drop is None else p * drop
    dv = _sum_groups(pd.transpose(-2, -1) @ do, Hk)
    dp = do @ _repeat_kv(v, Hq, ct).transpose(-2, -1)
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = scale * (ds @ _repeat_kv(k, Hq, ct))
    dk = _sum_groups(scale * (ds.transpose(-2, -1) @ q.to(ct)), Hk)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
