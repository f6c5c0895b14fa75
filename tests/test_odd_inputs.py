"""Odd but valid inputs give the right answer on every backend that runs here (issue 7): zero-size batches,
one row of one class, seqlen 1 and the decode case, head dims that are not powers of two, transposed / sliced
/ expanded (stride 0) inputs, inputs at a storage offset, +-1e4 logits in half precision, -inf logits, NaN
that must propagate as in torch, all rows ignored, and a float attention mask of -inf on whole rows.

Every case runs on every backend here (reference, cpu, triton under the interpreter) in fp32 and fp16, and the
cases about values (+-1e4, inf, NaN) in bf16 too (not on the interpreter, which computes bf16 wrongly). Each
is checked by torch_spec.check: design.md's rule on the output and every gradient, NaN and inf where torch has
them. Shapes are tiny: the interpreter is slow, and an odd case needs no size to be odd. The inputs are drawn
at import from a fixed seed, so a run is reproducible.
"""

import pytest
import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.testing import assert_close

import torch_spec as spec
from backends_under_test import cases
from torch_spec import backend_cases, case_id, check, refusal

NAN, INF = float("nan"), float("inf")
# The case tables below draw their inputs at import, before the per-test seed: fix them here.
torch.manual_seed(1234)


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _grid(backend_list, table, half_only=()):
    """Every (backend, device, dtype) with every case of `table`. bf16 runs the cases about values (+-1e4,
    inf, NaN); the ones about shapes and layouts run in fp32 and fp16, since a layout takes the same code
    whatever the dtype. Cases named in half_only skip fp32."""

    def wanted(why, dtype):
        if dtype == torch.bfloat16:
            return any(word in why for word in ("1e4", "inf", "NaN"))
        return not (dtype == torch.float32 and why in half_only)

    return [
        pytest.param(*b, *case, id=f"{case[0]}-{case_id(b)}")
        for case in table
        for b in backend_list
        if wanted(case[0], b[2])
    ]


def _no_bf16(backend_list):
    return [b for b in backend_list if b[2] != torch.bfloat16]


# The issue asks for +-1e4 logits in fp16/bf16. fp32 logits that large meet a limit of saving an fp32 lse,
# which test_fp32_logits_far_from_zero_lose_gradient_precision documents.
HALF_ONLY = ("+-1e4 logits", "+-1e4 logits, smoothing and z_loss")


def _offset(shape, offset=5):
    """A tensor of `shape` that starts `offset` elements into its storage (returned as (base, view fn))."""
    n = 1
    for s in shape:
        n *= s
    base = torch.randn(n + offset + 3)
    return base, lambda b: b[offset : offset + n].view(shape)


pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------- softmax
SOFTMAX = backend_cases("softmax")

# (why, x, options, view)
SOFTMAX_CASES = [
    ("zero rows", torch.randn(0, 7), {}, None),
    ("zero columns", torch.randn(4, 0), {}, None),
    ("zero-size dim 0, softmax over it", torch.randn(0, 5), {"dim": 0}, None),
    ("one row, one class", torch.randn(1, 1), {}, None),
    ("seqlen 1, causal", torch.randn(2, 3, 1, 50), {"causal": True}, None),
    ("odd row length 13, scaled", torch.randn(5, 13), {"scale": 0.37}, None),
    ("row length 1000", torch.randn(3, 1000), {}, None),
    ("transposed", torch.randn(9, 20), {}, lambda x: x.t()),
    ("softmax over dim 0", torch.randn(9, 20), {"dim": 0}, None),
    ("every other column", torch.randn(6, 40), {}, lambda x: x[:, ::2]),
    ("rows expanded (stride 0)", torch.randn(1, 13), {}, lambda x: x.expand(6, 13)),
    ("columns expanded (stride 0)", torch.randn(5, 1), {}, lambda x: x.expand(5, 9)),
    (
        "causal, expanded over heads",
        torch.randn(1, 1, 7, 7),
        {"causal": True},
        lambda x: x.expand(2, 3, 7, 7),
    ),
    ("+-1e4", (torch.randn(6, 300) * 1e4).clamp(-6e4, 6e4), {}, None),
    ("+-1e4, causal", (torch.randn(2, 9, 9) * 1e4).clamp(-6e4, 6e4), {"causal": True}, None),
    ("some -inf", _set(torch.randn(4, 37), (slice(None), slice(3, 30, 4)), -INF), {}, None),
    ("a whole row -inf (gives 0, the documented contract)", _set(torch.randn(3, 20), 1, -INF), {}, None),
    ("a whole row -inf, causal", _set(torch.randn(1, 5, 5), (0, 2), -INF), {"causal": True}, None),
    ("NaN at the row's end (past the last full vector)", _set(torch.randn(3, 13), (1, 12), NAN), {}, None),
    ("NaN mid-row, long row", _set(torch.randn(3, 300), (2, 150), NAN), {}, None),
    ("+inf (NaN row, as torch)", _set(torch.randn(3, 13), (0, 12), INF), {}, None),
]


@pytest.mark.parametrize("backend,device,dtype,why,x,options,view", _grid(SOFTMAX, SOFTMAX_CASES))
def test_softmax(backend, device, dtype, why, x, options, view):
    check(
        lambda x: ops.softmax(x, backend=backend, **options),
        lambda x: spec.softmax(x, **options),
        [x],
        dtype,
        view=view and (lambda x: [view(x)]),
        name=why,
        device=device,
    )


@pytest.mark.parametrize(
    "backend,device,dtype", _no_bf16(SOFTMAX), ids=[case_id(c) for c in _no_bf16(SOFTMAX)]
)
def test_softmax_storage_offset(backend, device, dtype):
    base, view = _offset((7, 11))
    check(
        lambda x: ops.softmax(x, backend=backend),
        spec.softmax,
        [base],
        dtype,
        view=lambda b: [view(b)],
        name="softmax at a storage offset",
        device=device,
    )


# ------------------------------------------------------------------------------------------ cross entropy
CE = backend_cases("cross_entropy")


def _t(*values):
    return torch.tensor(values)


def _rand_t(n, classes, ignore=()):
    t = torch.randint(0, classes, (n,))
    for i in ignore:
        t[i] = -100
    return t


# (why, logits, target, options, view of (logits, target))
CE_CASES = [
    ("zero rows, mean (NaN, as torch)", torch.randn(0, 9), _t().long(), {}, None),
    ("zero rows, sum", torch.randn(0, 9), _t().long(), {"reduction": "sum"}, None),
    ("zero rows, none", torch.randn(0, 9), _t().long(), {"reduction": "none"}, None),
    ("one row, one class", torch.randn(1, 1), _t(0), {}, None),
    (
        "one row, one class, smoothed",
        torch.randn(1, 1),
        _t(0),
        {"label_smoothing": 0.1, "z_loss": 1e-2},
        None,
    ),
    ("(C,) logits, () target", torch.randn(11), torch.tensor(4), {}, None),
    ("transposed logits", torch.randn(9, 6), _rand_t(6, 9), {}, lambda x, t: (x.t(), t)),
    ("every other class", torch.randn(5, 30), _rand_t(5, 15), {}, lambda x, t: (x[:, ::2], t)),
    ("rows expanded (stride 0)", torch.randn(1, 9), _rand_t(5, 9), {}, lambda x, t: (x.expand(5, 9), t)),
    (
        "(B, T, C) permuted",
        torch.randn(3, 9, 2),
        _rand_t(6, 9).view(3, 2),
        {"label_smoothing": 0.2},
        lambda x, t: (x.permute(0, 2, 1), t),
    ),
    ("targets every other one", torch.randn(4, 9), _rand_t(8, 9), {}, lambda x, t: (x, t[::2])),
    ("targets expanded (stride 0)", torch.randn(4, 9), _t(3), {}, lambda x, t: (x, t.expand(4))),
    ("+-1e4 logits", (torch.randn(6, 300) * 1e4).clamp(-6e4, 6e4), _rand_t(6, 300, ignore=(2,)), {}, None),
    (
        "+-1e4 logits, smoothing and z_loss",
        (torch.randn(6, 300) * 1e4).clamp(-6e4, 6e4),
        _rand_t(6, 300),
        {"label_smoothing": 0.1, "z_loss": 1e-6, "reduction": "none"},
        None,
    ),
    (
        "-inf off the target",
        _set(torch.randn(4, 20), (slice(None), slice(5, 20, 3)), -INF),
        _t(0, 1, 2, 3),
        {"reduction": "none"},
        None,
    ),
    (
        "-inf at the target (inf loss)",
        _set(torch.randn(3, 20), (1, 7), -INF),
        _t(0, 7, 2),
        {"reduction": "none"},
        None,
    ),
    (
        "-inf with label smoothing (inf loss)",
        _set(torch.randn(3, 20), (0, 5), -INF),
        _t(0, 7, 2),
        {"reduction": "none", "label_smoothing": 0.1},
        None,
    ),
    (
        "a whole row -inf (NaN, as torch)",
        _set(torch.randn(3, 20), 1, -INF),
        _t(0, 7, 2),
        {"reduction": "none"},
        None,
    ),
    ("NaN in a row", _set(torch.randn(3, 13), (1, 12), NAN), _t(0, 7, 2), {"reduction": "none"}, None),
    ("NaN in a row, mean", _set(torch.randn(3, 300), (2, 150), NAN), _t(0, 7, 2), {}, None),
    (
        "NaN in an ignored row",
        _set(torch.randn(3, 13), (1, 4), NAN),
        _t(0, -100, 2),
        {"reduction": "sum"},
        None,
    ),
    ("all rows ignored, mean (NaN, zero gradient)", torch.randn(4, 9), _t(-100, -100, -100, -100), {}, None),
    ("all rows ignored, sum", torch.randn(4, 9), _t(-100, -100, -100, -100), {"reduction": "sum"}, None),
    (
        "all rows ignored, none",
        torch.randn(4, 9),
        _t(5, 5, 5, 5),
        {"reduction": "none", "ignore_index": 5},
        None,
    ),
]


@pytest.mark.parametrize("backend,device,dtype,why,x,target,options,view", _grid(CE, CE_CASES, HALF_ONLY))
def test_cross_entropy(backend, device, dtype, why, x, target, options, view):
    check(
        lambda x, t: ops.cross_entropy(x, t, backend=backend, **options),
        lambda x, t: spec.cross_entropy(x, t, **options),
        [x, target],
        dtype,
        view=view,
        name=why,
        device=device,
    )


@pytest.mark.parametrize("backend,device,dtype", _no_bf16(CE), ids=[case_id(c) for c in _no_bf16(CE)])
def test_cross_entropy_storage_offset(backend, device, dtype):
    base, view = _offset((6, 17))
    t_base = torch.randint(0, 17, (12,))

    def layout(x, t):
        return view(x), t[6:]

    check(
        lambda x, t: ops.cross_entropy(x, t, backend=backend, label_smoothing=0.1),
        lambda x, t: spec.cross_entropy(x, t, label_smoothing=0.1),
        [base, t_base],
        dtype,
        view=layout,
        name="cross_entropy at a storage offset",
        device=device,
    )


@pytest.mark.xfail(
    strict=True, reason="known limit: the backward's p = exp(x - lse) from an fp32 lse (see README)"
)
@pytest.mark.parametrize("backend", [b for b, d in cases("cross_entropy") if d == "cpu"])
def test_fp32_logits_far_from_zero_lose_gradient_precision(backend):
    # Every backend saves lse in fp32 and its backward forms p = exp(x - lse): lse carries an absolute error
    # of half an ulp of |lse|, which becomes a relative error of p. At |lse| ~ 100 that is ~4e-6, some 20x
    # torch's own fp32 error (torch's softmax divides by the sum instead). Strict: a fix makes this test fail.
    torch.manual_seed(0)
    x, t = torch.randn(8, 500) * 100, torch.randint(0, 500, (8,))
    check(
        lambda x: ops.cross_entropy(x, t, reduction="none", backend=backend),
        lambda x: spec.cross_entropy(x, t, reduction="none"),
        [x],
        torch.float32,
        name="fp32 logits ~100",
    )


# ----------------------------------------------------------------------------------- linear cross entropy
LCE = backend_cases("linear_cross_entropy")
H, V = 16, 40


def _lce_inputs(rows, bias=False, scale=1.0):
    out = [torch.randn(rows, H), torch.randn(V, H) * scale / H**0.5, _rand_t(rows, V)]
    return out + [torch.randn(V)] if bias else out


# (why, [hidden, weight, target, bias?], options, view)
LCE_CASES = [
    ("zero rows, mean (NaN, as torch)", _lce_inputs(0), {}, None),
    ("zero rows, sum, bias", _lce_inputs(0, bias=True), {"reduction": "sum"}, None),
    ("zero rows, none", _lce_inputs(0), {"reduction": "none"}, None),
    ("one row, one class", [torch.randn(1, H), torch.randn(1, H), _t(0)], {}, None),
    (
        "hidden transposed",
        [torch.randn(H, 7), torch.randn(V, H), _rand_t(7, V)],
        {"chunk_size": 3},
        lambda h, w, t: (h.t(), w, t),
    ),
    (
        "weight transposed (a tied (H, V) matrix)",
        [torch.randn(5, H), torch.randn(H, V), _rand_t(5, V)],
        {},
        lambda h, w, t: (h, w.t(), t),
    ),
    (
        "hidden rows expanded (stride 0)",
        [torch.randn(1, H), torch.randn(V, H), _rand_t(6, V)],
        {"chunk_size": 4},
        lambda h, w, t: (h.expand(6, H), w, t),
    ),
    (
        "bias expanded (stride 0)",
        [torch.randn(5, H), torch.randn(V, H), _rand_t(5, V), torch.randn(1)],
        {"reduction": "none"},
        lambda h, w, t, b: (h, w, t, b.expand(V)),
    ),
    ("+-1e4 logits", _lce_inputs(6, scale=2500.0), {"label_smoothing": 0.1}, None),
    (
        "-inf bias on some classes",
        [
            torch.randn(5, H),
            torch.randn(V, H),
            _t(0, 1, 2, 3, 4),
            _set(torch.randn(V), slice(10, 40, 3), -INF),
        ],
        {"reduction": "none"},
        None,
    ),
    (
        "NaN in a hidden row, none",
        [_set(torch.randn(4, H), (2, 5), NAN), torch.randn(V, H), _rand_t(4, V)],
        {"reduction": "none", "chunk_size": 2},
        None,
    ),
    (
        "NaN in a hidden row, mean",
        [_set(torch.randn(4, H), (2, 5), NAN), torch.randn(V, H), _rand_t(4, V)],
        {},
        None,
    ),
    (
        "all rows ignored, mean (NaN, zero gradient)",
        [torch.randn(4, H), torch.randn(V, H), _t(-100, -100, -100, -100)],
        {"chunk_size": 2},
        None,
    ),
    (
        "all rows ignored, sum, bias",
        [torch.randn(4, H), torch.randn(V, H), _t(-100, -100, -100, -100), torch.randn(V)],
        {"reduction": "sum"},
        None,
    ),
    (
        "all rows ignored, none",
        [torch.randn(4, H), torch.randn(V, H), _t(-100, -100, -100, -100)],
        {"reduction": "none"},
        None,
    ),
]


@pytest.mark.parametrize("backend,device,dtype,why,inputs,options,view", _grid(LCE, LCE_CASES, HALF_ONLY))
def test_linear_cross_entropy(backend, device, dtype, why, inputs, options, view):
    check(
        lambda *a: ops.linear_cross_entropy(*a, backend=backend, **options),
        lambda *a: spec.linear_cross_entropy(*a, **options),
        inputs,
        dtype,
        view=view,
        name=why,
        device=device,
    )


@pytest.mark.parametrize("backend,device,dtype", _no_bf16(LCE), ids=[case_id(c) for c in _no_bf16(LCE)])
def test_linear_cross_entropy_storage_offset(backend, device, dtype):
    hb, hv = _offset((5, H), 3)
    wb, wv = _offset((V, H), 7)
    check(
        lambda h, w, t: ops.linear_cross_entropy(h, w, t, backend=backend, chunk_size=2),
        spec.linear_cross_entropy,
        [hb, wb, _rand_t(5, V)],
        dtype,
        view=lambda h, w, t: (hv(h), wv(w), t),
        name="linear_cross_entropy at a storage offset",
        device=device,
    )


# ---------------------------------------------------------------------------------------------- attention
ATTENTION = backend_cases("attention")


def _qkv(B, Hq, Hk, L, S, D, Dv=None):
    return [torch.randn(B, Hq, L, D), torch.randn(B, Hk, S, D), torch.randn(B, Hk, S, Dv or D)]


def _dead_rows_mask(L, S):
    m = torch.randn(L, S)
    m[1] = -INF
    m[L - 1] = -INF
    return m


# (why, [q, k, v], options, view); options may hold attn_mask (fp32, converted to q's dtype)
ATTENTION_CASES = [
    ("zero batch", _qkv(0, 2, 2, 5, 5, 8), {}, None),
    ("zero queries", _qkv(1, 2, 2, 0, 5, 8), {}, None),
    ("zero keys (out 0)", _qkv(1, 2, 2, 5, 0, 8), {}, None),
    ("one query, one key", _qkv(1, 1, 1, 1, 1, 8), {}, None),
    ("decode: one query, 130 keys", _qkv(2, 4, 2, 1, 130, 16), {"enable_gqa": True}, None),
    ("decode, causal (top-left: key 0 only)", _qkv(1, 2, 2, 1, 130, 16), {"is_causal": True}, None),
    ("head dim 0 (each query averages the values, as torch)", _qkv(1, 2, 2, 5, 6, 0, 3), {}, None),
    ("head dim 1", _qkv(1, 2, 2, 9, 9, 1), {"is_causal": True}, None),
    ("head dim 24, value dim 40", _qkv(1, 2, 1, 17, 23, 24, 40), {"enable_gqa": True}, None),
    ("head dim 80", _qkv(1, 1, 1, 20, 20, 80), {"is_causal": True}, None),
    ("head dim 96", _qkv(1, 2, 2, 10, 30, 96), {}, None),
    (
        "(B, L, H, D) storage, transposed",
        [torch.randn(2, 9, 3, 8) for _ in range(3)],
        {"is_causal": True},
        lambda q, k, v: (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
    ),
    (
        "q's last two dims transposed (head dim strided)",
        [torch.randn(1, 2, 8, 9), *_qkv(1, 2, 2, 9, 11, 8)[1:]],
        {},
        lambda q, k, v: (q.transpose(-1, -2), k, v),
    ),
    (
        "k and v expanded over heads (stride 0)",
        [torch.randn(1, 4, 7, 8), torch.randn(1, 1, 7, 8), torch.randn(1, 1, 7, 8)],
        {},
        lambda q, k, v: (q, k.expand(1, 4, 7, 8), v.expand(1, 4, 7, 8)),
    ),
    ("float mask expanded (stride 0)", _qkv(2, 3, 3, 6, 7, 8), {"attn_mask": torch.randn(1, 1, 6, 7)}, None),
    ("float mask -inf on whole rows", _qkv(2, 2, 2, 6, 9, 8), {"attn_mask": _dead_rows_mask(6, 9)}, None),
    (
        "bool mask False on whole rows",
        _qkv(1, 2, 2, 6, 9, 8),
        {"attn_mask": _set(torch.rand(6, 9) > 0.3, 2, False)},
        None,
    ),
    (
        "NaN in a query row",
        [_set(torch.randn(1, 2, 9, 8), (0, 1, 4, 3), NAN), *_qkv(1, 2, 2, 9, 9, 8)[1:]],
        {},
        None,
    ),
    (
        "NaN in a key row",
        [torch.randn(1, 2, 9, 8), _set(torch.randn(1, 2, 9, 8), (0, 0, 6, 2), NAN), torch.randn(1, 2, 9, 8)],
        {},
        None,
    ),
    # Head dim 64, the cuda kernel's (it refuses the odd head dims above): the same odd shapes reach it too.
    ("head dim 64, decode: one query, 130 keys", _qkv(1, 4, 4, 1, 130, 64), {}, None),
    ("head dim 64, causal, 37 x 37 (ragged blocks)", _qkv(2, 2, 2, 37, 37, 64), {"is_causal": True}, None),
    (
        "head dim 64, (B, L, H, D) storage, transposed",
        [torch.randn(1, 19, 2, 64) for _ in range(3)],
        {"is_causal": True},
        lambda q, k, v: (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
    ),
    (
        "head dim 64, NaN in a key row",
        [
            torch.randn(1, 2, 9, 64),
            _set(torch.randn(1, 2, 9, 64), (0, 0, 6, 2), NAN),
            torch.randn(1, 2, 9, 64),
        ],
        {},
        None,
    ),
    (
        "NaN in a key row, causal (earlier queries stay finite)",
        [torch.randn(1, 2, 9, 8), _set(torch.randn(1, 2, 9, 8), (0, 0, 6, 2), NAN), torch.randn(1, 2, 9, 8)],
        {"is_causal": True},
        None,
    ),
]


@pytest.mark.parametrize("backend,device,dtype,why,qkv,options,view", _grid(ATTENTION, ATTENTION_CASES))
def test_attention(backend, device, dtype, why, qkv, options, view):
    options = dict(options)
    mask = options.pop("attn_mask", None)
    reason = refusal(
        backend,
        "attention",
        device,
        attn_mask=mask is not None,
        head_dim=qkv[0].shape[-1],
        value_dim=qkv[2].shape[-1],
        dtype=dtype,
    )
    if reason:
        pytest.skip(f"{backend} refuses this call: {reason}")

    def with_mask(fn):
        if mask is None:
            return lambda q, k, v: fn(q, k, v, **options)
        return lambda q, k, v, m: fn(
            q, k, v, attn_mask=m if m.dtype == torch.bool else m.to(q.dtype), **options
        )

    inputs = qkv + ([mask] if mask is not None else [])
    grads = [True, True, True] + ([False] if mask is not None else [])
    layout = view and (lambda *a: (*view(*a[:3]), *a[3:]))
    check(
        with_mask(lambda *a, **kw: ops.scaled_dot_product_attention(*a, backend=backend, **kw)),
        with_mask(spec.attention),
        inputs,
        dtype,
        grads=grads,
        view=layout,
        name=why,
        device=device,
    )


def test_spec_matches_torch_sdpa_on_dead_rows():
    # The spec the attention cases are held to is torch's SDPA itself on rows masked to -inf (and everywhere).
    q, k, v = (t.double() for t in _qkv(2, 2, 2, 6, 9, 8))
    mask = _dead_rows_mask(6, 9).double()
    torch.testing.assert_close(
        spec.attention(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, mask)
    )
    assert torch.equal(
        F.scaled_dot_product_attention(q, k, v, mask)[:, :, 1], torch.zeros(2, 2, 8, dtype=q.dtype)
    )


@pytest.mark.parametrize(
    "backend,device,dtype", _no_bf16(ATTENTION), ids=[case_id(c) for c in _no_bf16(ATTENTION)]
)
def test_attention_finfo_min_padding_rows(backend, device, dtype):
    # transformers pads with an additive mask of finfo(dtype).min: a query row masked that way everywhere sees
    # every score absorbed into the same huge number, and torch's SDPA averages V over it with uniform weights
    # (forward: torch's math, flash and default paths agree). Its backward is not recoverable from a saved lse
    # (torch's own backends disagree there); the kernels treat such a row as having no key. transformers'
    # models never send a gradient into a padding row's output, which is the case checked for gradients here.
    if refusal(backend, "attention", device, attn_mask=True, head_dim=8, value_dim=8, dtype=dtype):
        pytest.skip(f"{backend} refuses an attn_mask")
    q, k, v = (t.to(device, dtype) for t in _qkv(1, 2, 2, 5, 7, 8))
    mask = torch.zeros(5, 7, device=device, dtype=dtype)
    mask[1] = torch.finfo(dtype).min  # a padding query row: every key masked
    mask[3, :4] = torch.finfo(dtype).min  # a row that still sees 3 keys
    dout = torch.randn(1, 2, 5, 8, device=device, dtype=dtype)
    dout[:, :, 1] = 0.0

    def grads(fn, prec):
        leaves = [t.detach().to(prec, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, mask.to(prec))
        out.backward(dout.to(prec))
        return [out.detach(), *(t.grad for t in leaves)]

    def sdpa(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    got = grads(lambda *a: ops.scaled_dot_product_attention(*a[:3], attn_mask=a[3], backend=backend), dtype)
    ref = grads(sdpa, torch.float64)  # finfo(dtype).min swamps the scores in float64 too
    same = grads(sdpa, dtype)
    if dtype == torch.float32:  # fp16's min (-65504) swamps no score at the fp32/fp64 precision of the math
        torch.testing.assert_close(ref[0][:, :, 1], v.double().mean(dim=2))  # what torch means by the row
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, same):
        assert_close(g, r, t, f"{backend} {name}")
    if backend == "reference":  # the spec is softmax's own backward, whatever the upstream gradient
        dout[:, :, 1] = 1.0
        got = grads(
            lambda *a: ops.scaled_dot_product_attention(*a[:3], attn_mask=a[3], backend=backend), dtype
        )
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # torch's flash path on CPU gives such a row P = 1 per key
            ref, same = grads(sdpa, torch.float64), grads(sdpa, dtype)
        for name, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, same):
            assert_close(g, r, t, f"{backend} {name}, upstream gradient on the padding row")


@pytest.mark.parametrize(
    "backend,device,dtype", _no_bf16(ATTENTION), ids=[case_id(c) for c in _no_bf16(ATTENTION)]
)
def test_attention_storage_offset(backend, device, dtype):
    D = 64 if backend == "cuda" else 8  # the head dims the cuda kernel takes are 64 and 128
    reason = refusal(backend, "attention", device, head_dim=D, value_dim=D, dtype=dtype)
    if reason:
        pytest.skip(f"{backend} refuses this call: {reason}")
    views = [_offset((1, 2, 7, D), o) for o in (1, 2, 3)]
    check(
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, backend=backend),
        spec.attention,
        [b for b, _ in views],
        dtype,
        view=lambda *bs: [v(b) for (_, v), b in zip(views, bs)],
        name="attention at a storage offset",
        device=device,
    )
