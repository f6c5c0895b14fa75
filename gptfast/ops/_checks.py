"""Argument checks shared by the public ops. Each error names the argument, what was expected and what was given."""
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def tensor(op: str, name: str, value, dtypes=FLOAT_DTYPES) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        expected = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({expected}), got {str(value.dtype).replace('torch.', '')}")
    return value


def same_device(op: str, **tensors: Tensor | None) -> torch.device:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {n} must be on the same device as {first_name} ({first.device}), got {t.device}")
    return first.device


def same_dtype(op: str, **tensors: Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for n, t in rest:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {n} must have the same dtype as {first_name} ({first.dtype}), got {t.dtype}")


def contiguous_matrix(op: str, name: str, value: Tensor) -> Tensor:
    """A contiguous 2-d tensor: what an op that writes `value` in place needs (a copy would not be written)."""
    if value.dim() != 2 or not value.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous (M, V), got shape {tuple(value.shape)} and strides "
            f"{value.stride()}"
        )
    return value


def number(op: str, name: str, value, low: float, high: float, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{op}: {name} must be in [{low}, {high}{bracket}, got {value}")
    return float(value)


def choice(op: str, name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def target_values(op: str, target: Tensor, num_classes: int, ignore_index: int) -> None:
    """IndexError naming the first target outside [0, num_classes) that is not ignore_index; CPU tensors only.

    On the CPU the check is one cheap pass and its host sync costs nothing. CUDA kernels keep their own
    contract (a NaN loss for such a row, see README.md), since checking there would sync on every call.
    """
    if target.device.type != "cpu" or not target.numel():
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(
            f"{op}: target values must be in [0, {num_classes}) or ignore_index={ignore_index}; got {value}"
        )
