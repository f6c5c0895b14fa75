"""Registers each (op, backend) pair with the PyTorch dispatcher, once, on first use.

cpu and cuda pairs are the extension's ops, torch.ops.gptfast.<op>_fwd/_bwd (schemas in csrc/ops.cpp); the
reference and triton pairs become torch.library custom ops gptfast::<op>_fwd_<backend> with the same schemas.
Every pair gets a fake (meta) implementation and autograd, so torch.compile(fullgraph=True) traces through it.
"""
import dataclasses
import functools
import re
from typing import Callable

import torch
from torch.autograd import forward_ad

from .. import backends
from .schemas import SCHEMAS


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What an op file tells the registry: fakes for both halves and the autograd glue around them."""
    name: str
    fake_fwd: Callable
    fake_bwd: Callable
    setup_context: Callable  # (ctx, inputs, output) -> None
    backward: Callable  # (ctx, bwd_op, *grads) -> grads of the forward's inputs
    register_extra: Callable | None = None  # (backend, fwd_op) -> None: further ops built on the pair
    extras: tuple[tuple[str, Callable], ...] = ()  # (half, fake): more halves with a schema (bwd_inplace)


_SPECS: dict[str, OpSpec] = {}


def register_spec(spec: OpSpec) -> OpSpec:
    _SPECS[spec.name] = spec
    return spec


def _attach(fwd_name: str, bwd_name: str, fwd, bwd, spec: OpSpec) -> None:
    torch.library.register_fake(fwd_name, spec.fake_fwd)
    torch.library.register_fake(bwd_name, spec.fake_bwd)
    torch.library.register_autograd(
        fwd_name, lambda ctx, *grads: spec.backward(ctx, bwd, *grads), setup_context=spec.setup_context
    )
    torch.library.register_autograd(bwd_name, _no_derivative(bwd_name))


def _no_derivative(name: str) -> Callable:
    """The backward halves' autograd: a create_graph=True gradient is built, but differentiating it raises.

    Without one, autograd's fallback for a C++ op without an Autograd kernel warns and treats the op as having
    no derivative, so a double backward through the cpu or cuda backend returned a silently wrong number."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{name} (a gptfast backward pass) has no derivative: a gradient taken through gptfast ops with "
            "create_graph=True cannot be differentiated again (double backward is not supported)"
        )

    return backward


def _python_op(qualname: str, impl: Callable, schema: str, backend: str, traceable: bool, mutates=()):
    # Triton pairs on GPUs are triton_ops: torch.compile then traces into the launcher and sees the kernels
    # (launched through torch.library.wrap_triton). Under TRITON_INTERPRET=1 the kernels run on CPU tensors,
    # which that tracing cannot launch, so there they stay opaque custom ops; so does a kernel module that sets
    # TRACEABLE = False (its launcher calls torch ops that tracing decomposes wrongly). triton_op infers the
    # schema from the pair's annotations.
    if backend == "triton" and traceable and not backends.interpreting():
        return torch.library.triton_op(qualname, impl, mutates_args=mutates)
    if backend == "triton" and not backends.interpreting():
        impl = _direct_launches(impl)
    return torch.library.custom_op(qualname, impl, mutates_args=mutates, schema=schema)


def _direct_launches(impl: Callable) -> Callable:
    """impl with its wrap_triton launches run as plain kernel calls, as a triton_op's are when eager.

    An opaque custom op is never traced into, but wrap_triton does not know that: left on, every launch goes
    through torch's traced-kernel path in eager too (about 1 ms of dispatch each, and an entry in a side table
    that grows for the life of the process)."""
    switch = getattr(getattr(torch._library, "triton", None), "set_wrap_triton_enabled", None)
    if switch is None:  # a torch without the switch has no traced path to skip
        return impl

    @functools.wraps(impl)
    def run(*args, **kwargs):
        with switch(False):
            return impl(*args, **kwargs)

    return run


@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, backend: str | None = None, **features) -> str:
    """Selects the backend for this call and makes sure its pair is registered; returns the backend name.

    torch.compile runs this once while tracing and bakes the answer into the graph, so changing use(...) or
    GPTFAST_BACKEND later does not re-select inside an already compiled function.
    """
    name = backends.select(op, device, backend, **features)
    pair(op, name)
    return name


def call(op: str, backend: str, *args):
    """`op`'s forward on `backend` (registered by resolve), differentiable: how every public op runs.

    torch.compile, torch.jit.trace (which can save only dispatcher ops) and functorch transforms (vmap) get
    the registered op, torch.ops.gptfast.<op>_fwd..., whose autograd is torch.library's. Eager calls run the
    same kernels with the same OpSpec glue, but through an autograd.Function of their own that calls the op
    below the dispatcher's Python autograd kernel: that kernel refills the schema's defaults and wraps a
    Function of its own on every call: a fifth to a quarter of the dispatch's host time with grad, 42% without
    (benchmarks/host_overhead.py), which a GPU running mid-size kernels waits for. Forward-mode AD, which
    neither path has, raises.
    """
    fwd_op = fwd(op, backend)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return fwd_op(*args)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        _refuse_forward_ad(op, any(i.key() == _JVP for i in torch._C._functorch.get_interpreter_stack()))
        return fwd_op(*args)
    if forward_ad._current_level >= 0:  # inside a dual_level(): refuse inputs that carry a tangent
        _refuse_forward_ad(op, any(
            isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args
        ))
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _eager_function(op, backend).apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return fwd_op(*args)


_JVP = torch._C._functorch.TransformType.Jvp


def _refuse_forward_ad(op: str, tangents: bool) -> None:
    # Both paths would drop the tangent silently (torch.func.jvp gave 0): the ops have no jvp rule.
    if tangents:
        raise NotImplementedError(
            f"gptfast {op} has no forward-mode derivative (torch.func.jvp, torch.autograd.forward_ad); "
            "use reverse mode (backward, torch.autograd.grad) or the torch op"
        )


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim), contiguous: itself when it already is, since every reshape or view that
    autograd records is a node of its own, with host time in both passes."""
    rows = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    return rows.contiguous()


@functools.cache
def _eager_function(op: str, backend: str) -> type[torch.autograd.Function]:
    spec = _SPECS[op]
    fwd_op, bwd_op = fwd(op, backend), fwd(op, backend, "bwd")

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = fwd_op(*args)
        spec.setup_context(ctx, args, output)
        return output

    def bwd_below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return bwd_op(*args)

    def backward(ctx, *grads):
        # A create_graph=True backward keeps the backward half's autograd (_no_derivative), as the registered
        # op's does.
        return spec.backward(ctx, bwd_op if torch.is_grad_enabled() else bwd_below_autograd, *grads)

    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(f"{qualname(op, backend)}_eager", (torch.autograd.Function,), methods)


def qualname(op: str, backend: str, half: str = "fwd") -> str:
    return f"{op}_{half}" if backend in ("cpu", "cuda") else f"{op}_{half}_{backend}"


def fwd(op: str, backend: str, half: str = "fwd"):
    """The registered forward (or another half) of `op` on `backend`, looked up through torch.ops (which
    torch.compile traces)."""
    return getattr(torch.ops.gptfast, qualname(op, backend, half))


@functools.cache
def pair(op: str, backend: str):
    """(fwd, bwd) callables for `op` on `backend`, registered with fakes and autograd."""
    spec = _SPECS[op]
    if backend in ("cpu", "cuda"):
        # Both C++ backends share one dispatcher op; register its fake and autograd only once.
        fwd_op, bwd_op = _extension_pair(op)
    else:
        fwd_op, bwd_op = _python_pair(op, backend)
    if spec.register_extra:
        spec.register_extra(backend, fwd_op)
    for half, fake in spec.extras:
        _extra(op, backend, half, fake)
    return fwd_op, bwd_op


def _python_pair(op: str, backend: str):
    spec = _SPECS[op]
    module = backends.kernel_module(backend, op)
    fwd_name, bwd_name = f"gptfast::{qualname(op, backend)}", f"gptfast::{qualname(op, backend, 'bwd')}"
    traceable = getattr(module, "TRACEABLE", True)
    fwd_op = _python_op(fwd_name, getattr(module, f"{op}_fwd"), SCHEMAS[f"{op}_fwd"], backend, traceable)
    bwd_op = _python_op(bwd_name, getattr(module, f"{op}_bwd"), SCHEMAS[f"{op}_bwd"], backend, traceable)
    _attach(fwd_name, bwd_name, fwd_op, bwd_op, spec)
    return fwd_op, bwd_op


@functools.cache
def _extension_pair(op: str):
    import gptfast._C  # noqa: F401  (loads the schemas and kernels)

    fwd_op, bwd_op = getattr(torch.ops.gptfast, f"{op}_fwd"), getattr(torch.ops.gptfast, f"{op}_bwd")
    _attach(f"gptfast::{op}_fwd", f"gptfast::{op}_bwd", fwd_op, bwd_op, _SPECS[op])
    return fwd_op, bwd_op


def _extra(op: str, backend: str, half: str, fake: Callable) -> None:
    """Registers a further half of `op` beside its pair (e.g. cross_entropy_bwd_inplace on `backend`) with its
    fake and no autograd of its own (it runs inside a backward). The tensors its schema marks `(a!)` are the
    ones it writes."""
    if backend in ("cpu", "cuda"):
        _extension_extra(f"{op}_{half}", fake)
    else:
        _python_extra(op, backend, half, fake)


@functools.cache
def _python_extra(op: str, backend: str, half: str, fake: Callable):
    module = backends.kernel_module(backend, op)
    schema = SCHEMAS[f"{op}_{half}"]
    name = f"gptfast::{qualname(op, backend, half)}"
    mutates = tuple(re.findall(r"Tensor\(\w!\) (\w+)", schema))
    traceable = getattr(module, "TRACEABLE", True)
    _python_op(name, getattr(module, f"{op}_{half}"), schema, backend, traceable, mutates)
    torch.library.register_fake(name, fake)


@functools.cache
def _extension_extra(name: str, fake: Callable):
    import gptfast._C  # noqa: F401

    torch.library.register_fake(f"gptfast::{name}", fake)
