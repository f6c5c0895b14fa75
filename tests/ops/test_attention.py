"""ops.scaled_dot_product_attention: the reference against torch, float64 gradcheck, every backend against the
reference (design.md's tolerance rule on the output and on every gradient), dropout, torch.compile, errors.

Backends come from backends_under_test.cases("attention"): the reference always, triton under the interpreter
on CPU (fp32 and fp16; bf16 only on a GPU), cpu/cuda when built. Interpreter shapes stay small.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from gptfast import backends, ops
from gptfast.ops import _library
from gptfast.ops import reference as R
from gptfast.testing import assert_close, reference_dtype
from backends_under_test import cases, ids
from torch_spec import attention as _attention_in_dtype

CASES = cases("attention")
CPU_CASES = [c for c in CASES if c[1] == "cpu"]
SDPA = ops.scaled_dot_product_attention


def _randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _qkv(B, Hq, Hk, L, S, D, Dv=None, dtype=torch.float32, device="cpu"):
    return (
        _randn(B, Hq, L, D, dtype=dtype, device=device),
        _randn(B, Hk, S, D, dtype=dtype, device=device),
        _randn(B, Hk, S, Dv or D, dtype=dtype, device=device),
    )


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _forward_backward(fn, q, k, v, dout):
    q, k, v = _leaves(q, k, v)
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _require(backend, device, q, v, dtype, attn_mask=False, dropout=False):
    """Skips, with the backend's own reason, a call that the backend refuses (auto selection would pass it
    on)."""
    reason = backends.why_not(
        backend,
        "attention",
        torch.device(device),
        attn_mask=attn_mask,
        dropout=dropout,
        head_dim=q.shape[-1],
        value_dim=v.shape[-1],
        dtype=dtype,
    )
    if reason:
        pytest.skip(f"{backend} refuses this call: {reason}")


def _check_against_reference(backend, device, q, k, v, dtype, mask=None, **kw):
    """The backend's out and grads vs the reference in higher precision, bounded by torch's own SDPA error."""
    _require(backend, device, q, v, dtype, attn_mask=mask is not None)
    gqa = kw.pop("enable_gqa", q.shape[-3] != k.shape[-3])
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    mask = None if mask is None else mask.to(device)
    half_mask = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    dout = _randn(*q.shape[:-1], v.shape[-1], dtype=dtype, device=device)
    got = _forward_backward(
        lambda a, b, c: SDPA(a, b, c, attn_mask=half_mask, enable_gqa=gqa, backend=backend, **kw),
        q,
        k,
        v,
        dout,
    )
    hp = reference_dtype(dtype)
    hp_mask = mask if mask is None or mask.dtype == torch.bool else mask.to(hp)
    ref = _forward_backward(
        lambda a, b, c: SDPA(a, b, c, attn_mask=hp_mask, enable_gqa=gqa, backend="reference", **kw),
        *(t.to(hp) for t in (q, k, v)),
        dout.to(hp),
    )
    theirs = _forward_backward(
        lambda a, b, c: _attention_in_dtype(a, b, c, attn_mask=half_mask, enable_gqa=gqa, **kw), q, k, v, dout
    )
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, theirs):
        assert g.dtype == dtype, f"{name} has dtype {g.dtype}, expected {dtype}"
        assert_close(g, r, t, name=f"{backend}/{name}")


# ------------------------------------------------------------------------- the reference against torch
def _check_reference_vs_torch(q, k, v, dtype, attn_mask=None, **kw):
    """reference backend in `dtype` vs torch SDPA in higher precision, within torch's own `dtype` error."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    m = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dtype)
    dout = _randn(*q.shape[:-1], v.shape[-1], dtype=dtype)
    got = _forward_backward(
        lambda a, b, c: SDPA(a, b, c, attn_mask=m, backend="reference", **kw), q, k, v, dout
    )
    hp = reference_dtype(dtype)
    hm = m if m is None or m.dtype == torch.bool else m.to(hp)
    ref = _forward_backward(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=hm, **kw),
        *(t.to(hp) for t in (q, k, v)),
        dout.to(hp),
    )
    theirs = _forward_backward(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=m, **kw), q, k, v, dout
    )
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, theirs):
        assert_close(g, r, t, name=f"reference/{name}")
    return got


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "L,S", [(13, 13), (7, 19), (19, 7)]
)  # square, L < S and L > S (torch's top-left causal)
def test_reference_matches_torch(dtype, causal, L, S):
    _check_reference_vs_torch(*_qkv(2, 3, 3, L, S, 16), dtype, is_causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hk", [1, 2])  # MQA and GQA over 4 query heads
def test_reference_gqa_matches_torch(dtype, Hk):
    _check_reference_vs_torch(*_qkv(2, 4, Hk, 11, 9, 8), dtype, is_causal=True, enable_gqa=True)


def test_reference_custom_scale_and_value_dim():
    # scale != 1/sqrt(D), and Dv != D
    _check_reference_vs_torch(*_qkv(1, 2, 2, 6, 10, 8, Dv=12), torch.float32, scale=0.37)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_bool_mask_with_dead_rows(dtype):
    mask = torch.rand(2, 1, 9, 11) > 0.4  # broadcast over heads
    mask[0, 0, 3] = False  # a row with no key left: torch gives 0, and zero gradients
    q, k, v = _qkv(2, 3, 3, 9, 11, 8)
    out = _check_reference_vs_torch(q, k, v, dtype, attn_mask=mask)[0]
    assert torch.all(out[0, :, 3] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_float_mask_with_inf_rows(dtype):
    mask = _randn(9, 11)  # broadcast over batch and heads
    mask[4] = float("-inf")  # a whole row of -inf: zeros, as torch
    mask[5, ::2] = float("-inf")
    out = _check_reference_vs_torch(*_qkv(2, 3, 3, 9, 11, 8), dtype, attn_mask=mask)[0]
    assert torch.all(out[:, :, 4] == 0)


def test_reference_unbatched():
    # (H, L, D) inputs without the batch dim
    q, k, v = (t[0] for t in _qkv(1, 2, 2, 5, 7, 8))
    _check_reference_vs_torch(q, k, v, torch.float32, is_causal=True)


def test_reference_fused_qkv_views():
    # q, k, v as strided views of one (B, L, 3, H, D) projection, as the GPT passes them
    qkv = _randn(2, 10, 3, 4, 8)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check_reference_vs_torch(q, k, v, torch.float32, is_causal=True)


def test_reference_decode_single_query():
    # Lq = 1 against a longer cache: no causal mask, as the KV-cache decode step calls it
    _check_reference_vs_torch(*_qkv(2, 4, 4, 1, 23, 16), torch.float16)


def test_baseline_composite_is_attention():
    # the half-precision baseline above is itself torch's attention: equal to SDPA in float64 (masks, GQA,
    # causal)
    q, k, v = (t.double() for t in _qkv(2, 4, 2, 9, 11, 8))
    bool_mask = torch.rand(9, 11) > 0.5
    bool_mask[2] = False
    float_mask = _randn(9, 11, dtype=torch.float64)
    for kw in (dict(is_causal=True), dict(attn_mask=bool_mask), dict(attn_mask=float_mask, scale=0.3)):
        torch.testing.assert_close(
            _attention_in_dtype(q, k, v, enable_gqa=True, **kw),
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw),
        )


# -------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("causal,Hk", [(False, 2), (True, 2), (True, 1)])  # plain, causal, causal + GQA (MQA)
def test_reference_gradcheck(causal, Hk):
    # tiny float64 shapes (L != S, D = 3) keep gradcheck's finite differences fast
    q, k, v = (t.double().requires_grad_() for t in _qkv(1, 2, Hk, 4, 5, 3))
    torch.autograd.gradcheck(
        lambda a, b, c: SDPA(a, b, c, is_causal=causal, enable_gqa=Hk != 2, backend="reference"), (q, k, v)
    )


def test_reference_gradcheck_float_mask():
    # an additive mask broadcast over batch and heads
    q, k, v = (t.double().requires_grad_() for t in _qkv(1, 2, 2, 4, 5, 3))
    mask = _randn(4, 5, dtype=torch.float64)
    torch.autograd.gradcheck(lambda a, b, c: SDPA(a, b, c, attn_mask=mask, backend="reference"), (q, k, v))


# ------------------------------------------------------------------------ every backend vs reference
CPU_DTYPES = [torch.float32, torch.float16]
SHAPES = [
    (1, 1, 1, 1, 1, 16),  # one query, one key
    (2, 2, 2, 17, 17, 32),  # odd square length, two batches
    (1, 4, 2, 67, 130, 32),  # GQA, L < S, key tail past a block
    (1, 2, 1, 130, 67, 16),  # MQA, L > S: the last queries see every key
]


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_reference(backend, device, dtype, causal, shape):
    B, Hq, Hk, L, S, D = shape
    _check_against_reference(backend, device, *_qkv(B, Hq, Hk, L, S, D), dtype, is_causal=causal)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("D", [16, 32, 64, 80, 96, 128, 256])  # every head dim; 80 and 96 pad to 128
def test_backend_head_dims(backend, device, D):
    # tiny lengths keep the interpreter fast; 9 and 5 are not multiples of any block
    _check_against_reference(
        backend, device, *_qkv(1, 2, 2, 9, 5 if D >= 128 else 13, D), torch.float32, is_causal=True
    )


TRITON_CASES = [c for c in CASES if c[0] == "triton"]


@pytest.mark.parametrize("backend,device", TRITON_CASES, ids=ids(TRITON_CASES))
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_triton_fp32_gradients_keep_the_rule_on_more_draws(backend, device, seed):
    # FlashAttention's delta = rowsum(dO * O) matches rowsum(P * dP) only up to O's rounding, and in fp32
    # dS = P (dP - delta) carried that mismatch past twice torch's error (dQ, dK) on these draws at head dim
    # 256; the fp32 backward computes delta from its own P and dP instead. (The C++ cpu backend still uses
    # rowsum(dO * O); README, Reliability.) The draws come from the CPU generator, the same on every device.
    torch.manual_seed(seed)
    _check_against_reference(backend, device, *_qkv(1, 2, 2, 33, 17, 256), torch.float32, is_causal=True)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_backend_value_dim_differs(backend, device):
    # Dv != D: the value/output head dim is padded separately
    _check_against_reference(
        backend, device, *_qkv(1, 2, 2, 11, 14, 32, Dv=16), torch.float16, is_causal=True
    )


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_backend_custom_scale(backend, device, dtype):
    # scale != 1/sqrt(D), non-causal, lengths that leave tails
    _check_against_reference(backend, device, *_qkv(1, 2, 2, 19, 21, 16), dtype, scale=0.61)


@pytest.mark.parametrize("head_dim", [48, 96, 160])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_every_candidate_config(monkeypatch, head_dim, causal):
    # The GPU autotuner may pick any candidate of the 16-bit lists, while the other tests run the
    # interpreter's one config and the GPU tests the first: each candidate's tiles (BLOCK_M, BLOCK_N) must be
    # right too. fp16 (what the interpreter computes correctly) at padded head dims from each list (64, 128,
    # 256); L != S, both not multiples of any tile, and GQA.
    if "triton" not in [b for b, d in CASES if d == "cpu"]:
        pytest.skip("the triton backend cannot run here")
    from gptfast.kernels import attention as kernels

    lists = {kind: kernels.candidates(kind, torch.float16, head_dim) for kind in ("fwd", "dkdv", "dq")}
    for i in range(max(len(c) for c in lists.values())):
        for kind, cands in lists.items():
            monkeypatch.setitem(kernels.FORCED, kind, cands[min(i, len(cands) - 1)])
        _check_against_reference(
            "triton", "cpu", *_qkv(1, 4, 2, 150, 133, head_dim), torch.float16, is_causal=causal
        )


def _record_warp_spec(monkeypatch, kernels) -> list:
    """A list that each attention launch from now on appends (kind, warp-specialised) to: whether every config
    the launch may run is one (a forced config falls back to its plain twin where warp specialisation may not
    run, and would give the same numbers)."""
    launches = []
    tuned = kernels._tuned

    def record(kind, q, meta, tma=False, ws=False):
        fn = tuned(kind, q, meta, tma, ws)
        launches.append((kind, all(c.kwargs["WARP_SPEC"] for c in fn.configs)))
        return fn

    monkeypatch.setattr(kernels, "_tuned", record)
    return launches


@pytest.mark.parametrize(
    "D,Dv,L,S,causal",
    [
        (64, 64, 164, 164, True),
        (128, 128, 164, 150, False),
        (256, 256, 164, 164, True),
        (
            80,
            48,
            164,
            150,
            False,
        ),  # padded head dims, Dv != D: the copy engine zero-fills the columns past each
        (64, 64, 72, 200, True),  # S > L: dK/dV programs of keys past every query run no iteration
    ],
)
def test_triton_warp_specialized_configs(monkeypatch, D, Dv, L, S, causal):
    # The warp-specialised configs' own code under the interpreter: the forward's and dQ's one masked loop over
    # key blocks, dK/dV's one loop over (query head, query block), and their descriptor loads of Q, K, V, dO
    # and the lse and delta rows (the split into warp groups happens only on a GPU). L a multiple of 4, as
    # both backward kernels need, mostly over more than one block of queries and of keys (so causal dK/dV
    # programs start past query 0), and GQA, whose dK/dV loop runs over both query heads of a group.
    if "triton" not in [b for b, d in CASES if d == "cpu"]:
        pytest.skip("the triton backend cannot run here")
    from gptfast.kernels import attention as kernels

    if not kernels._WS_STATE["ok"]:
        pytest.skip("this triton has no tl.range(warp_specialize=...)")
    kinds = {"fwd", "dkdv", "dq"} - ({"dkdv"} if D == 256 else set())  # see _TMA_DKDV
    for kind in kinds:
        ws = [c for c in kernels.candidates(kind, torch.float16, D) if kernels._warp_specialized(c)]
        monkeypatch.setitem(kernels.FORCED, kind, ws[0])
    launches = _record_warp_spec(monkeypatch, kernels)
    _check_against_reference("triton", "cpu", *_qkv(1, 4, 2, L, S, D, Dv=Dv), torch.float16, is_causal=causal)
    assert {kind for kind, ws in launches if ws} == kinds, launches
    assert all(ws for kind, ws in launches if kind in kinds), launches


def test_warp_spec_probe_runs_every_warp_specialized_config():
    # scripts/gpu_check.sh trusts this probe to turn the warp-specialised configs off when one fails, so it must
    # run each of them (forward, dQ, dK/dV) and say so (a config that ran as its plain twin is a FAILED line,
    # which fails the exit status checked here); on this CPU the interpreter runs their one loop and their
    # descriptor loads (triton's splitting into warp groups happens only on the GPU).
    if "triton" not in [b for b, d in CASES if d == "cpu"]:
        pytest.skip("the triton backend cannot run here")
    from gptfast.kernels import attention as kernels

    script = pathlib.Path(__file__).parents[2] / "scripts" / "probe_warp_spec.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("probe_warp_spec", script)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    # One line for each forward config, one for each backward call (its i-th dQ and i-th dK/dV config), and a
    # config of each kind in each line.
    lines = [line for line in proc.stdout.splitlines() if ": ok (" in line]
    for D, Hk, causal in probe.CASES:
        for kind in ("fwd", "dq", "dkdv"):
            for c in kernels.candidates(kind, torch.float16, D):
                if kernels._warp_specialized(c):
                    mark = f"D={D} Hk={Hk} L=72 S={72 if causal else 35} causal={causal} "
                    assert any(mark in line and f"'{kind}': {c}" in line for line in lines), (
                        kind,
                        c,
                        proc.stdout,
                    )
    assert proc.stdout.count("warp-specialised ") == len(lines) >= 8, proc.stdout


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_backend_negative_scale(backend, device):
    # A negative scale flips which score is the row max: triton's forward keeps raw scores until the exponent
    # only for scale > 0, so this runs its other path, causal for the masked tail blocks too.
    _check_against_reference(
        backend, device, *_qkv(1, 2, 2, 19, 21, 16), torch.float32, scale=-0.45, is_causal=True
    )


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_backend_bool_mask(backend, device, dtype):
    mask = torch.rand(2, 1, 33, 45) > 0.3  # stride 0 over heads; 33 x 45 leaves tails in both dims
    mask[1, 0, 7] = False  # a row with no key left
    mask[0, 0, :, 40:] = False  # whole masked columns in the tail block
    _check_against_reference(backend, device, *_qkv(2, 2, 2, 33, 45, 32), dtype, mask=mask)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_backend_float_mask(backend, device, dtype):
    mask = _randn(33, 45)  # stride 0 over batch and heads
    mask[5] = float("-inf")  # a whole row of -inf gives zeros
    mask[9, 1::3] = float("-inf")
    _check_against_reference(backend, device, *_qkv(2, 4, 2, 33, 45, 16), dtype, mask=mask, enable_gqa=True)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_backend_fused_qkv_views(backend, device):
    # strided views of one (B, L, 3, H, D) projection: the kernels read them in place
    qkv = _randn(2, 37, 3, 2, 32)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    _check_against_reference(backend, device, q, k, v, torch.float16, is_causal=True)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_backend_unbatched_and_decode(backend, device):
    # (H, L, D) inputs, and a single query against a 67-long cache (the decode step)
    q, k, v = (t[0] for t in _qkv(1, 2, 2, 1, 67, 32))
    _check_against_reference(backend, device, q, k, v, torch.float32)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_backend_empty(backend, device):
    # no queries (L = 0): an empty output, and zero gradients for k and v
    q, k, v = _leaves(*_qkv(1, 2, 2, 0, 5, 16))
    _require(backend, device, q, v, q.dtype)
    out = SDPA(q.to(device), k.to(device), v.to(device), backend=backend)
    assert out.shape == (1, 2, 0, 16)
    out.sum().backward()
    assert torch.all(k.grad == 0) and torch.all(v.grad == 0)


# --------------------------------------------------------------------------------------------- dropout
def _keep_mask(backend, rng, shape, p, device):
    """The keep mask `backend` draws for rng = (seed, offset); None when the backend has no accessor."""
    if backend == "reference":
        return R.dropout_keep(rng, shape, p, device)
    if backend == "triton":
        from gptfast.kernels.attention import dropout_mask

        return dropout_mask(*shape, p, rng, device)
    return None


DROPOUT_CASES = [c for c in CASES if c[0] in ("reference", "triton")]


@pytest.mark.parametrize("backend,device", DROPOUT_CASES, ids=ids(DROPOUT_CASES))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(backend, device, p):
    shape = (2, 2, 100, 160)  # 64000 draws: the keep rate's std is below 0.002
    rng = torch.tensor([1234567, 89], dtype=torch.int64)
    keep = _keep_mask(backend, rng, shape, p, device)
    assert keep.dtype == torch.bool and keep.shape == shape
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    # no repeated pattern across heads or rows, the same mask for the same rng, another for another offset
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert torch.equal(keep, _keep_mask(backend, rng.clone(), shape, p, device))
    assert not torch.equal(keep, _keep_mask(backend, torch.tensor([1234567, 90]), shape, p, device))


def _dropout_math(q, k, v, keep, p, causal, scale, attn_mask=None):
    """Attention with the given keep mask in plain (differentiable) torch: the kernels' formula."""
    Hq, Hk = q.shape[1], k.shape[1]
    k, v = (t.repeat_interleave(Hq // Hk, dim=1) for t in (k, v))
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s + attn_mask.to(s.dtype)
    return (torch.softmax(s.float(), dim=-1).to(q.dtype) * keep / (1 - p)) @ v


@pytest.mark.parametrize("backend,device", DROPOUT_CASES, ids=ids(DROPOUT_CASES))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_same_mask_as_reference(backend, device, dtype, causal):
    # out and grads equal plain attention computed with the backend's own keep mask: forward and backward
    # regenerate the same mask. GQA and odd lengths on the way.
    B, Hq, Hk, L, S, D, p, scale = 2, 4, 2, 37, 29, 16, 0.3, 0.3
    rng = torch.tensor([987654321, 4321], dtype=torch.int64)
    q, k, v = (t.to(device, dtype) for t in _qkv(B, Hq, Hk, L, S, D))
    dout = _randn(B, Hq, L, D, dtype=dtype, device=device)
    keep = _keep_mask(backend, rng, (B, Hq, L, S), p, device)
    fwd, bwd = _library.pair("attention", backend)
    out, lse = fwd(q, k, v, None, p, causal, scale, rng)
    grads = bwd(dout, q, k, v, None, out, lse, p, causal, scale, rng)
    hp = reference_dtype(dtype)
    ref = _forward_backward(
        lambda a, b, c: _dropout_math(a, b, c, keep, p, causal, scale),
        *(t.to(hp) for t in (q, k, v)),
        dout.to(hp),
    )
    theirs = _forward_backward(lambda a, b, c: _dropout_math(a, b, c, keep, p, causal, scale), q, k, v, dout)
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), (out, *grads), ref, theirs):
        assert_close(g, r, t, name=f"{backend}/dropout/{name}")


@pytest.mark.parametrize("backend,device", DROPOUT_CASES, ids=ids(DROPOUT_CASES))
def test_dropout_with_float_mask(backend, device):
    # dropout and an additive mask in one call (the mask broadcast over batch and heads, by stride 0)
    B, H, L, S, D, p, scale = 2, 2, 21, 34, 16, 0.25, 0.4
    rng = torch.tensor([31337, 2718], dtype=torch.int64)
    q, k, v = (t.to(device) for t in _qkv(B, H, H, L, S, D))
    mask = _randn(L, S, device=device).expand(B, H, L, S)
    dout = _randn(B, H, L, D, device=device)
    keep = _keep_mask(backend, rng, (B, H, L, S), p, device)
    fwd, bwd = _library.pair("attention", backend)
    out, lse = fwd(q, k, v, mask, p, False, scale, rng)
    grads = bwd(dout, q, k, v, mask, out, lse, p, False, scale, rng)
    ref = _forward_backward(
        lambda a, b, c: _dropout_math(a, b, c, keep, p, False, scale, mask.double()),
        *(t.double() for t in (q, k, v)),
        dout.double(),
    )
    theirs = _forward_backward(
        lambda a, b, c: _dropout_math(a, b, c, keep, p, False, scale, mask), q, k, v, dout
    )
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), (out, *grads), ref, theirs):
        assert_close(g, r, t, name=f"{backend}/dropout+mask/{name}")


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_dropout_through_the_op_is_seeded(backend, device):
    # the public op draws (seed, offset) from torch's generator: manual_seed reproduces it, a new draw differs
    q, k, v = (t.to(device) for t in _qkv(1, 2, 2, 16, 16, 16))
    _require(backend, device, q, v, q.dtype, dropout=True)
    torch.manual_seed(5)
    a = SDPA(q, k, v, dropout_p=0.5, backend=backend)
    b = SDPA(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(5)
    c = SDPA(q, k, v, dropout_p=0.5, backend=backend)
    assert torch.equal(a, c) and not torch.equal(a, b)


# -------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend,device", CPU_CASES, ids=ids(CPU_CASES))
def test_compile_fullgraph(backend, device):
    def f(q, k, v, mask):
        causal = SDPA(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
        masked = SDPA(q, k, v, attn_mask=mask, enable_gqa=True, backend=backend)
        return (causal * masked).sum()

    q, k, v = _qkv(1, 4, 2, 9, 11, 16)
    mask = torch.rand(9, 11) > 0.2
    _require(backend, device, q, v, q.dtype, attn_mask=True)
    eager = _forward_backward(lambda a, b, c: f(a, b, c, mask), q, k, v, torch.tensor(1.0))
    torch._dynamo.reset()
    compiled_f = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled = _forward_backward(lambda a, b, c: compiled_f(a, b, c, mask), q, k, v, torch.tensor(1.0))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors
def test_errors():
    q, k, v = _qkv(2, 4, 2, 5, 6, 8)
    with pytest.raises(TypeError, match="key"):
        SDPA(q, k.half(), v)  # mismatched dtypes
    with pytest.raises(ValueError, match="device"):
        SDPA(q, k, v.to("meta"))  # mismatched devices
    with pytest.raises(ValueError, match="batch"):
        SDPA(q, k[:1], v[:1], enable_gqa=True)
    with pytest.raises(ValueError, match="head dim"):
        SDPA(q, k[..., :4], v, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        SDPA(q, k, v)  # 4 query heads over 2 kv heads without enable_gqa
    with pytest.raises(ValueError, match="multiple"):
        SDPA(
            q, k[:, :1].expand(2, 3, 6, 8), v[:, :1].expand(2, 3, 6, 8), enable_gqa=True
        )  # 3 does not divide 4
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        SDPA(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="broadcast"):
        SDPA(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask"):
        SDPA(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int64), enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask"):
        SDPA(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.float64), enable_gqa=True)  # not q's dtype
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout_p"):
            SDPA(q, k, v, dropout_p=p, enable_gqa=True)
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        SDPA(q[0, 0], k[0, 0], v[0, 0])  # 2-d inputs


def test_triton_refuses_what_it_cannot_run():
    pytest.importorskip("triton")
    from gptfast.kernels.attention import unsupported

    assert unsupported("attention") is None
    assert (
        unsupported(
            "attention", attn_mask=True, dropout=True, head_dim=256, value_dim=64, dtype=torch.bfloat16
        )
        is None
    )
    assert "head_dim" in unsupported("attention", head_dim=512)
    assert "value_dim" in unsupported("attention", head_dim=64, value_dim=320)
    assert "float64" in unsupported("attention", dtype=torch.float64)


# ---------------------------------------------------------------------------------- GPU (bf16, large)
GPU_CASES = [c for c in CASES if c[1] == "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", GPU_CASES, ids=ids(GPU_CASES))
@pytest.mark.parametrize(
    "dtype,causal,shape",
    [
        # each new (dtype, head dim, causal) compiles all three kernels on the GPU, so the list stays short
        (
            torch.bfloat16,
            True,
            (2, 8, 8, 1024, 1024, 128),
        ),  # the benchmark's head dim and mode at a long length
        (torch.bfloat16, False, (2, 8, 8, 1024, 1024, 128)),
        (torch.float16, True, (2, 8, 8, 1024, 1024, 128)),
        (torch.bfloat16, True, (1, 8, 2, 1000, 1031, 64)),  # GQA, lengths off every block size
        (torch.float16, False, (1, 8, 1, 1000, 1031, 64)),  # MQA
        (torch.bfloat16, True, (2, 4, 4, 257, 257, 256)),  # the largest head dim
        (torch.bfloat16, False, (2, 6, 6, 300, 300, 80)),  # a padded head dim
        (torch.bfloat16, False, (4, 8, 8, 1, 2049, 128)),  # decode: one query against a long cache
    ],
    ids=lambda x: str(x).replace("torch.", "").replace(" ", ""),
)
def test_gpu_matches_reference(backend, device, dtype, causal, shape):
    B, Hq, Hk, L, S, D = shape
    _check_against_reference(
        backend, device, *_qkv(B, Hq, Hk, L, S, D), dtype, is_causal=causal, enable_gqa=Hq != Hk
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", GPU_CASES, ids=ids(GPU_CASES))
def test_gpu_masks_bf16(backend, device):
    bool_mask = torch.rand(2, 1, 500, 700) > 0.3
    bool_mask[0, 0, 10] = False
    _check_against_reference(backend, device, *_qkv(2, 4, 4, 500, 700, 64), torch.bfloat16, mask=bool_mask)
    float_mask = _randn(500, 700)
    float_mask[3] = float("-inf")
    _check_against_reference(backend, device, *_qkv(2, 4, 4, 500, 700, 64), torch.bfloat16, mask=float_mask)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b, d in GPU_CASES if b in ("reference", "triton")])
def test_gpu_dropout_same_mask(backend):
    B, H, L, S, D, p, scale = 2, 4, 300, 333, 64, 0.2, 0.125
    rng = torch.tensor([42, 7], dtype=torch.int64)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv(B, H, H, L, S, D))
    dout = _randn(B, H, L, D, dtype=torch.bfloat16, device="cuda")
    keep = _keep_mask(backend, rng, (B, H, L, S), p, "cuda")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    fwd, bwd = _library.pair("attention", backend)
    out, lse = fwd(q, k, v, None, p, True, scale, rng)
    grads = bwd(dout, q, k, v, None, out, lse, p, True, scale, rng)
    ref = _forward_backward(
        lambda a, b, c: _dropout_math(a, b, c, keep, p, True, scale),
        *(t.float() for t in (q, k, v)),
        dout.float(),
    )
    theirs = _forward_backward(lambda a, b, c: _dropout_math(a, b, c, keep, p, True, scale), q, k, v, dout)
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), (out, *grads), ref, theirs):
        assert_close(g, r, t, name=f"{backend}/dropout/{name}")


def _fused_views(qkv, Hk, S=None):
    """q, k, v as the GPT passes them: strided views of one fused (B, L, 3, H, D) projection; k and v keep Hk
    heads (GQA), and the first S positions when given (Lq != Lk)."""
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    S = S or qkv.shape[1]
    return q, k[:, :Hk, :S], v[:, :Hk, :S]


def _fused_value_and_grad(attend, qkv, Hk, S, dout):
    leaf = qkv.detach().clone().requires_grad_()
    out = attend(*_fused_views(leaf, Hk, S))
    out.backward(dout)
    return out.detach(), leaf.grad


def _torch_lse(q, k, causal):
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ kf.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        L, S = scores.shape[-2:]
        scores.masked_fill_(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.gpu
def test_triton_tma_configs_gpu(monkeypatch):
    # The TMA configs on the hardware, forced one at a time per kernel (the autotuner may pick any), on the
    # GPT's layout (_fused_views), L off every block size. D=128 causal (the benchmark's) runs every TMA
    # config but the warp-specialised ones (their own test, below); D=64 with GQA (dK/dV's descriptors span a
    # group's query heads) and D=96 non-causal with Lq != Lk (the copy engine zero-fills columns past D and
    # keys past S) run the first of each. Checked: the output, the saved lse the backward starts from, and the
    # fused projection's gradient.
    from gptfast.kernels import attention as kernels

    for D, Hk, S, causal in ((128, 8, None, True), (64, 2, None, True), (96, 8, 900, False)):
        q, k, v, check = _fused_gpu_case(D, Hk, S, causal)
        assert kernels._tma_ok("fwd", k, v) and kernels._tma_ok("dkdv", q, q)
        kinds = ("fwd", "dkdv", "dq")
        lists = {
            kind: [
                c
                for c in kernels.candidates(kind, torch.bfloat16, D)
                if kernels._uses_tma(c) and not kernels._warp_specialized(c)
            ]
            for kind in kinds
        }
        for i in range(max(len(c) for c in lists.values()) if D == 128 else 1):
            for kind, configs in lists.items():
                monkeypatch.setitem(kernels.FORCED, kind, configs[min(i, len(configs) - 1)])
            check(f"D={D} TMA configs {dict(kernels.FORCED)}")
        for kind in kinds:
            monkeypatch.delitem(kernels.FORCED, kind)


@pytest.mark.gpu
def test_triton_warp_specialized_configs_gpu(monkeypatch):
    # The warp-specialised forward, dQ and dK/dV configs (one loop that triton splits into a TMA producer and
    # two consumer warp groups), on the (head dim, causal) pairs scripts/probe_warp_spec.py runs first: each
    # forced, at every head dim that has them, causal and not, GQA, and L != S off every block size (the copy
    # engine's zero-filled tails are all that masks the keys past S, and the query rows past L, L = 1000 being
    # a multiple of 4 as the backward kernels need but of no block). Checked: the output, the saved lse and
    # the gradients, whose backward starts from both.
    from gptfast.kernels import attention as kernels

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("triton warp-specialises these configs on sm_90 only")
    if os.environ.get("GPTFAST_TRITON_WARP_SPEC") == "0":
        pytest.skip("GPTFAST_TRITON_WARP_SPEC=0 (scripts/gpu_check.sh sets it when its probe of them failed)")
    if not kernels._WS_STATE["ok"]:
        pytest.skip("this triton has no tl.range(warp_specialize=...)")
    launches = _record_warp_spec(monkeypatch, kernels)
    for D, Hk, S, causal in (
        (128, 8, None, True),
        (128, 2, 900, False),
        (64, 8, 900, True),
        (256, 4, None, True),
    ):
        *_, check = _fused_gpu_case(D, Hk, S, causal)
        # check() runs the forward twice, the backward once; dK/dV has no warp-specialised config at D=256.
        for kind, launched in (("fwd", 2), ("dq", 1), ("dkdv", 1)):
            configs = [c for c in kernels.candidates(kind, torch.bfloat16, D) if kernels._warp_specialized(c)]
            assert configs or (kind, D) == ("dkdv", 256), f"no warp-specialised {kind} config at D={D}"
            for config in configs:
                monkeypatch.setitem(kernels.FORCED, kind, config)
                launches.clear()
                what = f"D={D} causal={causal} Hk={Hk} S={S} {kind} {config}"
                check(what)
                # Not the plain TMA twin a forced config falls back to where warp specialisation may not run.
                assert [ws for k, ws in launches if k == kind] == [True] * launched, what
            monkeypatch.delitem(kernels.FORCED, kind, raising=False)


def _fused_gpu_case(D, Hk, S, causal):
    """(q, k, v, check): a bf16 case on the GPT's layout (B=2, L=1000, 8 query heads) and check(what), which
    runs the triton backend on it, with whatever kernels.FORCED holds, against torch: the saved lse the
    backward starts from, the output and the fused projection's gradient."""
    qkv = torch.randn(2, 1000, 3, 8, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = _fused_views(qkv, Hk, S)
    dout = torch.randn(2, 8, 1000, D, device="cuda", dtype=torch.bfloat16)
    kw = dict(is_causal=causal, enable_gqa=Hk != 8)

    def torch_sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, **kw)

    want = _fused_value_and_grad(torch_sdpa, qkv.float(), Hk, S, dout.float())
    same = _fused_value_and_grad(torch_sdpa, qkv, Hk, S, dout)
    want_lse = _torch_lse(q, k, causal)
    fwd, _ = _library.pair("attention", "triton")

    def check(what):
        _, lse = fwd(q, k, v, None, 0.0, causal, D**-0.5, torch.zeros(2, dtype=torch.int64))
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=2e-3, msg=what)
        got = _fused_value_and_grad(lambda a, b, c: SDPA(a, b, c, backend="triton", **kw), qkv, Hk, S, dout)
        for name, g, w, t in zip(("out", "dqkv"), got, want, same):
            assert_close(g, w, t, f"{what} {name}")

    return q, k, v, check


@pytest.mark.gpu
def test_triton_attention_autotuned_gpu(monkeypatch):
    # The path training takes: the autotuner times the pointer and TMA configs together. A TMA config that
    # fails there would be set aside with a warning (kernels._run_tuned); here the warning is an error and the
    # TMA path must still be on afterwards. A K that TMA cannot describe (a base off 16 bytes, or a broadcast
    # head) must leave the TMA configs out and still be right.
    from gptfast.kernels import attention as kernels

    monkeypatch.setenv("GPTFAST_AUTOTUNE", "1")
    qkv = torch.randn(2, 1000, 3, 8, 128, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)

    def torch_sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True)

    want = _fused_value_and_grad(torch_sdpa, qkv.float(), 8, None, dout.float())
    same = _fused_value_and_grad(torch_sdpa, qkv, 8, None, dout)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _fused_value_and_grad(
            lambda a, b, c: SDPA(a, b, c, is_causal=True, backend="triton"), qkv, 8, None, dout
        )
    assert kernels._TMA_STATE["ok"], "the TMA configs were set aside"
    assert kernels._WS_STATE["ok"], "the warp-specialised configs were set aside"
    for name, g, w, t in zip(("out", "dqkv"), got, want, same):
        assert_close(g, w, t, f"autotuned {name}")
    flat = torch.randn(2 * 8 * 1000 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    k_off = flat[1:].view(2, 8, 1000, 64)
    k_wide = torch.randn(2, 1, 1000, 64, device="cuda", dtype=torch.bfloat16).expand(2, 8, 1000, 64)
    q = torch.randn(2, 8, 1000, 64, device="cuda", dtype=torch.bfloat16)
    for k, what in ((k_off, "misaligned K"), (k_wide, "broadcast K")):
        assert not kernels._tma_ok("fwd", k, k), what
        out = ops.scaled_dot_product_attention(q, k, k, is_causal=True, backend="triton")
        want_out = F.scaled_dot_product_attention(q.float(), k.float(), k.float(), is_causal=True)
        assert_close(out, want_out, F.scaled_dot_product_attention(q, k, k, is_causal=True), what)
