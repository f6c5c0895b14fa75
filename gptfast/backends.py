"""Backend names, availability and selection.

Selection order for each call: the `backend=` argument, then the innermost `use(...)` block, then the
GPTFAST_BACKEND environment variable (read at call time), then the fastest backend that can run the call on the
tensors' device. A backend named explicitly that cannot run raises; it never falls back silently.
"""
import contextlib
import contextvars
import functools
import importlib
import os

import torch

NAMES = ("reference", "triton", "cuda", "cpu")
OPS = ("softmax", "cross_entropy", "linear_cross_entropy", "attention")

# Auto selection tries these in order and takes the first that can run the call.
_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("gptfast_backend", default=None)
_deterministic: contextvars.ContextVar[bool] = contextvars.ContextVar("gptfast_deterministic", default=False)


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run this call; the message says why and how to fix it."""


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown gptfast backend {name!r}; known backends: {', '.join(NAMES)}")
    return name


@contextlib.contextmanager
def use(name: str):
    """Run the enclosed gptfast ops on backend `name` (unless a call passes backend= itself)."""
    token = _requested.set(_check_name(name))
    try:
        yield
    finally:
        _requested.reset(token)


@contextlib.contextmanager
def deterministic(flag: bool = True):
    """Select bitwise-reproducible kernels (no atomics in backward passes, no autotuning) inside the block.

    Every forward gives the same bits for the same config; of the backward passes only the cuda backend's
    attention (fp32 atomicAdd into dQ) does not, so inside the block an attention call that needs gradients
    never selects it. The Triton kernels also run their default configs untimed inside the block: an
    autotuner's pick can differ between two processes, and with it the rounding. (The cuda backend's timed
    choices are made in C++, which sees torch.use_deterministic_algorithms but not this block.)
    """
    token = _deterministic.set(bool(flag))
    try:
        yield
    finally:
        _deterministic.reset(token)


def is_deterministic() -> bool:
    """True inside deterministic(True), or while torch.use_deterministic_algorithms(True) is on."""
    return _deterministic.get() or torch.are_deterministic_algorithms_enabled()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled() -> bool:
    """False when GPTFAST_AUTOTUNE=0 or is_deterministic(): the Triton kernels then run each candidate list's
    first config, untimed.
    Every candidate costs a compile (seconds) per dtype and shape bucket, which a test suite sweeping many
    combinations cannot afford; benchmarks and training leave it on. Read at call time."""
    return os.environ.get("GPTFAST_AUTOTUNE", "1") != "0" and not is_deterministic()


@functools.cache
def _extension_error() -> str | None:
    try:
        importlib.import_module("gptfast._C")
    except ImportError as e:
        return (
            f"the C++ extension gptfast._C is not built ({e}); reinstall with "
            "`pip install --no-build-isolation -e .` and without GPTFAST_SKIP_EXT=1"
        )
    return None


@functools.cache
def _triton_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"triton is not importable ({e}); install it with `pip install triton`"
    return None


def kernel_module(backend: str, op: str):
    """The Python module that implements `op`'s pair on `backend` (reference / triton), or None."""
    if backend == "reference":
        return importlib.import_module("gptfast.ops.reference")
    if backend == "triton":
        return importlib.import_module(f"gptfast.kernels.{op}")
    return None


@functools.cache
def _has_dispatch_kernel(op: str, key: str) -> bool:
    # Asked on every call of an op (a few microseconds in the dispatcher); the answer is fixed once gptfast._C
    # has loaded, which why_not checks first.
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gptfast::{op}_fwd", key)


def why_not(backend: str, op: str, device: torch.device, **features) -> str | None:
    """None when `backend` can run `op` on `device` with these features, else the reason and the fix."""
    _check_name(backend)
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        err = _triton_error()
        if err:
            return err
        if device.type == "cpu" and not interpreting():
            return "triton runs on CUDA tensors; on CPU tensors set TRITON_INTERPRET=1 (slow, for testing)"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        try:
            module = kernel_module("triton", op)
        except ModuleNotFoundError as e:
            if e.name != f"gptfast.kernels.{op}":
                raise
            return f"there is no triton kernel for {op} yet (kernels/{op}.py); use backend='reference'"
    else:
        err = _extension_error()
        if err:
            return err
        if device.type != backend:
            return f"the {backend!r} backend runs on {backend} tensors, and these are on {device.type}"
        if not _has_dispatch_kernel(op, backend.upper()):
            fix = "rebuild with a CUDA toolchain and a CUDA build of torch" if backend == "cuda" else ""
            return f"gptfast._C has no {backend} kernel for {op} {fix}".rstrip()
        extension = importlib.import_module("gptfast.ops.extension")
        return getattr(extension, f"unsupported_{backend}")(op, **features)
    unsupported = getattr(module, "unsupported", None)
    return unsupported(op, **features) if unsupported else None


def available(device: torch.device | str | None = None, op: str | None = None) -> list[str]:
    """Backends that can run here: for `op` (default: at least one op) on `device` (default: cpu, plus cuda)."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")] + (
        [torch.device("cuda")] if torch.cuda.is_available() else []
    )
    ops = [op] if op else OPS
    return [
        name for name in NAMES
        if any(why_not(name, o, d) is None for o in ops for d in devices)
    ]


def requested(backend: str | None = None) -> str | None:
    """The backend asked for by argument, use() or GPTFAST_BACKEND, in that order; None for automatic."""
    name = backend or _requested.get() or os.environ.get("GPTFAST_BACKEND") or None
    return _check_name(name) if name else None


def select(op: str, device: torch.device, backend: str | None = None, **features) -> str:
    """The backend that runs this call; raises BackendUnavailable when a named one cannot."""
    name = requested(backend)
    if name is not None:
        reason = why_not(name, op, device, **features)
        if reason:
            raise BackendUnavailable(f"gptfast backend {name!r} cannot run {op}: {reason}")
        return name
    for name in _PREFERENCE.get(device.type, ("reference",)):
        if why_not(name, op, device, **features) is None:
            return name
    return "reference"
