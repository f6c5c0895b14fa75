"""torch.compile(fullgraph=True) traces through every op on every backend here: no graph breaks, same numbers."""
import pytest
import torch
import torch.nn.functional as F

from gptfast import ops
from gptfast.testing import assert_close
from backends_under_test import cases

ALL_OPS = ("softmax", "cross_entropy", "linear_cross_entropy", "attention")
BACKENDS = sorted({b for op in ALL_OPS for b, d in cases(op) if d == "cpu"})


def _all_ops(x, t, q, k, v, h, w, backend):
    # One function through all four ops, so a graph break in any of them fails fullgraph=True.
    a = ops.softmax(x, causal=True, scale=0.7, backend=backend).square().sum()
    b = ops.cross_entropy(x.reshape(-1, x.shape[-1]), t, label_smoothing=0.1, z_loss=1e-3, backend=backend)
    c = ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend).square().sum()
    d = ops.linear_cross_entropy(h, w, t, chunk_size=5, backend=backend)
    e = ops.linear_cross_entropy(h, w, t, reduction="none", chunk_size=4, backend=backend).sum()
    return a + b + c + d + e


def _inputs(device="cpu", dtype=torch.float32, head_dim=16):
    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(True)

    t = torch.randint(0, 6, (12,), device=device)
    return leaf(2, 6, 6), t, leaf(1, 4, 5, head_dim), leaf(1, 2, 7, head_dim), leaf(1, 2, 7, head_dim), \
        leaf(12, head_dim), leaf(6, head_dim)


def _run(fn, inputs, backend):
    leaves = [a for a in inputs if a.requires_grad]
    for a in leaves:
        a.grad = None
    out = fn(*inputs, backend)
    out.backward()
    return out.detach(), [a.grad.clone() for a in leaves]


def _check(compiler, backend, device="cpu", dtype=torch.float32, head_dim=16, tol=1e-5):
    inputs = _inputs(device, dtype, head_dim)
    eager_out, eager_grads = _run(_all_ops, inputs, backend)
    torch._dynamo.reset()
    compiled = torch.compile(_all_ops, fullgraph=True, backend=compiler)
    out, grads = _run(compiled, inputs, backend)
    torch.testing.assert_close(out, eager_out, rtol=tol, atol=tol)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aot_eager_fullgraph(backend):
    _check("aot_eager", backend)


def test_inductor_fullgraph_once():
    # Inductor takes ~a minute on 2 cores, so it runs once, on the automatic backend choice.
    _check("inductor", None)


GPU_BACKENDS = sorted({b for op in ALL_OPS for b, d in cases(op) if d == "cuda"})


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["triton"])
def test_fullgraph_on_gpu(backend, compiler):
    # bf16 and head dim 64: the dtype and size every CUDA backend's attention accepts. The compiled graph runs
    # the same kernels as eager, so only inductor's own fusions around them may move the last bits.
    _check(compiler, backend, "cuda", torch.bfloat16, 64, tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_autotuned_on_gpu(monkeypatch, compiler):
    # The other tests run one config (GPTFAST_AUTOTUNE=0, conftest); training autotunes, so the autotuned
    # softmax and cross-entropy launches must trace too, and give right numbers: checked by the tolerance rule
    # against torch in fp32 (torch in bf16 sets the budget). 4096 columns give both ops several candidates;
    # the random weights w give the softmax term a gradient as large as the cross-entropy's.
    monkeypatch.setenv("GPTFAST_AUTOTUNE", "1")
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 4096, (64,), device="cuda")
    w = (64 * torch.randn(64, 4096, device="cuda")).bfloat16()

    def gptfast_fn(x, t, w):
        a = (ops.softmax(x, scale=0.7, backend="triton") * w).sum()
        return a + ops.cross_entropy(x, t, backend="triton")

    def torch_fn(x, t, w):
        return (F.softmax(0.7 * x, dim=-1) * w).sum() + F.cross_entropy(x, t)

    def value_and_grad(fn, x):
        leaf = x.detach().clone().requires_grad_()
        out = fn(leaf, t, w.to(x.dtype))
        out.backward()
        return out.detach().float(), leaf.grad

    want, same = value_and_grad(torch_fn, x.float()), value_and_grad(torch_fn, x)
    torch._dynamo.reset()
    got = value_and_grad(torch.compile(gptfast_fn, fullgraph=True, backend=compiler), x)
    assert_close(got[0], want[0], same[0], "compiled value")
    assert_close(got[1], want[1], same[1], "compiled gradient")
