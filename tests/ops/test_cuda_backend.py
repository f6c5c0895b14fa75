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
        (4, 2049),  # one column past it: a block per row, row in registers, scalar (unaligned) path
        (2, 8000),  # a block per row, row in registers, 16-byte accesses
        (2, 20000),  # fp32 backward: block kernel with y and dy cached in shared memory; half: registers
        (2, 32768),  # the longest forward row kept in registers (the 32k x 32k benchmark's row)
        (3, 40000),  # online block kernel, forward cached (fp16/bf16) or read twice (fp32), ragged tail
        (2, 70000),  # too long to cache in any dtype: every pass reads global memory
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
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(4, 2049), (2, 8000), (2, 32768), (1, 2, 40, 3000)])
def test_softmax_online_kernel_forced(shape, dtype, monkeypatch):
    # GPTFAST_CUDA_SOFTMAX_KERNEL=1: the online block kernel on rows the in-register kernel takes by
    # default (the two the binding times against each other), scalar and 16-byte, causal on the stack.
    monkeypatch.setenv("GPTFAST_CUDA_SOFTMAX_KERNEL", "1")
    x = torch.randn(shape, device="cuda", dtype=dtype) * 3
    _check_softmax(x, scale=0.7, causal=len(shape) == 4)


@pytest.mark.gpu
def test_softmax_kernel_autotuned_once_per_bucket(monkeypatch, capfd):
    # With autotuning on (the test suite turns it off), the first forward and the first backward of a bucket
    # time both kernels and print the pick; 50 and 60 rows share the bucket (<= 64), so nothing more prints.
    _require_cuda_backend("softmax")
    monkeypatch.setenv("GPTFAST_AUTOTUNE", "1")
    monkeypatch.setenv("GPTFAST_PRINT_AUTOTUNING", "1")
    monkeypatch.delenv("GPTFAST_CUDA_SOFTMAX_KERNEL", raising=False)
    for rows in (50, 60):
        _check_softmax(torch.randn(rows, 5000, device="cuda", dtype=torch.bfloat16), scale=0.7, causal=False)
    printed = [line for line in capfd.readouterr().out.splitlines() if "gptfast autotuning softmax" in line]
    assert len(printed) == 2, printed
    for line, op in zip(sorted(printed), ("softmax_bwd (cuda)", "softmax_fwd (cuda)")):
        assert f"{op}: bf16 cols<=8192 rows<=64:" in line, line
        assert re.search(r"\(registers [0-9.]+ us, online [0-9.]+ us\)", line), line


@pytest.mark.gpu
def test_softmax_kernel_not_timed_while_capturing(monkeypatch):
    # As for attention's tilings: an unseen bucket captured into a CUDA graph runs the default kernel untimed,
    # and the replay matches an eager call of it (forced, so no pick is stored).
    _require_cuda_backend("softmax")
    monkeypatch.setenv("GPTFAST_AUTOTUNE", "1")
    x = torch.randn(37, 12000, device="cuda", dtype=torch.float16)
    monkeypatch.setenv("GPTFAST_CUDA_SOFTMAX_KERNEL", "0")
    eager = torch.ops.gptfast.softmax_fwd(x, 0.5, 0)
    monkeypatch.delenv("GPTFAST_CUDA_SOFTMAX_KERNEL")
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=stream):
        y = torch.ops.gptfast.softmax_fwd(x, 0.5, 0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("value", ["2", "-1", "online"])
def test_softmax_forced_kernel_out_of_range_is_refused(value, monkeypatch):
    _require_cuda_backend("softmax")
    monkeypatch.setenv("GPTFAST_CUDA_SOFTMAX_KERNEL", value)
    x = torch.randn(4, 3000, device="cuda")
    with pytest.raises(RuntimeError, match=r"GPTFAST_CUDA_SOFTMAX_KERNEL must be a kernel index .* in \[0, 2\), got"):
        ops.softmax(x, backend="cuda")


@pytest.mark.gpu
def test_softmax_empty():
    _require_cuda_backend("softmax")
    x = torch.randn(0, 5, device="cuda")
    assert ops.softmax(x, backend="cuda").shape == (0, 5)


# -------------------------------------------------------------------------------------------- cross entropy
def _torch_ce(x, target, ignore_index, reduction, label_smoothing, z_loss):
    """torch's cross_entropy (+ z_loss) on x's values. For fp16/bf16 it runs in fp32 and rounds the result to
    the dtype: torch's own half kernel sums the V log-probs of the smoothing term in the input dtype, which
    overflows to inf in fp16 for V in the thousands, and an inf comparator would make the bound meaningless."""
    if x.dtype in HALF:
        return _torch_ce(x.float(), target, ignore_index, reduction, label_smoothing, z_loss).to(x.dtype)
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
def test_cross_entropy_float64():
    # fp64 logits run in fp64 (loss and lse fp64 too), as the reference: checked against fp64 torch.
    x = torch.randn(9, 1001, device="cuda", dtype=torch.float64)
    _check_ce(x, _targets(9, 1001, -100), label_smoothing=0.25, z_loss=0.125)


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_reference(dtype, bias, reduction):
    # 37 rows in chunks of 16 (a ragged last chunk), V = 1001 (odd: scalar CE path), H = 64.
    # fp32/fp64: 'mean'/'sum' run the gradient-in-forward path, 'none' the recompute-in-backward path, with
    # dweight summed over 3 chunks. fp16/bf16 (several chunks) always recompute, by vocab slices of
    # max(256, 16 * 1001 // 37) = 432 columns (432, 432, 137: the 16-byte and the scalar CE paths), with the
    # input-dtype GEMMs over fp32 logits.
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
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize(
    "B,Hq,Hk,L,S",
    [
        (2, 4, 4, 128, 128),  # whole tiles: one 128-query forward block, two 64-key backward blocks
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


# attention.cu's kFwdTilings per head dim: the binding times them on a shape bucket's first call.
FWD_TILINGS = {32: 2, 64: 2, 96: 3, 128: 3}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D,tiling", [(d, i) for d, n in FWD_TILINGS.items() for i in range(n)])
def test_attention_every_forward_tiling(D, tiling, causal, dtype, monkeypatch):
    # Each tiling forced: L = 300 leaves ragged last query blocks of 64 and 128 rows, S = 257 a ragged last
    # key tile of 32 and 64 keys (L > S: causal rows past S see every key), GQA 4:1.
    monkeypatch.setenv("GPTFAST_CUDA_ATTENTION_FWD_TILING", str(tiling))
    q = torch.randn(2, 8, 300, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 2, 257, D, device="cuda", dtype=dtype) for _ in range(2))
    _check_attention(q, k, v, causal)


@pytest.mark.gpu
def test_attention_forward_tiling_autotuned_once_per_bucket(monkeypatch, capfd):
    # With autotuning on (the test suite turns it off), the first call of a bucket times every tiling and
    # prints the pick; a second call in the same bucket (L 600 and 1000 both round up to 1024) reuses it.
    # The result is checked either way.
    _require_cuda_backend("attention")
    monkeypatch.setenv("GPTFAST_AUTOTUNE", "1")
    monkeypatch.setenv("GPTFAST_PRINT_AUTOTUNING", "1")
    monkeypatch.delenv("GPTFAST_CUDA_ATTENTION_FWD_TILING", raising=False)
    for L in (600, 1000):
        q, k, v = (torch.randn(1, 3, L, 96, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        _check_attention(q, k, v, causal=True)
    printed = [line for line in capfd.readouterr().out.splitlines() if "autotuning attention_fwd (cuda)" in line]
    assert len(printed) == 1, printed
    assert "bf16 D=96 causal L<=1024 S<=1024 B*Hq<=4" in printed[0]
    times = printed[0].split("(", 2)[-1]
    for name in ("128x32", "128x64", "64x64"):
        assert re.search(rf"{name} [0-9.]+ us", times), printed[0]  # each tiling timed, none skipped


@pytest.mark.gpu
def test_attention_forward_tiling_not_timed_while_capturing(monkeypatch):
    # A CUDA graph capture must not time (events and a host sync would break it): an unseen bucket captured
    # runs the default tiling, and the replay matches an eager call of it (forced, so no pick is stored; it
    # also loads the kernel before the capture).
    _require_cuda_backend("attention")
    monkeypatch.setenv("GPTFAST_AUTOTUNE", "1")
    q, k, v = (torch.randn(1, 5, 333, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    rng = torch.zeros(2, dtype=torch.int64)
    monkeypatch.setenv("GPTFAST_CUDA_ATTENTION_FWD_TILING", "0")
    eager_out, eager_lse = torch.ops.gptfast.attention_fwd(q, k, v, None, 0.0, True, 0.1, rng)
    monkeypatch.delenv("GPTFAST_CUDA_ATTENTION_FWD_TILING")
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=stream):
        out, lse = torch.ops.gptfast.attention_fwd(q, k, v, None, 0.0, True, 0.1, rng)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("value", ["3", "-1", "x"])
def test_attention_forced_tiling_out_of_range_is_refused(value, monkeypatch):
    _require_cuda_backend("attention")
    monkeypatch.setenv("GPTFAST_CUDA_ATTENTION_FWD_TILING", value)
    q = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.float16)
    rng = torch.zeros(2, dtype=torch.int64)
    expected = r"GPTFAST_CUDA_ATTENTION_FWD_TILING must be a tiling index for head dim 64 in \[0, 2\), got"
    with pytest.raises(RuntimeError, match=expected):
        torch.ops.gptfast.attention_fwd(q, q, q, None, 0.0, False, 1.0, rng)


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
    [(torch.float32, 64, 64, "float16 or bfloat16"), (torch.float16, 80, 80, "head dim"), (torch.float16, 64, 128, "value dim")],
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
    # softmax gets no dtype feature, so its kernel's TORCH_CHECK is the refusal (cross-entropy takes fp64).
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


# ------------------------------------------------------------------------------ CPU emulation (any machine)
# The kernel files themselves, run on the CPU through tests/cuda_emulator/emu.h (threads for CUDA threads,
# barriers, emulated shuffles, cp.async, ldmatrix and mma.sync), called through their plain launchers. This checks what a GPU run
# would: indexing, masks, strides, GQA, block skipping, synchronisation and the algebra, on machines
# without a GPU. "torch in the same dtype" is stood in for by the reference run on the low-precision tensors
# (fp32 math, output rounded to the dtype); the GPU tests above use torch's own kernels.
import ctypes  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_EMU_DIR = os.path.join(_ROOT, "tests", "cuda_emulator")
_CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _emulable(source: str) -> str:
    """A kernel file rewritten for emu.h: launches through emu_launch, dynamic shared memory from emu_smem."""
    s = source.replace('#include "mma.cuh"', "")  # emu.h defines its primitives
    s = s.replace('#include "common.cuh"', '#include "emu.h"\n#include "common.cuh"')
    s = s.replace("extern __shared__ __align__(128) unsigned char smem[];", "unsigned char* smem = emu_smem();")
    s = re.sub(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\((\w+)\);", r"emu_launch(\1, \2, \3);", s)
    assert "<<<" not in s and "extern __shared__" not in s, "a launch or shared declaration emu.h cannot run"
    return s


@pytest.fixture(scope="module")
def emu():
    cxx = shutil.which("g++")
    if cxx is None or not os.path.exists(os.path.join(_CUDA_INCLUDE, "cuda_fp16.h")):
        pytest.skip("the CPU emulation needs g++ and the CUDA headers (CUDA_HOME)")
    build = os.path.join(_ROOT, "build", "cuda_emulator")
    os.makedirs(build, exist_ok=True)
    flags = [
        "-std=c++20", "-O1", "-fPIC", "-Wno-unknown-pragmas", "-I", _CUDA_INCLUDE, "-I", _EMU_DIR,
        "-I", os.path.join(_ROOT, "csrc", "cuda"), "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    ]
    objects = []
    for name in ("softmax", "cross_entropy", "attention"):
        src = os.path.join(build, f"{name}.cpp")
        with open(os.path.join(_ROOT, "csrc", "cuda", f"{name}.cu")) as f, open(src, "w") as out:
            out.write(_emulable(f.read()))
        objects.append(os.path.join(build, f"{name}.o"))
        subprocess.run([cxx, *flags, "-c", src, "-o", objects[-1]], check=True, timeout=600)
    objects.append(os.path.join(build, "harness.o"))
    subprocess.run([cxx, *flags, "-c", os.path.join(_EMU_DIR, "harness.cpp"), "-o", objects[-1]], check=True, timeout=600)
    lib = os.path.join(build, "libemu.so")
    subprocess.run([cxx, "-shared", "-o", lib, *objects, "-lpthread"], check=True, timeout=600)
    return ctypes.CDLL(lib)


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)


_I, _F = ctypes.c_int64, ctypes.c_float


def _low_ref(fn, *args):
    """The reference on the tested dtype's tensors (fp32 math), rounded like a same-dtype run."""
    return fn(*args)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize(
    "rows,cols,causal_rows",
    [
        (3, 7, 0),  # scalar warp kernel
        (9, 1000, 0),  # 16-byte warp kernel
        (5, 2048, 3),  # widest warp row, causal wrapping every 3 rows
        (4, 2049, 0),  # a block per row in registers, scalar
        (3, 8000, 2),  # a block per row in registers, 16-byte, causal
        (2, 13000, 0),  # fp32 backward: online block kernel, y and dy cached in their dtype
        (2, 20000, 7),  # fp32 backward past the cache: y and dy read twice; half backward cached
        (2, 40000, 0),  # forward past the registers: online block kernel, cached (half) or read twice (fp32)
        (6, 300, 33),  # causal with L < N
    ],
)
def test_emulated_softmax(emu, rows, cols, causal_rows, dtype):
    x = torch.randn(rows, cols, dtype=dtype) * 3
    y, dx = torch.empty_like(x), torch.empty_like(x)
    dy = torch.randn(rows, cols, dtype=dtype)
    args = (_I(rows), _I(cols))
    assert emu.emu_softmax(1, _p(x), _p(None), _p(y), *args, _I(cols), _I(0), _I(cols), _F(0.7), _I(causal_rows), _DT[dtype]) == 0
    assert emu.emu_softmax(0, _p(y), _p(dy), _p(dx), *args, _I(cols), _I(cols), _I(cols), _F(0.7), _I(causal_rows), _DT[dtype]) == 0
    hd = reference_dtype(dtype)
    ref = reference.softmax_fwd(x.to(hd), 0.7, causal_rows)
    assert_close(y, ref, reference.softmax_fwd(x, 0.7, causal_rows), "softmax y")
    ref_dx = reference.softmax_bwd(dy.to(hd), ref, 0.7, causal_rows)
    assert_close(dx, ref_dx, reference.softmax_bwd(dy, y, 0.7, causal_rows), "softmax dx")


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize(
    "rows,cols,causal_rows",
    [
        (3, 2049, 0),  # just past a warp's row, scalar: the online kernel where the default holds registers
        (4, 8000, 3),  # 16-byte, causal: cached in shared memory
        (2, 20000, 7),  # fp32 backward past the cache: read twice
        (5, 600, 0),  # a warp's row forced onto the block kernel (the kernel takes any length)
    ],
)
def test_emulated_softmax_online_kernel_at_every_length(emu, rows, cols, causal_rows, dtype):
    # SoftmaxParams::kernel = 1, which the binding times against the in-register kernel where both may run.
    emu.emu_set_softmax_kernel(1)
    try:
        test_emulated_softmax(emu, rows, cols, causal_rows, dtype)
    finally:
        emu.emu_set_softmax_kernel(0)


def test_emulated_softmax_kernel_choices(emu):
    # Where the binding times the two kernels: exactly where the default is the in-register block kernel,
    # between a warp's row (2048) and a block's registers, which depend on the dtype, direction and path.
    f32, f16 = _DT[torch.float32], _DT[torch.float16]
    for fwd, dtype, last in ((1, f32, 32768), (1, f16, 32768), (0, f32, 8192), (0, f16, 16384)):
        assert emu.emu_softmax_kernel_choices(fwd, _I(2048), dtype) == 1
        assert emu.emu_softmax_kernel_choices(fwd, _I(2056), dtype) == 2
        assert emu.emu_softmax_kernel_choices(fwd, _I(last), dtype) == 2
        assert emu.emu_softmax_kernel_choices(fwd, _I(last + 8), dtype) == 1
    # An odd row stride takes the scalar path, whose registers hold 8192 forward columns.
    assert emu.emu_softmax_kernel_choices(1, _I(8191), f32) == 2
    assert emu.emu_softmax_kernel_choices(1, _I(8193), f32) == 1
    # No such kernel: refused (cudaErrorInvalidValue), never run as another.
    emu.emu_set_softmax_kernel(2)
    try:
        x = torch.randn(2, 64)
        y = torch.empty_like(x)
        assert emu.emu_softmax(1, _p(x), _p(None), _p(y), _I(2), _I(64), _I(64), _I(0), _I(64), _F(1.0), _I(0), 0) == 1
    finally:
        emu.emu_set_softmax_kernel(0)


def test_emulated_softmax_edge_rows(emu):
    # All -inf rows give zeros in both kernels; an unaligned view takes the scalar path.
    for cols in (50, 5000):
        x = torch.full((2, cols), float("-inf"))
        y = torch.empty_like(x)
        emu.emu_softmax(1, _p(x), _p(None), _p(y), _I(2), _I(cols), _I(cols), _I(0), _I(cols), _F(1.0), _I(0), 0)
        assert torch.equal(y, torch.zeros_like(y))
    xv = torch.randn(4, 1001)[:, 1:]
    y = torch.empty(4, 1000)
    emu.emu_softmax(1, _p(xv), _p(None), _p(y), _I(4), _I(1000), _I(1001), _I(0), _I(1000), _F(1.0), _I(0), 0)
    assert_close(y, reference.softmax_fwd(xv.double(), 1.0, 0), torch.softmax(xv, -1), "softmax unaligned")


# The warp kernel, the block kernel with the row cached, the block kernel re-reading it.
@pytest.mark.parametrize("cols", [50, 5000, 13000])
def test_emulated_softmax_nan_and_inf_rows(emu, cols):
    # A NaN or +inf in a row makes the whole row NaN, as torch: the kernels once clamped the row's sum with
    # fmaxf (which drops NaN) and turned such a row into huge finite numbers, or zeros next to one NaN.
    x = torch.randn(4, cols)
    x[0, cols - 3] = float("nan")
    x[1, cols // 2] = float("inf")
    x[3] = float("-inf")
    y = torch.empty_like(x)
    emu.emu_softmax(1, _p(x), _p(None), _p(y), _I(4), _I(cols), _I(cols), _I(0), _I(cols), _F(1.0), _I(0), 0)
    assert y[:2].isnan().all()
    expected = reference.softmax_fwd(x[2:3].double(), 1.0, 0)[0]
    assert_close(y[2], expected, torch.softmax(x[2], -1), "softmax row")
    assert torch.equal(y[3], torch.zeros(cols))  # fully masked: zeros, the documented contract


def test_emulated_attention_nan_scores_keep_lse_nan(emu):
    # NaN in one key makes every score row NaN: lse must be NaN (it was -inf, which the backward read as "no
    # key", giving exp(s + inf) garbage instead of NaN gradients).
    q, k, v = (torch.randn(1, 1, 8, 64, dtype=torch.float16) for _ in range(3))
    k[0, 0, 3, 5] = float("nan")
    dout = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    out, lse, dq, dk, dv = _emu_attention(emu, q, k, v, False, 0.125, dout)
    assert lse.isnan().all() and out.isnan().all()
    assert dq.isnan().all() and dk.isnan().all() and dv.isnan().all()  # as torch's math attention gives


def _emu_ce(emu, fwd, x, t, ignore, ls, z, lse=None, dloss=None, out=None, col_offset=0, vocab=0):
    rows, cols = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss, lse_out = torch.empty(rows, dtype=acc), torch.empty(rows, dtype=acc)
    rc = emu.emu_ce(
        fwd, _p(x), _I(x.stride(0)), _p(t), int(t.dtype == torch.int32), _p(loss), _p(lse_out), _p(lse), _p(dloss),
        _p(out), _I(cols), _I(rows), _I(cols), _I(ignore), ctypes.c_double(ls), ctypes.c_double(z), _DT[x.dtype],
        _I(col_offset), _I(vocab),
    )
    assert rc == 0
    return (loss, lse_out) if fwd else out


@pytest.mark.parametrize("dtype", ALL + [torch.float64])
@pytest.mark.parametrize("rows,cols", [(8, 10), (7, 1000), (5, 3001), (3, 9000)])  # block sizes 128/256/256/512
@pytest.mark.parametrize("ls,z,ignore", [(0.0, 0.0, -100), (0.1, 1e-3, 3)])
def test_emulated_cross_entropy(emu, rows, cols, dtype, ls, z, ignore):
    x = torch.randn(rows, cols, dtype=dtype) * 2
    t = torch.randint(0, cols, (rows,))
    t[1] = ignore
    t_kernel = t.int() if rows % 2 else t  # both index types
    loss, lse = _emu_ce(emu, 1, x, t_kernel, ignore, ls, z)
    # loss and lse are fp32 whatever the input dtype, so the reference runs in fp64 here, against torch's
    # own CPU cross_entropy and logsumexp in the input dtype.
    # (fp64 logits: the fp64 reference is also the same-dtype torch run, so their bound is the floor.)
    ref_loss, ref_lse = reference.cross_entropy_fwd(x.double(), t, ignore, ls, z)
    xt = _leaf(x)
    tor_loss = _torch_ce(xt, t, ignore, "none", ls, z).to(loss.dtype)
    assert_close(loss, ref_loss, tor_loss, "ce loss")
    assert_close(lse, ref_lse, torch.logsumexp(x, dim=-1), "ce lse")
    dl = torch.randn(rows, dtype=lse.dtype)
    g = _emu_ce(emu, 0, x, t_kernel, ignore, ls, z, lse=lse, dloss=dl, out=torch.empty_like(x))
    ref_g = reference.cross_entropy_bwd(dl.double(), x.double(), t, ref_lse, ignore, ls, z)
    (tor_g,) = torch.autograd.grad(tor_loss, [xt], dl.to(tor_loss.dtype))
    assert_close(g, ref_g, tor_g, "ce dlogits")


def test_emulated_cross_entropy_in_place_and_bad_targets(emu):
    # In place with dloss = 1 (linear_cross_entropy's use), and NaN rows for targets outside [0, V).
    x = torch.randn(6, 515)
    t = torch.randint(0, 515, (6,))
    _, lse = _emu_ce(emu, 1, x, t, -100, 0.0, 0.0)
    g = x.clone()
    _emu_ce(emu, 0, g, t, -100, 0.0, 0.0, lse=lse, out=g)
    ones = torch.ones(6)
    ref = reference.cross_entropy_bwd(ones.double(), x.double(), t, lse.double(), -100, 0.0, 0.0)
    assert_close(g, ref, reference.cross_entropy_bwd(ones, x, t, lse, -100, 0.0, 0.0), "ce in place")
    x = torch.randn(3, 40)
    t = torch.tensor([1, 40, -5])
    loss, lse = _emu_ce(emu, 1, x, t, -100, 0.0, 0.0)
    assert loss[0].isfinite() and loss[1].isnan() and loss[2].isnan()
    g = _emu_ce(emu, 0, x, t, -100, 0.0, 0.0, lse=lse, dloss=torch.ones(3), out=torch.empty_like(x))
    assert g[0].isfinite().all() and g[1].isnan().all() and g[2].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cross_entropy_backward_over_vocab_slices(emu, dtype):
    # linear_cross_entropy's vocab pass: the backward over columns [col_offset, col_offset + cols) of a
    # 3001-class row (its own buffer, row stride cols) must reproduce those columns of the full backward.
    # Slices of 1000 (16-byte path), 1001 (scalar path) and 1000 hold targets of every row between them;
    # label smoothing and z_loss make every column depend on V, not on the slice width.
    x = torch.randn(5, 3001, dtype=dtype) * 2
    t = torch.tensor([10, 1500, 3000, -100, 2001])
    _, lse = _emu_ce(emu, 1, x, t, -100, 0.1, 1e-3)
    dl = torch.rand(5) + 0.5
    full = _emu_ce(emu, 0, x, t, -100, 0.1, 1e-3, lse=lse, dloss=dl, out=torch.empty_like(x))
    for start, stop in ((0, 1000), (1000, 2001), (2001, 3001)):
        part = x[:, start:stop].contiguous()
        _emu_ce(emu, 0, part, t, -100, 0.1, 1e-3, lse=lse, dloss=dl, out=part, col_offset=start, vocab=3001)
        torch.testing.assert_close(part, full[:, start:stop], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_cross_entropy_nan_and_inf_logits(emu, dtype):
    # The forward folds whole 16-byte vectors into the running (max, sum) pair: a NaN anywhere in a row
    # (mid-vector, or in the ragged tail past the last full vector) must still make that row's loss and lse
    # NaN; a +inf logit makes them NaN too (the block merge meets inf - inf; torch gives +inf: both are
    # non-finite, never a finite wrong loss); a -inf one changes nothing.
    x = torch.randn(5, 3001).to(dtype)
    x[0, 1000] = float("nan")
    x[1, 3000] = float("nan")
    x[2, 17] = float("inf")
    x[3, 5] = float("-inf")
    t = torch.tensor([3, 4, 5, 6, 7])
    loss, lse = _emu_ce(emu, 1, x, t, -100, 0.0, 0.0)
    assert loss[:2].isnan().all() and lse[:2].isnan().all()
    assert lse[2].isnan() and loss[2].isnan()
    ref_loss, ref_lse = reference.cross_entropy_fwd(x[3:].double(), t[3:], -100, 0.0, 0.0)
    tor = _torch_ce(_leaf(x[3:]), t[3:], -100, "none", 0.0, 0.0).float()
    assert_close(loss[3:], ref_loss, tor, "ce loss next to -inf")
    assert_close(lse[3:], ref_lse, torch.logsumexp(x[3:], dim=-1).float(), "ce lse next to -inf")


def _emu_attention(emu, q, k, v, causal, scale, dout=None, tiling=0):
    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    out, lse = torch.empty(B, Hq, L, D, dtype=q.dtype), torch.empty(B, Hq, L)
    do = dout if dout is not None else out
    strides = [s for t in (q, k, v, out, do) for s in t.stride()[:3]]
    st = (_I * 15)(*strides)
    common = (B, Hq, Hk, L, S, D, _F(scale), int(causal), _DT[q.dtype])
    none = (_p(None),) * 5
    assert emu.emu_attn(1, _p(q), _p(k), _p(v), _p(out), _p(lse), st, *common, *none, tiling) == 0
    if dout is None:
        return out, lse
    delta, dq = torch.empty(B, Hq, L), torch.zeros(B, Hq, L, D)
    dk, dv = torch.empty(B, Hk, S, D, dtype=q.dtype), torch.empty(B, Hk, S, D, dtype=q.dtype)
    grads = (_p(dout), _p(delta), _p(dq), _p(dk), _p(dv))
    assert emu.emu_attn(0, _p(q), _p(k), _p(v), _p(out), _p(lse), st, *common, *grads, 0) == 0
    return out, lse, dq.to(q.dtype), dk, dv


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    "B,Hq,Hk,L,S,D,causal",
    [
        (1, 2, 2, 70, 70, 64, True),  # a ragged second tile on the diagonal
        (1, 2, 1, 37, 100, 64, True),  # L < S causal, GQA 2:1
        (1, 4, 2, 100, 33, 128, True),  # L > S causal: rows past S see every key
        (1, 1, 1, 65, 129, 128, False),  # ragged query and key tiles
        (1, 3, 1, 1, 1, 64, False),  # one query, one key
        (2, 1, 1, 160, 160, 128, True),  # two forward query blocks of 128 (the last ragged), batch strides
        (1, 2, 2, 90, 75, 32, True),  # head dim 32: two-step products, 64-key tiles
        (1, 2, 1, 70, 140, 96, False),  # head dim 96: six 16-deep steps, 32-key tiles, dQ split in 48-wide halves
    ],
)
def test_emulated_attention(emu, B, Hq, Hk, L, S, D, causal, dtype):
    q, k, v = (torch.randn(B, h, n, D, dtype=dtype) for h, n in ((Hq, L), (Hk, S), (Hk, S)))
    dout = torch.randn(B, Hq, L, D, dtype=dtype)
    scale = 1 / math.sqrt(D)
    out, lse, dq, dk, dv = _emu_attention(emu, q, k, v, causal, scale, dout)
    rng = torch.zeros(2, dtype=torch.int64)
    ro, rlse = reference.attention_fwd(q.float(), k.float(), v.float(), None, 0.0, causal, scale, rng)
    ref_grads = reference.attention_bwd(dout.float(), q.float(), k.float(), v.float(), None, ro, rlse, 0.0, causal, scale, rng)
    low = [_leaf(t) for t in (q, k, v)]
    low_out = _attention_math(*low, causal, scale)
    low_grads = torch.autograd.grad(low_out, low, dout)
    assert_close(out, ro, low_out, "attention out")
    assert_close(lse, rlse, rlse, "attention lse", floor=1e-5)
    for name, g, r, t in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, low_grads):
        assert_close(g, r, t, f"attention {name}")


@pytest.mark.parametrize("B,Hq,Hk,L,S,D", [(1, 2, 1, 150, 150, 64), (1, 1, 1, 70, 200, 128)])
def test_emulated_attention_with_copies_landing_at_issue(emu, B, Hq, Hk, L, S, D):
    # The default emulation lands each cp.async at its wait (the latest the hardware may); this lands them at
    # issue (the earliest), so a copy into a K, V, Q or dO tile that another warp still reads would corrupt it.
    # Causal, several key tiles forward and several query steps backward, at both head dims.
    emu.emu_set_eager_copies(1)
    try:
        test_emulated_attention(emu, B, Hq, Hk, L, S, D, True, torch.float16)
    finally:
        emu.emu_set_eager_copies(0)


@pytest.mark.parametrize("D", sorted(FWD_TILINGS))
def test_emulated_attention_every_forward_tiling(emu, D):
    # Every forward tiling the binding may pick, on shapes that make each mask: L = 150 leaves a ragged last
    # query block for 64- and 128-row blocks, S = 130 a ragged last key tile for 32 and 64 keys, causal with
    # L > S puts the diagonal in several key tiles (GQA 2:1), and non-causal L < S reads every tile.
    # bf16 at head dims 64 and 128, fp16 at 32 and 96: both roundings of P, half the runs each.
    dtype = torch.bfloat16 if D in (64, 128) else torch.float16
    for tiling in range(FWD_TILINGS[D]):
        for (Hq, Hk, L, S, causal) in ((2, 1, 150, 130, True), (1, 1, 70, 100, False)):
            q, k, v = (torch.randn(1, h, n, D, dtype=dtype) for h, n in ((Hq, L), (Hk, S), (Hk, S)))
            out, lse = _emu_attention(emu, q, k, v, causal, D**-0.5, tiling=tiling)
            rng = torch.zeros(2, dtype=torch.int64)
            ro, rlse = reference.attention_fwd(q.float(), k.float(), v.float(), None, 0.0, causal, D**-0.5, rng)
            low_out = _attention_math(*(t for t in (q, k, v)), causal, D**-0.5)
            assert_close(out, ro, low_out, f"attention out, tiling {tiling}")
            assert_close(lse, rlse, rlse, f"attention lse, tiling {tiling}", floor=1e-5)
    # A tiling past the list is refused (cudaErrorInvalidValue), never run as another one.
    q = torch.randn(1, 1, 8, D, dtype=dtype)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 8)
    st = (_I * 15)(*[s for _ in range(5) for s in q.stride()[:3]])
    common = (1, 1, 1, 8, 8, D, _F(1.0), 0, _DT[dtype])
    rc = emu.emu_attn(1, _p(q), _p(q), _p(q), _p(out), _p(lse), st, *common, *(_p(None),) * 5, FWD_TILINGS[D])
    assert rc != 0


def _attention_math(q, k, v, causal, scale):
    """torch's math attention in the inputs' dtype (the CPU stand-in for a same-dtype torch run)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_emulated_attention_strided_and_no_keys(emu):
    # (B, L, H, D) storage read through strides; S = 0 gives out = 0 and lse = -inf.
    q, k, v = (torch.randn(1, 80, 2, 64, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    out, _ = _emu_attention(emu, q, k, v, True, 0.125)
    ro, _ = reference.attention_fwd(q.float(), k.float(), v.float(), None, 0.0, True, 0.125, torch.zeros(2, dtype=torch.int64))
    assert_close(out, ro, ro.half(), "attention strided out")
    q = torch.randn(1, 1, 5, 64, dtype=torch.float16)
    empty = torch.randn(1, 1, 0, 64, dtype=torch.float16)
    out, lse = _emu_attention(emu, q, empty, empty, False, 0.125)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
