"""Property tests (issue 7): hypothesis draws shapes, dtypes and options for every op, and every backend that
runs here is held to gptfast's reference backend run in higher precision by design.md's rule, on the output
and on every gradient, with the larger of torch's and the reference backend's same-dtype errors as the budget
(torch_spec.check says why).

The default hypothesis profile ("ci", tests/conftest.py) runs a bounded, derandomized set of examples per op
and backend; `--hypothesis-profile=long` runs thousands over the file with fresh ones. Inputs come from a
torch generator seeded by hypothesis, so a failure's seed reproduces it. Sizes stay small (the Triton
interpreter is slow); what the draws explore is the combinations: ragged lengths, empty dims, every option,
GQA, masks. A tiny case is checked over a few independent draws of its shapes pooled together, so that the
rule compares maxima over enough elements to be a statistic (TINY, POOLED below).

fp32 logits are drawn with std <= 4: fp32 logits far from zero meet the fp32-lse precision limit that
test_odd_inputs.test_fp32_logits_far_from_zero_lose_gradient_precision documents.
"""

import pytest
import torch

from gptfast import ops

import torch_spec as spec
from backends_under_test import cases
from torch_spec import check, refusal

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings = hypothesis.given, hypothesis.settings

pytestmark = pytest.mark.usefixtures("single_thread")


def examples(share: float) -> int:
    """`share` of the active profile's max_examples (the slow interpreter cases take a smaller share)."""
    return max(1, int(settings.default.max_examples * share))


def _backends(op):
    return [pytest.param(b, d, id=f"{b}-{d}") for b, d in cases(op)]


def _dtypes(backend, device):
    interpreted = backend == "triton" and device == "cpu"
    return st.sampled_from([torch.float32, torch.float16] + ([] if interpreted else [torch.bfloat16]))


def _randn(gen, shape, scale=1.0):
    return torch.randn(shape, generator=gen) * scale


def _gen(seed):
    return torch.Generator().manual_seed(seed)


SEEDS = st.integers(0, 2**31 - 1)

# Cases of fewer input elements than this are checked over POOLED independent draws of the same shapes
# (torch_spec.check's `draws`): on a few dozen elements one max error is a single rounding, not a statistic.
TINY, POOLED = 1024, 4


def draws(make, gen):
    """make(gen) -> inputs, and the extra draws check() pools with them when the case is tiny."""
    inputs = make(gen)
    size = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    return inputs, [make(gen) for _ in range(POOLED - 1)] if size < TINY else []


# ---------------------------------------------------------------------------------------------- softmax
@st.composite
def softmax_cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.integers(0, 5)) for _ in range(ndim - 1)] + [draw(st.integers(0, 70))]
    dim = draw(st.integers(-ndim, ndim - 1))
    causal = ndim >= 2 and dim in (-1, ndim - 1) and draw(st.booleans())
    scale = draw(st.none() | st.floats(-3.0, 3.0, allow_nan=False))
    transposed = ndim >= 2 and draw(st.booleans())
    return shape, dim, causal, scale, transposed, draw(st.floats(0.1, 8.0)), draw(SEEDS)


@pytest.mark.parametrize("backend,device", _backends("softmax"))
@settings(max_examples=examples(1.0))
@given(case=softmax_cases(), data=st.data())
def test_softmax(backend, device, case, data):
    shape, dim, causal, scale, transposed, magnitude, seed = case
    dtype = data.draw(_dtypes(backend, device))
    stored = shape if not transposed else shape[:-2] + shape[-2:][::-1]
    inputs, more = draws(lambda gen: [_randn(gen, stored, magnitude)], _gen(seed))
    kw = dict(dim=dim, scale=scale, causal=causal)
    check(
        lambda x: ops.softmax(x, backend=backend, **kw),
        lambda x: spec.softmax(x, **kw),
        inputs,
        dtype,
        draws=more,
        view=(lambda x: [x.transpose(-1, -2)]) if transposed else None,
        expected=lambda x: ops.softmax(x, backend="reference", **kw),
        name=f"softmax {shape} {kw} {dtype}",
        device=device,
        expected_budget=backend != "reference",
    )


# ------------------------------------------------------------------------------------------ cross entropy
@st.composite
def ce_options(draw, classes):
    ignore_index = draw(st.sampled_from([-100, 0, classes - 1]))
    return dict(
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0]) | st.floats(0.0, 1.0)),
        z_loss=draw(st.sampled_from([0.0]) | st.floats(1e-5, 1e-2)),
    )


def _targets(gen, shape, classes, ignore_share, ignore_index, dtype):
    t = torch.randint(0, classes, shape, generator=gen)
    ignored = torch.rand(shape, generator=gen) < ignore_share
    return torch.where(ignored, ignore_index, t).to(dtype)


@st.composite
def ce_cases(draw):
    classes = draw(st.integers(1, 300))
    rows = draw(
        st.sampled_from([(), (0,), (1,)])
        | st.tuples(st.integers(0, 12))
        | st.tuples(st.integers(1, 3), st.integers(0, 5))
    )
    return (
        rows,
        classes,
        draw(ce_options(classes)),
        draw(st.sampled_from([0.0, 0.2, 1.0])),  # share of rows ignored
        draw(st.sampled_from([torch.int64, torch.int32])),
        draw(st.booleans()),  # logits a transposed view
        draw(SEEDS),
    )


def _logit_scale(data, dtype):
    return data.draw(st.floats(0.5, 4.0 if dtype == torch.float32 else 30.0))


@pytest.mark.parametrize("backend,device", _backends("cross_entropy"))
@settings(max_examples=examples(1.0))
@given(case=ce_cases(), data=st.data())
def test_cross_entropy(backend, device, case, data):
    rows, classes, options, ignore_share, tdtype, transposed, seed = case
    dtype = data.draw(_dtypes(backend, device))
    scale = _logit_scale(data, dtype)
    view = (lambda x, t: (x.t(), t)) if transposed and len(rows) == 1 else None
    stored = (classes, *rows) if view else (*rows, classes)

    def make(gen):
        x = _randn(gen, stored, scale)
        return [x, _targets(gen, rows, classes, ignore_share, options["ignore_index"], tdtype)]

    inputs, more = draws(make, _gen(seed))
    x = inputs[0]
    inplace = data.draw(st.booleans())

    def ours(x, t):
        # the in-place backward takes computed logits; a clone is exact both ways
        x = x.clone() if inplace and x.requires_grad else x
        return ops.cross_entropy(x, t, backend=backend, inplace_backward=inplace, **options)

    check(
        ours,
        lambda x, t: spec.cross_entropy(x, t, **options),
        inputs,
        dtype,
        draws=more,
        view=view,
        expected=lambda x, t: ops.cross_entropy(x, t, backend="reference", **options),
        name=f"cross_entropy {tuple(x.shape)} {options} {dtype} inplace_backward={inplace}",
        device=device,
        expected_budget=backend != "reference",
    )


# ----------------------------------------------------------------------------------- linear cross entropy
@st.composite
def lce_cases(draw):
    rows = draw(
        st.sampled_from([(0,), (1,)])
        | st.tuples(st.integers(0, 20))
        | st.tuples(st.integers(1, 2), st.integers(1, 6))
    )
    # hidden >= 2: with one hidden unit dhidden is a sum over the vocabulary that cancels to near 0, and the
    # rule then compares rounding noise with rounding noise (the first long run's LCE failures, 1.1-1.4x)
    hidden, classes = draw(st.integers(2, 32)), draw(st.integers(1, 200))
    n = 1
    for r in rows:
        n *= r
    chunk = draw(st.none() | st.integers(1, n + 3))
    return rows, hidden, classes, draw(st.booleans()), chunk, draw(ce_options(classes)), draw(SEEDS)


@pytest.mark.parametrize("backend,device", _backends("linear_cross_entropy"))
@settings(max_examples=examples(0.75))
@given(case=lce_cases(), data=st.data())
def test_linear_cross_entropy(backend, device, case, data):
    rows, H, V, bias, chunk_size, options, seed = case
    dtype = data.draw(_dtypes(backend, device))
    scale = _logit_scale(data, dtype)

    def make(gen):
        inputs = [_randn(gen, (*rows, H)), _randn(gen, (V, H), scale / H**0.5)]
        inputs.append(_targets(gen, rows, V, 0.2, options["ignore_index"], torch.int64))
        return inputs + ([_randn(gen, (V,))] if bias else [])

    inputs, more = draws(make, _gen(seed))
    kw = dict(options, chunk_size=chunk_size)
    check(
        lambda *a: ops.linear_cross_entropy(*a, backend=backend, **kw),
        lambda *a: spec.linear_cross_entropy(*a, **kw),
        inputs,
        dtype,
        draws=more,
        expected=lambda *a: ops.linear_cross_entropy(*a, backend="reference", **kw),
        name=f"linear_cross_entropy rows {rows} H {H} V {V} bias {bias} {kw} {dtype}",
        device=device,
        expected_budget=backend != "reference",
    )


# ---------------------------------------------------------------------------------------------- attention
@st.composite
def attention_cases(draw):
    B, Hk, group = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    # No S of 1 or 2: each row of dS sums to 0, so with one key dK is exactly 0 and with two it is one
    # cancelling difference; the rule then weighs rounding noise (fp32) or the rounded-O delta (half
    # precision) against torch's exact cancellation (the first long run's attention failures, up to 1.5x).
    # The odd-input tests keep one key, at a fixed seed.
    L, S = draw(st.integers(0, 20)), draw(st.sampled_from([0]) | st.integers(3, 20))
    D = draw(st.integers(1, 40))
    Dv = draw(st.sampled_from([D]) | st.integers(1, 40))
    mask = draw(st.sampled_from([None, "bool", "float"]))
    causal = mask is None and draw(st.booleans())
    mask_shape = draw(st.sampled_from([(L, S), (B, 1, L, S), (1, Hk * group, 1, S)]))
    scale = draw(st.none() | st.floats(0.05, 1.0))
    layout = draw(
        st.sampled_from(["contiguous", "bshd"])
    )  # bshd: (B, L, H, D) storage, as a fused projection
    return B, Hk, group, L, S, D, Dv, mask, mask_shape, causal, scale, layout, draw(SEEDS)


@pytest.mark.parametrize("backend,device", _backends("attention"))
@settings(max_examples=examples(0.5))
@given(case=attention_cases(), data=st.data())
def test_attention(backend, device, case, data):
    B, Hk, group, L, S, D, Dv, mask_kind, mask_shape, causal, scale, layout, seed = case
    dtype = data.draw(_dtypes(backend, device))
    if backend == "cuda":
        # The cuda kernel takes fp16/bf16, head dim 64 or 128 and no mask: draw within that (the general
        # draws would all be refused, and hypothesis would report the test unsatisfiable).
        D = Dv = data.draw(st.sampled_from([64, 128]))
        dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16]))
        mask_kind = None
    reason = refusal(
        backend, "attention", device, attn_mask=mask_kind is not None, head_dim=D, value_dim=Dv, dtype=dtype
    )
    hypothesis.assume(reason is None)
    Hq = Hk * group
    shapes = [(B, Hq, L, D), (B, Hk, S, D), (B, Hk, S, Dv)]
    view = None
    if layout == "bshd":
        shapes = [(b, n, h, d) for b, h, n, d in shapes]
        view = lambda q, k, v, *m: (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), *m)  # noqa: E731
    kw = dict(is_causal=causal, scale=scale, enable_gqa=group > 1)

    def make(gen):
        masks = []
        qkv = [_randn(gen, s) for s in shapes]
        if mask_kind == "bool":
            masks = [torch.rand(mask_shape, generator=gen) < 0.8]
        elif mask_kind == "float":
            masks = [_randn(gen, mask_shape)]
        return qkv + masks

    inputs, more = draws(make, _gen(seed))

    def call(fn):
        return lambda q, k, v, *m: fn(q, k, v, attn_mask=m[0] if m else None, **kw)

    check(
        call(lambda *a, **k: ops.scaled_dot_product_attention(*a, backend=backend, **k)),
        call(spec.attention),
        inputs,
        dtype,
        draws=more,
        grads=[True, True, True] + [False] * (len(inputs) - 3),
        view=view,
        expected=call(lambda *a, **k: ops.scaled_dot_product_attention(*a, backend="reference", **k)),
        name=f"attention B{B} Hq{Hq} Hk{Hk} L{L} S{S} D{D} Dv{Dv} mask {mask_kind} {mask_shape} {kw} {dtype}",
        device=device,
        expected_budget=backend != "reference",
    )
