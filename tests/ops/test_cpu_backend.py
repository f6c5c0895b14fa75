"""The "cpu" backend (gptfast._C's C++ kernels) against the reference, through the public ops.

Every output and gradient is checked with design.md's rule (gptfast.testing.assert_close): the reference runs
in fp64 for fp32 inputs and in fp32 for fp16/bf16 inputs, and torch's own op in the tested dtype sets the bound.
"""
import pytest
import torch
import torch.nn.functional as F

from gptfast import backends, ops
from gptfast.testing import assert_close, reference_dtype

pytestmark = pytest.mark.skipif(
    backends.why_not("cpu", "softmax", torch.device("cpu")) is not None,
    reason=f"cpu backend unavailable: {backends.why_not('cpu', 'softmax', torch.device('cpu'))}",
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _grads(out, inputs, seed=1):
    """(out, grads of <out, g> w.r.t. inputs) for a fixed random g."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _check(name, fn_cpu, fn_ref, fn_torch, tensors, dtype, floor=None):
    """Runs the three versions on copies of `tensors` and checks the output and every gradient."""
    rd = reference_dtype(dtype)
    a = _leaves(*tensors)
    r = _leaves(*tensors, dtype=rd)
    t = _leaves(*tensors)
    out, ref, tout = fn_cpu(*a), fn_ref(*r), fn_torch(*t)
    assert out.dtype == dtype
    assert_close(out, ref, tout, f"{name} output", floor)
    for i, (ga, gr, gt) in enumerate(zip(_grads(out, a), _grads(ref, r), _grads(tout, t))):
        assert_close(ga, gr, gt, f"{name} grad[{i}]", floor)


# ------------------------------------------------------------------------------------------------- softmax
def _torch_softmax(x, dim, scale, causal):
    s = x * scale
    if causal:
        L, S = x.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).tril().logical_not(), float("-inf"))
    return torch.softmax(s, dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 1),  # a single element: the vector loop never runs
        (7, 13),  # N below and not a multiple of the vector width: the scalar tail alone
        (3, 33, 70),  # 3-d, odd sizes, vector body plus tail
        (2, 20000),  # a long row (80 KB fp32): past L1, many vectors
    ],
)
@pytest.mark.parametrize("scale,causal", [(None, False), (0.37, False), (1.7, True)])
def test_softmax(dtype, shape, scale, causal):
    x = torch.randn(shape, dtype=dtype) * 3
    sc = 1.0 if scale is None else scale
    _check(
        "softmax",
        lambda x: ops.softmax(x, scale=scale, causal=causal, backend="cpu"),
        lambda x: ops.softmax(x, scale=scale, causal=causal, backend="reference"),
        lambda x: _torch_softmax(x, -1, sc, causal),
        [x],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_non_contiguous_dim0(dtype):
    # softmax over dim 0 of a transposed view: the op moves the axis and the kernel sees a copied layout.
    x = torch.randn(40, 29, dtype=dtype).t()
    _check(
        "softmax",
        lambda x: ops.softmax(x, dim=0, backend="cpu"),
        lambda x: ops.softmax(x, dim=0, backend="reference"),
        lambda x: torch.softmax(x, 0),
        [x],
        dtype,
    )


def test_softmax_causal_rectangular_and_empty():
    # L < S (top-left causal keeps j <= i) and an empty batch.
    x = torch.randn(2, 5, 11)
    torch.testing.assert_close(
        ops.softmax(x, causal=True, backend="cpu"), ops.softmax(x.double(), causal=True, backend="reference").float()
    )
    assert ops.softmax(torch.randn(0, 7), backend="cpu").shape == (0, 7)


# ------------------------------------------------------------------------------------------- cross entropy
def _torch_ce(x, t, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    if x.dtype == torch.float16 and label_smoothing:
        # torch's fp16 CPU cross_entropy sums the smoothing term in fp16 and overflows past ~6000 classes; torch
        # in fp32, rounded to fp16, stands in for it.
        return _torch_ce(x.float(), t, ignore_index, label_smoothing, z_loss, reduction).to(x.dtype)
    x2, t2 = x.reshape(-1, x.shape[-1]), t.reshape(-1)
    rows = F.cross_entropy(x2, t2.long(), ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        rows = rows + torch.where(t2 != ignore_index, z_loss * torch.logsumexp(x2, -1) ** 2, 0.0).to(rows.dtype)
    if reduction == "none":
        return rows.reshape(t.shape)
    total = rows.sum()
    return total if reduction == "sum" else total / (t2 != ignore_index).sum()


def _targets(shape, classes, ignore_index=-100, dtype=torch.int64):
    t = torch.randint(0, classes, shape, dtype=dtype)
    t.view(-1)[::5] = ignore_index  # every fifth row ignored
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        (5, 3),  # fewer classes than a vector: scalar tails only
        (37, 1001),  # odd row count and class count
        (3, 9000),  # a row longer than the online-LSE block (2048): the running sum is rescaled
        (2, 3, 17),  # (B, T, C) logits
    ],
)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"z_loss": 1e-3},
        {"label_smoothing": 0.2, "z_loss": 1e-2, "ignore_index": 1},  # a class index as ignore_index
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(dtype, shape, options, reduction):
    x = torch.randn(shape, dtype=dtype) * 4
    t = _targets(shape[:-1], shape[-1], options.get("ignore_index", -100))
    _check(
        "cross_entropy",
        lambda x: ops.cross_entropy(x, t, reduction=reduction, backend="cpu", **options),
        lambda x: ops.cross_entropy(x, t, reduction=reduction, backend="reference", **options),
        lambda x: _torch_ce(x, t, reduction=reduction, **options),
        [x],
        dtype,
    )


def test_cross_entropy_int32_targets_and_non_contiguous_logits():
    # int32 targets are widened inside; a transposed (non-contiguous) logits view goes through .contiguous().
    x = torch.randn(300, 23).t()
    t = torch.randint(0, 300, (23,), dtype=torch.int32)
    _check(
        "cross_entropy",
        lambda x: ops.cross_entropy(x, t, backend="cpu", label_smoothing=0.05),
        lambda x: ops.cross_entropy(x, t, backend="reference", label_smoothing=0.05),
        lambda x: _torch_ce(x, t, label_smoothing=0.05),
        [x],
        torch.float32,
    )


def test_cross_entropy_all_ignored_and_empty():
    # torch's contract: all rows ignored gives 0 for 'sum' and NaN for 'mean'; no rows at all works too.
    x, t = torch.randn(4, 9, requires_grad=True), torch.full((4,), -100)
    assert ops.cross_entropy(x, t, reduction="sum", backend="cpu").item() == 0.0
    assert ops.cross_entropy(x, t, reduction="mean", backend="cpu").isnan()
    ops.cross_entropy(x, t, reduction="sum", backend="cpu").backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert ops.cross_entropy(torch.randn(0, 9), torch.zeros(0, dtype=torch.long), reduction="none", backend="cpu").shape == (0,)


@pytest.mark.parametrize("op", ["softmax", "cross_entropy"])
def test_outputs_past_the_huge_page_threshold_match_small_calls(op):
    # 1024 x 2049 fp32 is just over 8 MiB: the outputs (y, dx, dlogits) take the madvise(MADV_HUGEPAGE)
    # path, at an address that is not 2 MiB aligned and a size that is not a multiple of 2 MiB. Rows are
    # independent, so the same rows in 2 MiB calls (below the threshold) must give bitwise the same gradient.
    x = torch.randn(1024, 2049) * 3
    t = _targets((1024,), 2049)
    g = torch.randn(1024, 2049)
    run = {
        "softmax": lambda x, rows: (ops.softmax(x, scale=0.7, backend="cpu") * g[rows]).sum(),
        "cross_entropy": lambda x, rows: ops.cross_entropy(
            x, t[rows], reduction="sum", label_smoothing=0.1, backend="cpu"
        ),
    }[op]

    def out_and_grad(rows):
        xs = x[rows].clone().requires_grad_()
        out = run(xs, rows)
        out.backward()
        return out.detach(), xs.grad

    big_out, big_grad = out_and_grad(slice(0, 1024))
    parts = [out_and_grad(slice(i, i + 256)) for i in range(0, 1024, 256)]
    assert torch.equal(big_grad, torch.cat([grad for _, grad in parts]))
    torch.testing.assert_close(big_out, sum(out for out, _ in parts))  # the sums differ only in their order


def test_nan_logits_propagate_like_torch():
    # The kernels' own vector exp must keep NaN a NaN (ATen's exp_u20 turns it into +inf): the NaN row of the
    # softmax, and the NaN and +inf rows of the cross-entropy and of its gradient, are NaN in the same places
    # as torch's. -inf is an ordinary masked logit. (Softmax row 2, +inf, is left out: the kernel gives one
    # NaN there where torch's whole row is NaN.)
    x = torch.randn(4, 40)
    x[1, 7], x[2, 3], x[3, 5] = float("nan"), float("inf"), float("-inf")
    t = torch.tensor([0, 1, 2, 3])
    g = torch.randn(4, 40)

    def run(softmax, ce):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, loss = softmax(a), ce(b)
        y.backward(g)
        loss.sum().backward()
        return y[:2], a.grad[:2], loss, b.grad

    ours = run(
        lambda x: ops.softmax(x, backend="cpu"),
        lambda x: ops.cross_entropy(x, t, reduction="none", backend="cpu"),
    )
    theirs = run(lambda x: torch.softmax(x, -1), lambda x: F.cross_entropy(x, t, reduction="none"))
    for o, r in zip(ours, theirs):
        assert torch.equal(o.isnan(), r.isnan())
        torch.testing.assert_close(o.nan_to_num(), r.nan_to_num())


@pytest.mark.parametrize("bad", [9, -1, 1000])
def test_cross_entropy_out_of_range_target(bad):
    # A target outside [0, C) that is not ignore_index is an IndexError naming the value and the range.
    t = torch.tensor([0, bad, 3])
    with pytest.raises(IndexError, match=rf"\[0, 9\).*got {bad}"):
        ops.cross_entropy(torch.randn(3, 9), t, backend="cpu")


# ------------------------------------------------------------------------------------ linear cross entropy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "chunk_size,rows",
    [
        (None, 37),  # Liger's default chunking
        (1, 5),  # one row per chunk
        (16, 37),  # a ragged last chunk
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy(dtype, bias, chunk_size, rows, reduction):
    H, V = 24, 301
    h = torch.randn(rows, H, dtype=dtype)
    w = torch.randn(V, H, dtype=dtype) * 0.3
    b = torch.randn(V, dtype=dtype) if bias else None
    t = _targets((rows,), V)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction, chunk_size=chunk_size)
    tensors = [h, w] + ([b] if bias else [])

    def run(backend):
        return lambda h, w, *b: ops.linear_cross_entropy(h, w, t, b[0] if b else None, backend=backend, **opts)

    def torch_fn(h, w, *b):
        opts_t = {k: v for k, v in opts.items() if k != "chunk_size"}
        return _torch_ce(F.linear(h, w, b[0] if b else None), t, **opts_t)

    _check("linear_cross_entropy", run("cpu"), run("reference"), torch_fn, tensors, dtype)


def test_linear_cross_entropy_3d_and_empty():
    # (B, T, H) hidden through the public op, and no rows at all.
    h, w = torch.randn(2, 5, 16), torch.randn(50, 16)
    t = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(
        ops.linear_cross_entropy(h, w, t, backend="cpu", chunk_size=3),
        ops.linear_cross_entropy(h.double(), w.double(), t, backend="reference").float(),
    )
    empty = ops.linear_cross_entropy(torch.randn(0, 16), w, torch.zeros(0, dtype=torch.long), reduction="none", backend="cpu")
    assert empty.shape == (0,)


# ------------------------------------------------------------------------------------------------ attention
ATTENTION_SHAPES = [
    # (B, Hq, Hk, L, S, D, Dv)
    (1, 1, 1, 1, 1, 8, 8),  # a single query and key
    (2, 3, 3, 70, 70, 64, 64),  # L, S not multiples of the 64-row tile
    (1, 4, 2, 33, 130, 40, 24),  # GQA, L < S, head dims off the vector width, Dv != D
    (1, 6, 2, 150, 47, 13, 13),  # GQA 3:1, L > S (causal rows past S see every key), odd head dim
]


def _attn_inputs(shape, dtype):
    B, Hq, Hk, L, S, D, Dv = shape
    return torch.randn(B, Hq, L, D, dtype=dtype), torch.randn(B, Hk, S, D, dtype=dtype), torch.randn(B, Hk, S, Dv, dtype=dtype)


def _torch_sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


def _check_attention(q, k, v, dtype, attn_mask=None, **kw):
    gqa = q.shape[1] != k.shape[1]

    def mask(q):  # an additive mask must have the query's dtype, which differs between the three runs
        return attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)

    _check(
        "attention",
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, mask(q), enable_gqa=gqa, backend="cpu", **kw),
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, mask(q), enable_gqa=gqa, backend="reference", **kw),
        lambda q, k, v: _torch_sdpa(q, k, v, attn_mask=mask(q), **kw),
        [q, k, v],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("is_causal,scale", [(False, None), (True, None), (True, 0.3)])
def test_attention(dtype, shape, is_causal, scale):
    q, k, v = _attn_inputs(shape, dtype)
    _check_attention(q, k, v, dtype, is_causal=is_causal, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "additive", "broadcast_bool"])
def test_attention_masks(dtype, kind):
    shape = (2, 4, 2, 37, 70, 32, 32)
    q, k, v = _attn_inputs(shape, dtype)
    B, Hq, _, L, S, _, _ = shape
    if kind == "bool":
        mask = torch.rand(B, Hq, L, S) > 0.3
    elif kind == "additive":
        mask = torch.randn(B, 1, L, S, dtype=dtype)  # broadcast over heads, read through stride 0
    else:
        mask = torch.rand(L, S) > 0.5  # broadcast over batch and heads
    _check_attention(q, k, v, dtype, attn_mask=mask)


def test_attention_fully_masked_rows():
    # Rows whose mask keeps nothing: out = 0 and zero gradients into them, never NaN.
    q, k, v = (t.requires_grad_() for t in _attn_inputs((1, 2, 2, 9, 11, 16, 16), torch.float32))
    mask = torch.rand(9, 11) > 0.4
    mask[3] = False
    out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cpu")
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))
    assert not any(g.isnan().any() for g in (q.grad, k.grad, v.grad))
    ref = ops.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, backend="reference")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("masking", ["causal", "additive"])
def test_attention_backward_fused_and_split(threads, masking):
    # The backward sweeps each kv head in one task when there are enough kv heads for the threads, and else
    # splits into a dK/dV pass and a dQ pass: these 2 kv heads take the fused sweep on 1 thread and the split
    # passes on 8. GQA 2:1, L != S and ragged tiles in both.
    q, k, v = _attn_inputs((1, 4, 2, 70, 90, 24, 16), torch.float32)
    kw = {"is_causal": True} if masking == "causal" else {"attn_mask": torch.randn(1, 4, 70, 90)}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _check_attention(q, k, v, torch.float32, **kw)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_non_contiguous_and_unbatched(dtype):
    # q/k/v as transposes of (B, L, H, D) tensors (the usual projection layout), and a 3-d (H, L, D) call.
    q, k, v = (torch.randn(2, 50, 4, 32, dtype=dtype).transpose(1, 2) for _ in range(3))
    _check_attention(q, k, v, dtype, is_causal=True)
    q3, k3, v3 = (t[0] for t in (q, k, v))
    _check_attention(q3, k3, v3, dtype)


# ---------------------------------------------------------------------------------------------- refusals
def test_attention_dropout_refused_by_name_and_auto_falls_back():
    q, k, v = _attn_inputs((1, 2, 2, 8, 8, 8, 8), torch.float32)
    with pytest.raises(backends.BackendUnavailable, match="cpu.*dropout"):
        ops.scaled_dot_product_attention(q, k, v, dropout_p=0.1, backend="cpu")
    assert backends.select("attention", torch.device("cpu"), dropout=True, dtype=torch.float32) == "reference"
    assert ops.scaled_dot_product_attention(q, k, v, dropout_p=0.1).shape == q.shape


def test_attention_fp64_refused():
    q, k, v = _attn_inputs((1, 1, 1, 4, 4, 8, 8), torch.float64)
    with pytest.raises(backends.BackendUnavailable, match="float32, float16 or bfloat16"):
        ops.scaled_dot_product_attention(q, k, v, backend="cpu")


def test_fp64_softmax_and_cross_entropy_run_in_fp64():
    # fp64 inputs keep fp64 math (float64 gradcheck of the cpu kernels).
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (3,))
    assert torch.autograd.gradcheck(lambda x: ops.softmax(x, scale=0.5, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda x: ops.cross_entropy(x, t, label_smoothing=0.1, z_loss=0.01, backend="cpu"), (x,))


# ----------------------------------------------------------------------------------------- thread counts
@pytest.mark.parametrize("op", ["softmax", "cross_entropy", "linear_cross_entropy", "attention"])
def test_forward_bitwise_same_with_1_and_2_threads(op):
    # Each output element is computed by exactly one task, so the split across threads cannot change it.
    x = torch.randn(67, 3001)
    t = torch.randint(0, 3001, (67,))
    q, k, v = _attn_inputs((1, 3, 3, 130, 130, 40, 40), torch.float32)
    h, w = torch.randn(67, 32), torch.randn(3001, 32)
    run = {
        "softmax": lambda: ops.softmax(x, causal=True, backend="cpu"),
        "cross_entropy": lambda: ops.cross_entropy(x, t, reduction="none", label_smoothing=0.1, backend="cpu"),
        "linear_cross_entropy": lambda: ops.linear_cross_entropy(h, w, t, reduction="none", chunk_size=16, backend="cpu"),
        "attention": lambda: ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu"),
    }[op]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
