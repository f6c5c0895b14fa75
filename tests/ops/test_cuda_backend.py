"""The "cuda" backend (csrc/cuda/) against the reference, outputs and every gradient, with design.md's rule:
max|out - ref| <= 2 * max|torch_same_dtype - ref| + floor (gptfast.testing.assert_close), where ref runs in
fp32 for fp16/bf16 inputs and fp64 for fp32 inputs, and torch_same_dtype is torch's own op in the tested dtype.

Every test that runs a kernel is marked gpu (skipped without CUDA). On a CUDA machine a missing CUDA build of
the extension fails these tests instead of skipping them. The refusal rules are pure Python and run anywhere.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from gptfast import backends, ops
from gptfast.ops import extension, reference
from gptfast.testing import assert_close, reference_dtype

HALF = [torch.float16, torch.bfloat16]
ALL = [torch.float32, torch.float16, torch.bfloat16]


def _require_cuda_backend(op: str) -> None:
    reason = backends.why_not("cuda", op, torch.device("cuda"))
    assert reason is None, f"the cuda backend cannot run {op} on this CUDA machine: {reason}"


def _high(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy in the reference's precision, with grad if t has it."""
    return t.detach().to(reference_dtype(t.dtype)).requires_grad_(t.requires_grad)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


# -------------------------------------------------------------------------------------------------- softmax
def _torch_softmax(x: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    s = x * scale
    if causal:
        L, N = x.shape[-2:]
        s = s.masked_fill(torch.ones(L, N, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1)


def _check_softmax(x: torch.Tensor, scale: float, causal: bool, dim: int = -1) -> None:
    _require_cuda_backend("softmax")
    xc, xr, xt = _leaf(x), _high(x).requires_grad_(True), _leaf(x)
    y = ops.softmax(xc, dim, scale=scale, causal=causal, backend="cuda")
    ref = ops.softmax(xr, dim, scale=scale, causal=causal, backend="reference")
    ours_torch = _torch_softmax(xt.movedim(dim, -1), scale, causal).movedim(-1, dim)
    assert_close(y, ref, ours_torch, "softmax")
    dy = torch.randn_like(ref)
    (gx,) = _grads(y, [xc], dy)
    (gr,) = _grads(ref, [xr], dy)
    (gt,) = _grads(ours_torch, [xt], dy)
    assert_close(gx, gr, gt, "softmax dx")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape",
    [
        (3, 7),  # odd columns: row stride not a multiple of 16 bytes, so the scalar warp kernel runs
        (64, 1000),  # aligned rows of a typical vocab-like width: 16-byte warp kernel
        (5, 2048),  # the widest row that stays in one warp's registers
        (4, 2049),  # one column past it: block kernel, scalar (unaligned) path, row cached in shared memory
        (2, 8000),  # block kernel, forward cached in shared memory, backward (y and dy) re-read
        (3, 40000),  # long aligned rows: block kernel with 16-byte accesses and a ragged tail
        (2, 3, 17, 17),  # a stack of causal (L, L) score matrices: causal_rows = 17 wraps over rows
        (1, 2, 33, 300),  # L < N causal score matrix (top-left aligned)
    ],
)
def test_softmax_matches_reference(shape, dtype, causal):
    x = torch.randn(shape, device="cuda", dtype=dtype) * 3
    _check_softmax(x, scale=0.7, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL)
def test_softmax_non_contiguous_and_other_dim(dtype):
    # Transposed input and softmax over dim 0: the public op moves the dim last and copies; checks the glue.
    x = torch.randn(300, 45, device="cuda", dtype=dtype).t()
    _check_softmax(x, scale=1.3, causal=False, dim=0)
    _check_softmax(x, scale=1.0, causal=False, dim=-1)


@pytest.mark.gpu
def test_softmax_more_rows_than_the_grid():
    # 4.2M rows of 3 columns: more warps than the capped grid (2^20 blocks x 4 rows), so rows loop.
    x = torch.randn(4_200_000, 3, device="cuda")
    _check_softmax(x, scale=1.0, causal=False)


@pytest.mark.gpu
def test_softmax_all_minus_inf_row_is_zero():
    # A row of -inf has no finite score: the contract is zeros, never NaN.
    _require_cuda_backend("softmax")
    x = torch.randn(4, 3000, device="cuda")
    x[1] = float("-inf")
    x = x[:, :100].contiguous()  # the warp kernel; the block kernel is checked on the full width below
    y = ops.softmax(x, backend="cuda")
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    xw = torch.full((2, 3000), float("-inf"), device="cuda")
    assert torch.equal(ops.softmax(xw, backend="cuda"), torch.zeros_like(xw))


@pytest.mark.gpu
def test_softmax_empty():
    _require_cuda_backend("softmax")
    x = torch.randn(0, 5, device="cuda")
    assert ops.softmax(x, backend="cuda").shape == (0, 5)


# -------------------------------------------------------------------------------------------- cross entropy
def _torch_ce(x, target, ignore_index, reduction, label_smoothing, z_loss):
    loss = F.cross_entropy(x, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(x, dim=-1)
        loss = loss + torch.where(target != ignore_index, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / (target != ignore_index).sum()


def _targets(rows, vocab, ignore_index, dtype=torch.int64):
    t = torch.randint(0, vocab, (rows,), device="cuda")
    if rows > 2:
        t[torch.randperm(rows, device="cuda")[: rows // 3]] = ignore_index
    return t.to(dtype)


def _check_ce(x, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
    _require_cuda_backend("cross_entropy")
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    xc, xr, xt = _leaf(x), _high(x).requires_grad_(True), _leaf(x)
    out = ops.cross_entropy(xc, target, backend="cuda", **kw)
    ref = ops.cross_entropy(xr, target, backend="reference", **kw)
    tor = _torch_ce(xt.reshape(-1, x.shape[-1]), target.reshape(-1).long(), **kw).reshape(ref.shape)
    assert_close(out, ref, tor, "cross_entropy loss")
    g = torch.randn_like(ref)
    (gc,) = _grads(out, [xc], g)
    (gr,) = _grads(ref, [xr], g)
    (gt,) = _grads(tor, [xt], g)
    assert_close(gc, gr, gt, "cross_entropy dlogits")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize(
    "rows,vocab",
    [
        (8, 10),  # tiny vocab: 128-thread blocks, scalar path (10 elements per row)
        (37, 1000),  # odd rows, aligned vocab: 16-byte path, 256 threads
        (16, 50257),  # GPT-2 vocab: odd row stride, scalar path over a long row
        (6, 32768),  # aligned long rows: 16-byte path, 512 threads, several backward column blocks
    ],
)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(label_smoothing=0.1),
        dict(z_loss=1e-3),
        dict(label_smoothing=0.2, z_loss=1e-4, reduction="sum"),
        dict(reduction="none", ignore_index=3),
    ],
    ids=["plain", "smoothing", "zloss", "both-sum", "none-ignore3"],
)
def test_cross_entropy_matches_reference(rows, vocab, dtype, options):
    x = torch.randn(rows, vocab, device="cuda", dtype=dtype) * 2
    target = _targets(rows, vocab, options.get("ignore_index", -100))
    _check_ce(x, target, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
def test_cross_entropy_3d_int32_targets(dtype):
    # (B, T, C) logits with int32 targets: the int32 read path and the public op's flattening.
    x = torch.randn(3, 5, 301, device="cuda", dtype=dtype)
    target = _targets(15, 301, -100, torch.int32).reshape(3, 5)
    _check_ce(x, target, label_smoothing=0.05)


@pytest.mark.gpu
def test_cross_entropy_non_contiguous_logits():
    # A transposed (vocab-major) logits tensor: the op copies to rows; values must not change.
    x = torch.randn(1000, 24, device="cuda", dtype=torch.bfloat16).t()
    _check_ce(x, _targets(24, 1000, -100))


@pytest.mark.gpu
def test_cross_entropy_all_ignored():
    # torch's contract: 'sum' gives 0, 'mean' gives NaN (0 / 0), gradients 0.
    _require_cuda_backend("cross_entropy")
    x = torch.randn(4, 50, device="cuda", requires_grad=True)
    t = torch.full((4,), -100, device="cuda")
    assert ops.cross_entropy(x, t, reduction="sum", backend="cuda").item() == 0.0
    assert math.isnan(ops.cross_entropy(x, t, reduction="mean", backend="cuda").item())
    ops.cross_entropy(x, t, reduction="sum", backend="cuda").backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.gpu
def test_cross_entropy_bad_target_is_nan_not_a_finite_loss():
    # The cuda backend's documented contract for a target outside [0, V): NaN loss and NaN gradient row.
    _require_cuda_backend("cross_entropy")
    x = torch.randn(4, 100, device="cuda", requires_grad=True)
    t = torch.tensor([1, 100, 5, -7], device="cuda")
    loss = ops.cross_entropy(x, t, reduction="none", backend="cuda")
    assert loss[1].isnan() and loss[3].isnan()
    assert loss[0].isfinite() and loss[2].isfinite()
    loss.sum().backward()
    assert x.grad[1].isnan().all() and x.grad[3].isnan().all() and x.grad[0].isfinite().all()


@pytest.mark.gpu
def test_cross_entropy_empty():
    _require_cuda_backend("cross_entropy")
    x = torch.randn(0, 10, device="cuda", requires_grad=True)
    loss = ops.cross_entropy(x, torch.zeros(0, dtype=torch.long, device="cuda"), reduction="sum", backend="cuda")
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 10)


@pytest.mark.gpu
def test_cross_entropy_past_2_31_elements():
    # 16400 x 131072 bf16 logits = 2.15e9 elements: row offsets overflow int32 without 64-bit indexing.
    # Rows past the 2^31 boundary are checked against the reference on those rows alone.
    _require_cuda_backend("cross_entropy")
    rows, vocab = 16400, 131072
    assert rows * vocab > 2**31
    x = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), device="cuda")
    x.requires_grad_(True)
    loss = ops.cross_entropy(x, target, reduction="none", backend="cuda")
    loss.sum().backward()
    tail = slice(rows - 8, rows)  # row 16392 starts at element 2.149e9 > 2^31
    xr = x.detach()[tail].float().requires_grad_(True)
    ref = ops.cross_entropy(xr, target[tail], reduction="none", backend="reference")
    ref.sum().backward()
    xt = x.detach()[tail].clone().requires_grad_(True)
    tor = F.cross_entropy(xt, target[tail], reduction="none")
    tor.sum().backward()
    assert_close(loss[tail], ref, tor, "loss past 2^31")
    assert_close(x.grad[tail], xr.grad, xt.grad, "dlogits past 2^31")


# ------------------------------------------------------------------------------------ linear cross entropy
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_reference(dtype, bias, reduction):
    # 37 rows in chunks of 16 (a ragged last chunk), V = 1001 (odd: scalar CE path), H = 64.
    # 'mean'/'sum' run the gradient-in-forward path, 'none' the recompute-in-backward path.
    _require_cuda_backend("linear_cross_entropy")
    M, H, V = 37, 64, 1001
    h = torch.randn(M, H, device="cuda", dtype=dtype)
    w = torch.randn(V, H, device="cuda", dtype=dtype) / math.sqrt(H)
    b = torch.randn(V, device="cuda", dtype=dtype) if bias else None
    target = _targets(M, V, -100)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-4, chunk_size=16)
    inputs = [h, w] + ([b] if bias else [])
    cuda_in = [_leaf(t) for t in inputs]
    ref_in = [_high(t).requires_grad_(True) for t in inputs]
    tor_in = [_leaf(t) for t in inputs]
    out = ops.linear_cross_entropy(cuda_in[0], cuda_in[1], target, *cuda_in[2:], backend="cuda", **kw)
    ref = ops.linear_cross_entropy(ref_in[0], ref_in[1], target, *ref_in[2:], backend="reference", **kw)
    logits = F.linear(tor_in[0], tor_in[1], tor_in[2] if bias else None)
    tor = _torch_ce(logits, target, -100, reduction, 0.1, 1e-4)
    assert_close(out, ref, tor, "linear_cross_entropy loss")
    g = torch.randn_like(ref)
    for name, gc, gr, gt in zip(
        ["dhidden", "dweight", "dbias"], _grads(out, cuda_in, g), _grads(ref, ref_in, g), _grads(tor, tor_in, g)
    ):
        assert_close(gc, gr, gt, f"linear_cross_entropy {name}")


# ---------------------------------------------------------------------------------------------- attention
def _torch_sdpa(q, k, v, causal, scale):
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _check_attention(q, k, v, causal, scale=None):
    _require_cuda_backend("attention")
    gqa = q.shape[-3] != k.shape[-3]
    cuda_in = [_leaf(t) for t in (q, k, v)]
    ref_in = [_high(t).requires_grad_(True) for t in (q, k, v)]
    tor_in = [_leaf(t) for t in (q, k, v)]
    kw = dict(is_causal=causal, scale=scale, enable_gqa=gqa)
    out = ops.scaled_dot_product_attention(*cuda_in, backend="cuda", **kw)
    ref = ops.scaled_dot_product_attention(*ref_in, backend="reference", **kw)
    tor = _torch_sdpa(*tor_in, causal, scale)
    assert_close(out, ref, tor, "attention out")
    dout = torch.randn_like(ref)
    for name, gc, gr, gt in zip(
        ["dq", "dk", "dv"], _grads(out, cuda_in, dout), _grads(ref, ref_in, dout), _grads(tor, tor_in, dout)
    ):
        assert_close(gc, gr, gt, f"attention {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize(
    "B,Hq,Hk,L,S",
    [
        (2, 4, 4, 128, 128),  # whole 64-query / 64-key tiles, square
        (1, 2, 2, 97, 203),  # odd lengths, L < S: masked tails in both tiles, causal sees the top-left corner
        (2, 8, 2, 200, 77),  # GQA 4:1 and L > S: causal rows past S see every key
        (1, 3, 1, 1, 1),  # one query, one key, GQA 3:1
        (1, 2, 2, 300, 300),  # several query and key tiles with a ragged last one
    ],
)
def test_attention_matches_reference(B, Hq, Hk, L, S, D, causal, dtype):
    q = torch.randn(B, Hq, L, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hk, S, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hk, S, D, device="cuda", dtype=dtype)
    _check_attention(q, k, v, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
def test_attention_non_contiguous_inputs(dtype):
    # (B, L, H, D) storage viewed as (B, H, L, D): strides the kernel reads directly (multiples of 8).
    B, H, L, D = 2, 4, 150, 64
    q = torch.randn(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    _check_attention(q, k, v, causal=True, scale=0.3)


@pytest.mark.gpu
def test_attention_unaligned_rows_are_copied():
    # Rows of 129 elements sliced to 128: stride(-1) == 1 but the row stride is odd, so the binding copies.
    B, H, L, D = 1, 2, 70, 128
    q, k, v = (torch.randn(B, H, L, D + 1, device="cuda", dtype=torch.float16)[..., 1:] for _ in range(3))
    assert q.stride(-1) == 1 and q.stride(-2) % 8 != 0
    _check_attention(q, k, v, causal=False)


@pytest.mark.gpu
def test_attention_unbatched_and_long_causal():
    # (H, L, D) input and a 1k causal sequence: many skipped key blocks and long online-softmax chains.
    q, k, v = (torch.randn(2, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    _check_attention(q, k, v, causal=True)


@pytest.mark.gpu
def test_attention_lse_and_no_keys():
    # The forward's lse against the reference, and S = 0: out = 0, lse = -inf (the schema's contract).
    _require_cuda_backend("attention")
    q = torch.randn(1, 2, 65, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 2, 90, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(1, 2, 90, 64, device="cuda", dtype=torch.float16)
    rng = torch.zeros(2, dtype=torch.int64)
    out, lse = torch.ops.gptfast.attention_fwd(q, k, v, None, 0.0, True, 0.125, rng)
    _, ref_lse = reference.attention_fwd(q.float(), k.float(), v.float(), None, 0.0, True, 0.125, rng)
    s = (q @ k.transpose(-2, -1)) * 0.125
    s = s.masked_fill(torch.ones(65, 90, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    assert_close(lse, ref_lse, torch.logsumexp(s, dim=-1).float(), "attention lse")
    empty = torch.randn(1, 2, 0, 64, device="cuda", dtype=torch.float16)
    out0, lse0 = torch.ops.gptfast.attention_fwd(q, empty, empty, None, 0.0, False, 0.125, rng)
    assert torch.equal(out0, torch.zeros_like(out0)) and bool((lse0 == float("-inf")).all())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "make,why",
    [
        (lambda q, k, v: dict(attn_mask=torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device="cuda")),
         "attn_mask"),
        (lambda q, k, v: dict(dropout_p=0.1), "dropout"),
    ],
)
def test_attention_refusals_through_the_public_op(make, why):
    _require_cuda_backend("attention")
    q, k, v = (torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    with pytest.raises(backends.BackendUnavailable, match=why):
        ops.scaled_dot_product_attention(q, k, v, backend="cuda", **make(q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,D,Dv,why",
    [(torch.float32, 64, 64, "float16 or bfloat16"), (torch.float16, 96, 96, "head dim"), (torch.float16, 64, 128, "value dim")],
)
def test_attention_shape_and_dtype_refusals(dtype, D, Dv, why):
    _require_cuda_backend("attention")
    q = torch.randn(1, 2, 16, D, device="cuda", dtype=dtype)
    k = torch.randn(1, 2, 16, D, device="cuda", dtype=dtype)
    v = torch.randn(1, 2, 16, Dv, device="cuda", dtype=dtype)
    with pytest.raises(backends.BackendUnavailable, match=why):
        ops.scaled_dot_product_attention(q, k, v, backend="cuda")


@pytest.mark.gpu
def test_float64_is_refused_with_a_clear_error():
    # softmax/cross_entropy get no dtype feature, so the kernels' TORCH_CHECK is the refusal.
    _require_cuda_backend("softmax")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.softmax(torch.randn(2, 3, device="cuda", dtype=torch.float64), backend="cuda")


# ------------------------------------------------------------------------------- refusal rules (any machine)
@pytest.mark.parametrize(
    "features,expected",
    [
        (dict(attn_mask=False, dropout=False, head_dim=64, value_dim=64, dtype=torch.float16), None),
        (dict(attn_mask=False, dropout=False, head_dim=128, value_dim=128, dtype=torch.bfloat16), None),
        (dict(attn_mask=True, dropout=False, head_dim=64, value_dim=64, dtype=torch.float16), "attn_mask"),
        (dict(attn_mask=False, dropout=True, head_dim=64, value_dim=64, dtype=torch.float16), "dropout"),
        (dict(attn_mask=False, dropout=False, head_dim=80, value_dim=80, dtype=torch.float16), "head dim"),
        (dict(attn_mask=False, dropout=False, head_dim=64, value_dim=32, dtype=torch.float16), "value dim"),
        (dict(attn_mask=False, dropout=False, head_dim=64, value_dim=64, dtype=torch.float32), "float32"),
    ],
)
def test_unsupported_cuda_attention(features, expected):
    reason = extension.unsupported_cuda("attention", **features)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason and "backend=" in reason


@pytest.mark.parametrize("op", ["softmax", "cross_entropy", "linear_cross_entropy"])
def test_unsupported_cuda_takes_every_option_of_the_row_ops(op):
    assert extension.unsupported_cuda(op, label_smoothing=0.1, z_loss=1e-4) is None
