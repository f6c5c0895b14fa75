"""Determinism (issue 7): every forward is bitwise identical across two runs with the same inputs, and so is
every backward under gptfast.backends.deterministic(True).

Which backward passes use atomics: only the cuda backend's attention (fp32 atomicAdd into dQ, csrc/cuda/
attention.cu). The Triton attention backward has one writer per dK/dV/dQ element; the cpu kernels split work
into disjoint outputs; the row ops' backward passes are elementwise once the row statistics are known; linear
cross-entropy's dweight sums chunks in a fixed order. So deterministic(True) (or torch's
use_deterministic_algorithms) keeps an attention call that needs gradients off the cuda backend: automatic
selection skips it, and naming it raises. These CPU tests run with torch's default thread count, so the cpu
kernels' parallel splits are in play.
"""

import pytest
import torch

from gptfast import backends, ops
from gptfast.ops.extension import unsupported_cuda

from backends_under_test import cases


def _inputs(op, device, interpreted, backend):
    """Inputs big enough for several parallel tasks on the cpu backend (small under the interpreter)."""
    g = torch.Generator().manual_seed(3)
    # The cuda attention kernel takes fp16/bf16 with head dim 64 or 128 only.
    cuda_attention = op == "attention" and backend == "cuda"
    dtype = torch.bfloat16 if cuda_attention else torch.float32

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if op == "softmax":
        return [randn(8, 300) if interpreted else randn(64, 3000)], {"causal": False}
    if op == "cross_entropy":
        rows, classes = (8, 300) if interpreted else (64, 5000)
        return [randn(rows, classes) * 3, torch.randint(0, classes, (rows,), generator=g).to(device)], {
            "label_smoothing": 0.1
        }
    if op == "linear_cross_entropy":
        rows, hidden, classes = (16, 16, 100) if interpreted else (128, 64, 1000)
        target = torch.randint(0, classes, (rows,), generator=g).to(device)
        return [randn(rows, hidden), randn(classes, hidden) / 8, target], {"chunk_size": rows // 4}
    B, H, L, D = (1, 2, 40, 16) if interpreted else (1, 4, 150, 64 if cuda_attention else 32)
    return [randn(B, H, L, D), randn(B, H, L, D), randn(B, H, L, D)], {"is_causal": True}


OPS = {
    "softmax": ops.softmax,
    "cross_entropy": ops.cross_entropy,
    "linear_cross_entropy": ops.linear_cross_entropy,
    "attention": ops.scaled_dot_product_attention,
}
CASES = [pytest.param(op, b, d, id=f"{op}-{b}-{d}") for op in OPS for b, d in cases(op)]


def _run(op, backend, device, grad):
    interpreted = backend == "triton" and device == "cpu"
    inputs, kw = _inputs(op, device, interpreted, backend)
    leaves = [t.clone().requires_grad_(grad and t.is_floating_point()) for t in inputs]
    out = OPS[op](*leaves, backend=backend, **kw)
    if not grad:
        return [out]
    out.backward(torch.ones_like(out) if out.dim() else None)
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


@pytest.mark.parametrize("op,backend,device", CASES)
def test_forward_is_bitwise_reproducible(op, backend, device):
    with torch.no_grad():
        first, second = _run(op, backend, device, False), _run(op, backend, device, False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("op,backend,device", CASES)
def test_backward_is_bitwise_reproducible_in_deterministic_mode(op, backend, device):
    with backends.deterministic(True):
        if op == "attention" and backend == "cuda":  # its backward adds dQ with atomics: refused by name
            with pytest.raises(backends.BackendUnavailable, match="atomics"):
                _run(op, backend, device, True)
            return
        first, second = _run(op, backend, device, True), _run(op, backend, device, True)
    assert len(first) > 1
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {i} (0 = output, then the gradients) differs between two runs"


def test_reference_dropout_is_reproducible_from_the_seed():
    q, k, v = (torch.randn(1, 2, 30, 8, requires_grad=True) for _ in range(3))
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        out = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="reference")
        runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ------------------------------------------------------------------------------ what deterministic selects
def test_deterministic_mode_refuses_the_cuda_attention_backward():
    assert unsupported_cuda("attention", grad=True) is None
    with backends.deterministic(True):
        reason = unsupported_cuda("attention", grad=True)
        assert "atomics" in reason and "backend='triton'" in reason
        assert unsupported_cuda("attention", grad=False) is None  # a forward alone is deterministic
        assert unsupported_cuda("cross_entropy", grad=True) is None


def test_torch_deterministic_algorithms_count_as_deterministic_mode():
    assert not backends.is_deterministic()
    torch.use_deterministic_algorithms(True)
    try:
        assert backends.is_deterministic()
        assert unsupported_cuda("attention", grad=True) is not None
    finally:
        torch.use_deterministic_algorithms(False)
    assert not backends.is_deterministic()


def test_deterministic_mode_passes_the_gradient_flag_to_selection(monkeypatch):
    # The public op tells selection whether gradients are needed; a refusal under deterministic mode then
    # makes automatic selection move on (here: the cpu backend refuses, so the reference runs).
    seen = []

    def refuse_when_grad(op, **features):
        seen.append(features.get("grad"))
        return "refused for the test" if features.get("grad") and backends.is_deterministic() else None

    monkeypatch.setattr("gptfast.ops.extension.unsupported_cpu", refuse_when_grad)
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    with backends.deterministic(True):
        assert backends.select("attention", q.device, grad=True) == "reference"
        ops.scaled_dot_product_attention(q, q, q)
        with torch.no_grad():
            ops.scaled_dot_product_attention(q, q, q)
    assert seen == [True, True, False]  # select(), the op with gradients, the op under no_grad


# ------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_deterministic_attention_gradients_are_bitwise_reproducible():
    q, k, v = (
        torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    runs = []
    with backends.deterministic(True):
        assert backends.select("attention", q.device, grad=True) != "cuda"
        with pytest.raises(backends.BackendUnavailable, match="atomics"):
            ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")
        for _ in range(2):
            out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
            runs.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_row_ops_are_bitwise_reproducible(backend):
    x = torch.randn(4096, 32000, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 32000, (4096,), device="cuda")
    runs = []
    for _ in range(2):
        xs = x.clone().requires_grad_()
        loss = ops.cross_entropy(xs, t, label_smoothing=0.1, backend=backend)
        y = ops.softmax(xs, backend=backend)
        (loss + y.float().square().sum()).backward()
        runs.append((loss, y, xs.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
