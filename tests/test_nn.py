"""gptfast.nn modules against their torch counterparts: values and gradients, with design.md's tolerance rule.

Each check runs the gptfast module in fp32, torch's module in fp32 (torch's own error) and torch's module in
fp64 (the reference), then applies gptfast.testing.assert_close to the output and every gradient.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from gptfast import nn
from gptfast.testing import assert_close


def _run(module, inputs, dtype=None):
    """Output and input gradients of module(*inputs) under a fixed random upstream gradient."""
    leaves = [
        t.detach().to(dtype or t.dtype).requires_grad_() if t.is_floating_point() else t for t in inputs
    ]
    out = module(*leaves)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * upstream.to(out.dtype)).sum().backward()
    return out, [t.grad for t in leaves if t.is_floating_point()]


def _check(ours, theirs, inputs):
    out, grads = _run(ours, inputs)
    torch_out, torch_grads = _run(theirs, inputs)
    ref_out, ref_grads = _run(copy.deepcopy(theirs).double(), inputs, torch.float64)
    assert_close(out, ref_out, torch_out, "output")
    for i, (g, r, t) in enumerate(zip(grads, ref_grads, torch_grads)):
        assert_close(g, r, t, f"grad of input {i}")


# ------------------------------------------------------------------------------------------ Softmax
@pytest.mark.parametrize(
    "shape, dim",
    [
        ((4, 33), -1),  # rows of a non-power-of-two width
        ((3, 5, 7), 1),  # a middle dim
        ((2, 9), 0),  # the first dim
    ],
)
def test_softmax_equals_torch(shape, dim):
    _check(nn.Softmax(dim), torch.nn.Softmax(dim), [torch.randn(shape)])


@pytest.mark.parametrize(
    "shape", [(5,), (3, 4), (2, 3, 4)]
)  # the 1-, 2- and 3-d cases of torch's legacy rule
def test_softmax_dim_none_follows_torch(shape):
    x = torch.randn(shape)
    with pytest.warns(UserWarning):
        expected = torch.nn.Softmax()(x)  # torch warns about the implicit dim; gptfast follows it silently
    torch.testing.assert_close(nn.Softmax()(x), expected)


def test_softmax_scale_and_causal_match_their_formula():
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    y = nn.Softmax(-1, scale=0.5, causal=True)(x)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    torch.testing.assert_close(y, torch.softmax((0.5 * x).masked_fill(mask, float("-inf")), -1))


# ------------------------------------------------------------------------------------- CrossEntropy
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(reduction="sum", label_smoothing=0.1),
        dict(reduction="none", ignore_index=3),
    ],
)
def test_cross_entropy_loss_equals_torch_2d(kwargs):
    logits, target = torch.randn(13, 37), torch.randint(0, 37, (13,))
    target[::4] = kwargs.get("ignore_index", -100)  # some ignored rows
    _check(nn.CrossEntropyLoss(**kwargs), torch.nn.CrossEntropyLoss(**kwargs), [logits, target])


def test_cross_entropy_loss_is_class_last_with_class_dim_minus_1():
    # (B, T, C) logits as a GPT makes them: class_dim=-1 reads them as they are, with no transpose.
    class TorchClassLast(torch.nn.CrossEntropyLoss):
        def forward(self, input, target):
            return super().forward(input.transpose(1, 2), target)

    logits, target = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ours = nn.CrossEntropyLoss(label_smoothing=0.2, class_dim=-1)
    _check(ours, TorchClassLast(label_smoothing=0.2), [logits, target])


class _OnComputedLogits(torch.nn.Module):
    """loss(2 * x, t): the in-place backward needs computed logits, as a model's are."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, x, target):
        return self.loss(2.0 * x, target)


@pytest.mark.parametrize("shape", [(13, 37), (2, 7, 3, 4)])  # class-last rows, and torch's (N, C, d1, d2)
def test_cross_entropy_loss_inplace_backward_equals_torch(shape):
    logits = torch.randn(shape)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    target.view(-1)[::4] = -100
    ours = _OnComputedLogits(nn.CrossEntropyLoss(label_smoothing=0.1, inplace_backward=True))
    _check(ours, _OnComputedLogits(torch.nn.CrossEntropyLoss(label_smoothing=0.1)), [logits, target])
    assert "inplace_backward=True" in repr(ours)
    # the module passes the flag on: the rows' gradient comes back in the rows' own storage
    rows = (2.0 * logits.requires_grad_()).movedim(1, -1).reshape(-1, shape[1]).contiguous()
    seen = []
    rows.register_hook(lambda g: seen.append(g.data_ptr()))
    nn.CrossEntropyLoss(inplace_backward=True, class_dim=-1)(rows, target.reshape(-1)).backward()
    assert seen == [rows.data_ptr()]


def test_cross_entropy_loss_is_a_drop_in_for_torchs():
    # torch's layout (N, C, d1, d2) by default, and torch's constructor, positional arguments included:
    # (weight, size_average, ignore_index, reduce, reduction, label_smoothing).
    logits, target = torch.randn(2, 7, 3, 4), torch.randint(0, 7, (2, 3, 4))
    target[0, 0] = -100
    for reduction in ("mean", "none"):
        ours, theirs = (
            nn.CrossEntropyLoss(reduction=reduction),
            torch.nn.CrossEntropyLoss(reduction=reduction),
        )
        _check(ours, theirs, [logits, target])
    args = (None, None, 3, None, "sum", 0.1)  # ignore_index 3
    _check(nn.CrossEntropyLoss(*args), torch.nn.CrossEntropyLoss(*args), [logits, target.clamp_min(0)])
    with pytest.warns(UserWarning):  # torch's deprecated size_average/reduce, read as torch reads them
        legacy = nn.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    with pytest.raises(
        ValueError, match=r"target must have shape \(2, 3, 4\).*got \(2, 7, 3\).*class_dim=-1"
    ):
        nn.CrossEntropyLoss()(logits, torch.randint(0, 7, (2, 7, 3)))  # as if the logits were class-last
    with pytest.raises(
        ValueError, match=r"class_dim must be 1 \(torch's layout\) or -1 \(class-last\), got 2"
    ):
        nn.CrossEntropyLoss(class_dim=2)
    with pytest.raises(ValueError, match=r"weight \(per-class weights\) is not supported.*shape \(7,\)"):
        nn.CrossEntropyLoss(torch.rand(7))


def test_cross_entropy_z_loss_matches_its_formula():
    logits, target = torch.randn(6, 9, dtype=torch.float64), torch.randint(0, 9, (6,))
    lse = torch.logsumexp(logits, -1)
    expected = (F.cross_entropy(logits, target, reduction="none") + 1e-2 * lse**2).mean()
    torch.testing.assert_close(nn.CrossEntropyLoss(z_loss=1e-2)(logits, target), expected)


# ------------------------------------------------------------------------------- LinearCrossEntropy
class _TorchLinearCE(torch.nn.Module):
    """The unfused computation: full logits, then torch's cross-entropy."""

    def __init__(self, **kwargs):
        super().__init__()
        self.loss = torch.nn.CrossEntropyLoss(**kwargs)

    def forward(self, hidden, weight, target, bias=None):
        logits = F.linear(hidden, weight, bias)
        return self.loss(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


@pytest.mark.parametrize(
    "with_bias, chunk_size, reduction",
    [
        (False, None, "mean"),  # the default chunking
        (True, 5, "sum"),  # chunks that do not divide the 18 rows, and a bias
        (False, 4, "none"),  # per-row losses take the recompute backward
    ],
)
def test_linear_cross_entropy_loss_equals_torch(with_bias, chunk_size, reduction):
    hidden, weight, target = torch.randn(3, 6, 16), torch.randn(29, 16) * 0.3, torch.randint(0, 29, (3, 6))
    target[0, 0] = -100
    inputs = [hidden, weight, target] + ([torch.randn(29)] if with_bias else [])
    ours = nn.LinearCrossEntropyLoss(reduction=reduction, chunk_size=chunk_size)
    if reduction == "none":
        # torch's 'none' returns (N,); ours keeps target's (B, T) shape.
        ours_flat = lambda *a: ours(*a).reshape(-1)  # noqa: E731
        _check(ours_flat, _TorchLinearCE(reduction=reduction), inputs)
    else:
        _check(ours, _TorchLinearCE(reduction=reduction), inputs)


# -------------------------------------------------------------------------------- CausalSelfAttention
class _TorchAttention(torch.nn.Module):
    """The same layer written with torch's SDPA, sharing the gptfast layer's weights."""

    def __init__(self, layer: nn.CausalSelfAttention):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = layer.c_attn, layer.c_proj, layer.n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def _param_grads(module, x):
    module.zero_grad()
    out = module(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype))
    return out, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize(
    "bias, T", [(True, 9), (False, 1)]
)  # odd length with biases; one position, no biases
def test_causal_self_attention_equals_torch(bias, T):
    layer = nn.CausalSelfAttention(24, 3, dropout=0.1, bias=bias).eval()  # eval: dropout off, comparable
    _check(layer, _TorchAttention(layer), [torch.randn(2, T, 24)])
    # Parameter gradients, under the same rule.
    x = torch.randn(2, T, 24)
    out, grads = _param_grads(layer, x)
    torch_out, torch_grads = _param_grads(_TorchAttention(layer), x)
    ref = _TorchAttention(copy.deepcopy(layer).double())
    ref_out, ref_grads = _param_grads(ref, x.double())
    for name in grads:
        assert_close(grads[name], ref_grads[name], torch_grads[name], f"grad of {name}")


def test_causal_self_attention_in_chunks_with_a_cache():
    # Prefill 4 positions, add 3 at once (the explicit-mask path), then 1 (no mask): equal to one full pass.
    layer = nn.CausalSelfAttention(16, 2).eval()
    x = torch.randn(2, 8, 16)
    cache = nn.KVCache(capacity=8)
    chunks = [layer(x[:, :4], cache), layer(x[:, 4:7], cache), layer(x[:, 7:], cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), layer(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exceed the capacity 8"):
        layer(x[:, :1], cache)


def test_causal_self_attention_dropout_is_seeded():
    layer = nn.CausalSelfAttention(16, 2, dropout=0.3)
    x = torch.randn(1, 6, 16)
    torch.manual_seed(9)
    a = layer(x)
    torch.manual_seed(9)
    assert torch.equal(a, layer(x)) and not torch.equal(a, layer(x))


def test_causal_self_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match=r"n_embd \(10\) must be a multiple of n_head \(3\)"):
        nn.CausalSelfAttention(10, 3)


def test_modules_pass_their_backend():
    x, t = torch.randn(3, 4), torch.randint(0, 4, (3,))
    for module, args in [
        (nn.Softmax(-1, backend="cuda"), (x,)),
        (nn.CrossEntropyLoss(backend="cuda"), (x, t)),
    ]:
        with pytest.raises(
            RuntimeError, match="'cuda'"
        ):  # named, so refused on CPU tensors: it was passed on
            module(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_under_cuda_autocast_returns_float32_as_torch(dtype):
    # CUDA autocast runs softmax in float32; gptfast's op is a custom op outside its lists, so the module
    # upcasts itself (patch swaps it for torch's one in arbitrary models).
    x = torch.randn(8, 300, device="cuda", dtype=dtype)
    with torch.autocast("cuda", dtype=dtype):
        ours, theirs = nn.Softmax(dim=-1)(x), torch.nn.Softmax(dim=-1)(x)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
