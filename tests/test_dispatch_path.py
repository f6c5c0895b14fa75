"""The two ways an op's kernels are reached: eager calls take _library.call's own autograd.Function, while
torch.compile, functorch transforms and direct torch.ops users take the registered op's torch.library
autograd. Both must give the same bits, and neither may differentiate a backward silently.

Shapes are tiny: these tests check wiring, not numerics (the op tests do that on both paths' kernels).
"""
import io

import pytest
import torch

from gptfast import ops
from gptfast.ops import _library

from backends_under_test import cases, ids


def _inputs(op: str, device: str):
    """(args of op's forward half, indices of the differentiable ones); fresh random values, odd sizes."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    if op == "softmax":
        return (r(5, 13), 0.5, 0), (0,)
    if op == "cross_entropy":
        target = torch.tensor([3, -100, 0, 12, 7], device=device)
        return (r(5, 13), target, -100, 0.1, 1e-3), (0,)
    if op == "linear_cross_entropy":
        target = torch.tensor([3, -100, 0, 12, 7], device=device)
        return (r(5, 6), r(13, 6), target, r(13), -100, 0.1, 1e-3, 2, False), (0, 1, 3)
    rng = torch.zeros(2, dtype=torch.int64)
    return (r(1, 2, 7, 8), r(1, 2, 9, 8), r(1, 2, 9, 8), None, 0.0, True, 0.35, rng), (0, 1, 2)


def _run(fn, args, diff):
    args = [a.clone().requires_grad_() if i in diff else a for i, a in enumerate(args)]
    out = fn(*args)
    first = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(first.shape, generator=torch.Generator().manual_seed(1)).to(first.device)
    grads = torch.autograd.grad((first * weights).sum(), [args[i] for i in diff])
    return first, grads


OPS = ("softmax", "cross_entropy", "linear_cross_entropy", "attention")
PAIRS = [(op, b, d) for op in OPS for b, d in cases(op)]
PAIR_IDS = [f"{op}-{b}-{d}" for op, b, d in PAIRS]


@pytest.mark.parametrize("op,backend,device", PAIRS, ids=PAIR_IDS)
def test_eager_and_registered_paths_agree_bitwise(op, backend, device):
    args, diff = _inputs(op, device)
    _library.resolve(op, torch.device(device), backend)
    eager, eager_grads = _run(lambda *a: _library.call(op, backend, *a), args, diff)
    registered, registered_grads = _run(_library.fwd(op, backend), args, diff)
    assert torch.equal(eager, registered)
    for e, r in zip(eager_grads, registered_grads):
        assert torch.equal(e, r)


@pytest.mark.parametrize("backend,device", cases("softmax"), ids=ids(cases("softmax")))
def test_eager_call_records_one_node_of_its_own(backend, device):
    # The eager path exists to cut host time: it must not be torch.library's Function (which refills the
    # schema's defaults on every call), and a contiguous 2-d input along its last dim takes no view nodes.
    x = torch.randn(4, 9, device=device, requires_grad=True)
    y = ops.softmax(x, backend=backend)
    assert "GeneratedBackwardFor" not in type(y.grad_fn).__name__
    ((node, _),) = y.grad_fn.next_functions
    assert type(node).__name__ == "AccumulateGrad" and node.variable is x


def _double_backward(op: str, backend: str, device: str):
    args, diff = _inputs(op, device)
    _library.resolve(op, torch.device(device), backend)
    args = [a.clone().requires_grad_() if i in diff else a for i, a in enumerate(args)]
    out = _library.call(op, backend, *args)
    first = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(first.square().sum(), args[diff[0]], create_graph=True)
    grad.square().sum().backward()


@pytest.mark.parametrize("op,backend,device", PAIRS, ids=PAIR_IDS)
def test_double_backward_raises_instead_of_a_wrong_number(op, backend, device):
    # Before the backward halves had an autograd of their own, the cpu and cuda backends' double backward ran
    # through autograd's fallback, which treats an op without an Autograd kernel as constant: a warning and
    # a silently wrong second derivative.
    with pytest.raises(RuntimeError, match="has no derivative.*double backward"):
        _double_backward(op, backend, device)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_reduced_linear_cross_entropy_second_derivatives(backend):
    # fp64 with a mean takes the reduced op, whose gradients come from the forward. Differentiating them
    # again with respect to hidden must raise (a graph over them alone would hold them as constants), while
    # the derivative through the upstream gradient is exact: torch.autograd.functional.jvp takes it so.
    if backend == "cpu" and ("cpu", "cpu") not in cases("linear_cross_entropy"):
        pytest.skip("the cpu backend is not built here")
    g = torch.Generator().manual_seed(3)
    h, w, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 6), (13, 6), (5, 6)))
    target = torch.tensor([3, -100, 0, 12, 7])
    ours = lambda t: ops.linear_cross_entropy(t, w, target, backend=backend)  # noqa: E731
    theirs = lambda t: torch.nn.functional.cross_entropy(t @ w.T, target)  # noqa: E731
    jvp = torch.autograd.functional.jvp
    torch.testing.assert_close(jvp(ours, h, v)[1], jvp(theirs, h, v)[1])
    leaf = h.clone().requires_grad_()
    (grad,) = torch.autograd.grad(ours(leaf), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="no derivative with respect to hidden"):
        grad.sum().backward()


def test_vmap_takes_the_registered_op_with_gradients():
    # functorch transforms see only ops through the dispatcher; _library.call hands them the registered op.
    # Through the eager Function instead, vmap's output would silently not require grad.
    x = torch.randn(3, 4, 5, requires_grad=True)
    y = torch.func.vmap(lambda t: ops.softmax(t, backend="reference"))(x)
    assert y.requires_grad
    dy = torch.randn(3, 4, 5)
    (grad,) = torch.autograd.grad(y, x, dy)
    ref = x.detach().requires_grad_()
    torch.testing.assert_close(y, ref.softmax(-1))
    torch.testing.assert_close(grad, torch.autograd.grad(ref.softmax(-1), ref, dy)[0])


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    # Neither path has a jvp rule; both used to return a zero tangent (torch.func.jvp) or none (dual tensors).
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda t: ops.softmax(t, backend="reference"), (x,), (v,))
    with torch.autograd.forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
            ops.softmax(torch.autograd.forward_ad.make_dual(x, v), backend="reference")
        torch.testing.assert_close(ops.softmax(x, backend="reference"), x.softmax(-1))  # no tangent: fine


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # a trace fixes shapes; the op's branches on them
def test_jit_trace_records_the_registered_op():
    # torch.jit.save can serialise dispatcher ops only, not the eager path's Python autograd.Function, which
    # a trace records when the parameters require grad.
    traced = torch.jit.trace(_TracedSoftmax(), (torch.randn(4, 5),))
    assert "gptfast::softmax_fwd_reference" in str(traced.graph)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    x = torch.randn(4, 5)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(x), loaded.linear(x).softmax(-1))


class _TracedSoftmax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(5, 5)

    def forward(self, x):
        return ops.softmax(self.linear(x), backend="reference")
