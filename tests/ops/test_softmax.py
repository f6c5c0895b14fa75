"""ops.softmax on every backend that runs here, against torch in higher precision (design.md's rule).

The expected values are torch's own: F.softmax of (scale * x) with the causal entries set to -inf, computed in
fp64 for fp32 inputs and fp32 for half inputs; torch in the input dtype sets the error budget. This checks the
reference backend against torch and every other backend against the same spec, for outputs and gradients.
"""

import pytest
import torch
import torch.nn.functional as F

from gptfast import backends, ops
from gptfast.testing import assert_close, reference_dtype

from backends_under_test import assert_compiles_like_eager, cases, ids

CASES = cases("softmax")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_interpreted_bf16(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 wrongly; bf16 Triton runs in the GPU tests")


def torch_softmax(x, dim=-1, scale=1.0, causal=False):
    """The spec in plain torch, in x's dtype: softmax(scale * x) with x[..., i, j > i] masked when causal."""
    s = x * scale
    if causal:
        L, S = x.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    return F.softmax(s, dim=dim)


def check_against_torch(x, dim=-1, scale=None, causal=False, backend="reference"):
    """ops.softmax's output and input gradient (for a random upstream gradient) vs torch, by the rule."""
    hp = reference_dtype(x.dtype)
    s = 1.0 if scale is None else scale
    dy = torch.randn(x.shape, dtype=x.dtype, device=x.device)

    def run(fn, inp):
        inp = inp.detach().requires_grad_()
        out = fn(inp)
        (grad,) = torch.autograd.grad(out, inp, dy.to(out.dtype))
        return out, grad

    out, grad = run(lambda t: ops.softmax(t, dim, scale=scale, causal=causal, backend=backend), x)
    ref, ref_grad = run(lambda t: torch_softmax(t, dim, s, causal), x.to(hp))
    same, same_grad = run(lambda t: torch_softmax(t, dim, s, causal), x)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, ref, same, "softmax output")
    assert_close(grad, ref_grad, same_grad, "softmax grad")


# (shape, dim, scale, causal, why)
SHAPES = [
    ((1, 1), -1, None, False),  # one row of one column: y = 1, dy = 0
    ((3, 37), -1, None, False),  # non-power-of-two row, fewer rows than a tile
    ((70, 129), -1, 0.5, False),  # several multi-row tiles and a ragged last tile; a scale
    ((4, 6, 33), 1, None, False),  # dim != -1: softmax over a middle axis
    ((2, 3, 17, 17), -1, 0.3, True),  # causal square score matrices with a scale
    ((2, 9, 13), -1, -1.5, True),  # causal with L != S (top-left aligned) and a negative scale
    ((5,), 0, 2.0, False),  # a 1-d input
]


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim,scale,causal", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_matches_torch(backend, device, dtype, shape, dim, scale, causal):
    _skip_interpreted_bf16(backend, device, dtype)
    x = 3 * torch.randn(shape, device=device).to(dtype)
    check_against_torch(x, dim, scale, causal, backend)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_input(backend, device, dtype):
    # a transposed view and a strided slice: the op must not assume x's memory layout
    base = torch.randn(40, 24, device=device).to(dtype)
    check_against_torch(base.t(), -1, 0.7, False, backend)
    check_against_torch(base[::3, 1::2], 0, None, False, backend)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_fully_masked_row_gives_zeros(backend, device):
    # a row of all -inf has nothing to normalise: zeros, never NaN (design.md), with a zero gradient
    x = torch.randn(3, 8, device=device)
    x[1] = float("-inf")
    x.requires_grad_()
    y = ops.softmax(x, backend=backend)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert torch.allclose(y[[0, 2]], F.softmax(x[[0, 2]].detach(), -1))
    (g,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.equal(g[1], torch.zeros_like(g[1]))


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_empty_input(backend, device):
    # zero rows: nothing to launch, an empty result
    x = torch.randn(0, 16, device=device, requires_grad=True)
    y = ops.softmax(x, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


def test_reference_gradcheck_float64():
    x = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: ops.softmax(t, scale=0.7, causal=True, backend="reference"), (x,)
    )
    assert torch.autograd.gradcheck(lambda t: ops.softmax(t, dim=1, backend="reference"), (x,))


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_torch_compile_fullgraph(backend, device):
    x = torch.randn(2, 7, 7, device=device)

    def fn(t):
        return ops.softmax(t, scale=0.5, causal=True, backend=backend).square().sum()

    assert_compiles_like_eager(fn, x)


# --------------------------------------------------------------------------------------- triton paths
def _triton_case():
    devices = [d for b, d in CASES if b == "triton"]
    if not devices:
        pytest.skip("the triton backend cannot run here")
    from gptfast.kernels import softmax as kernels

    return kernels, devices[0]


@pytest.mark.parametrize("block", [16, 64, 256])
@pytest.mark.parametrize("causal_rows", [0, 7])
def test_triton_online_path_small_blocks(block, causal_rows):
    # blocks shorter than the row force the online (running max / sum) multi-block kernels on a small input;
    # N = 1000 is not a multiple of any block, and causal_rows = 7 leaves rows with 1..7 kept columns
    kernels, device = _triton_case()
    from gptfast.ops import reference

    x = 4 * torch.randn(9, 1000, device=device)
    dy = torch.randn_like(x)
    y = kernels.softmax_forward(x, 0.8, causal_rows, block=block)
    dx = kernels.softmax_backward(dy, y, 0.8, causal_rows, block=block)
    xh, dyh = x.double(), dy.double()
    ref = reference.softmax_fwd(xh, 0.8, causal_rows)
    ref_dx = reference.softmax_bwd(dyh, ref, 0.8, causal_rows)
    assert_close(y, ref, reference.softmax_fwd(x, 0.8, causal_rows), "online softmax output")
    assert_close(
        dx,
        ref_dx,
        reference.softmax_bwd(dy, reference.softmax_fwd(x, 0.8, causal_rows), 0.8, causal_rows),
        "online softmax grad",
    )


@pytest.mark.parametrize("N", [32768, 262144])
def test_triton_long_rows(N):
    # 32768: the longest single-pass row; 262144: the online path at its default block (256k columns, one row)
    _, device = _triton_case()
    x = 5 * torch.randn(1, N, device=device)
    check_against_torch(x, -1, 1.3, False, "triton")


def _check_candidates(kernels, x, causal_rows, what):
    from gptfast.ops import reference

    dy = torch.randn_like(x)
    hp = reference_dtype(x.dtype)
    M, N = x.shape
    ref = reference.softmax_fwd(x.to(hp), 0.7, causal_rows)
    ref_dx = reference.softmax_bwd(dy.to(hp), ref, 0.7, causal_rows)
    same = reference.softmax_fwd(x, 0.7, causal_rows)
    same_dx = reference.softmax_bwd(dy, same, 0.7, causal_rows)
    y = kernels.softmax_forward(x, 0.7, causal_rows)
    for c in kernels.candidates(M, N):
        got = kernels.softmax_forward(x, 0.7, causal_rows, candidate=c)
        assert_close(got, ref, same, f"{what} output, candidate {c}")
    for c in kernels.candidates(M, N, backward=True):
        got = kernels.softmax_backward(dy, y, 0.7, causal_rows, candidate=c)
        assert_close(got, ref_dx, same_dx, f"{what} grad, candidate {c}")


@pytest.mark.parametrize("N", [3000, 9000])
def test_triton_every_candidate(N):
    # The GPU autotuner may pick any of candidates(M, N): each must be right, not just the default the other
    # tests run. 3000 columns: single-pass tiles of several rows (M = 5 leaves a ragged last tile); 9000: the
    # 16k single pass against the online path at 4096 and 8192 columns a step; causal_rows = 3 masks most.
    kernels, device = _triton_case()
    x = 3 * torch.randn(5, N, device=device)
    assert len(kernels.candidates(5, N)) > 2
    _check_candidates(kernels, x, 0, f"N={N}")
    _check_candidates(kernels, x, 3, f"N={N} causal")


@pytest.mark.gpu
@pytest.mark.parametrize("N", [8192, 20000])
def test_triton_every_candidate_gpu(N):
    # bf16 on the GPU through every config the autotuner may pick (each a compile, so two lengths): 8192, a
    # benchmark length with tiles of one and two rows and the online path; 20000, the 32k tile masked and
    # the online path's last step partial. Causal candidates run under the interpreter.
    from gptfast.kernels import softmax as kernels

    x = 3 * torch.randn(300, N, device="cuda", dtype=torch.bfloat16)
    _check_candidates(kernels, x, 0, f"N={N}")


def test_triton_config_picks_paths():
    kernels, _ = _triton_case()
    assert kernels.config(8, 1000)["single"] and kernels.config(8, 1000)["ROWS"] == 4
    assert kernels.config(8, kernels.SINGLE_PASS_MAX)["single"]
    assert not kernels.config(8, kernels.SINGLE_PASS_MAX + 1)["single"]


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1000, 32768, 100000])
def test_triton_bf16_gpu(N):
    # bf16 on the real GPU: single-pass and online rows, causal
    x = 3 * torch.randn(64, N, device="cuda", dtype=torch.bfloat16)
    check_against_torch(x, -1, 0.9, False, "triton")
    check_against_torch(x[:, :64].reshape(4, 16, 64), -1, 0.9, True, "triton")


@pytest.mark.gpu
def test_triton_64bit_offsets_gpu():
    # 65540 x 32768 bf16 = 2^31 + 131072 elements: offsets of the last rows pass 2^31 and must not wrap
    from gptfast.kernels import softmax as kernels

    x = torch.randn(65540, 32768, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    y = kernels.softmax_forward(x, 1.0, 0)
    dx = kernels.softmax_backward(dy, y, 1.0, 0)
    xt, dyt, yt = x[-4:], dy[-4:], y[-4:]
    assert_close(yt, F.softmax(xt.float(), -1), F.softmax(xt, -1), "softmax rows past 2^31")

    def grad(y_, dy_):
        return y_ * (dy_ - (dy_ * y_).sum(-1, keepdim=True))

    assert_close(dx[-4:], grad(yt.float(), dyt.float()), grad(yt, dyt), "softmax grad rows past 2^31")


# ---------------------------------------------------------------------------------------------- errors
def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.softmax(torch.arange(6).reshape(2, 3))


def test_bad_dim_and_causal_arguments():
    x = torch.randn(2, 3, 3)
    with pytest.raises(IndexError, match="dim must be in"):
        ops.softmax(x, dim=3)
    with pytest.raises(ValueError, match="causal=True needs"):
        ops.softmax(x, dim=1, causal=True)
    with pytest.raises(ValueError, match="causal=True needs"):
        ops.softmax(torch.randn(4), causal=True)


def test_unknown_backend_lists_names():
    with pytest.raises(ValueError, match="known backends: reference, triton, cuda, cpu"):
        ops.softmax(torch.randn(2, 3), backend="nope")


def test_backend_that_cannot_run_names_reason():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(RuntimeError, match="gptfast backend 'cuda' cannot run softmax: .+") as info:
        ops.softmax(torch.randn(2, 3), backend="cuda")
    assert isinstance(info.value, backends.BackendUnavailable)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the interpreter is not in use")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.softmax(torch.randn(2, 3), backend="triton")
