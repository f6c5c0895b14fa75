"""Drop-in nn.Module wrappers around the gptfast ops, plus the GPT's attention layer and its KV cache.

Each module takes an optional `backend=` (see gptfast.backends); None selects per call as the ops do.
"""

import torch
from torch import Tensor
from torch import nn as _nn
from torch.nn import _reduction as _Reduction

from . import ops

__all__ = ["Softmax", "CrossEntropyLoss", "LinearCrossEntropyLoss", "CausalSelfAttention", "KVCache"]


def _legacy_softmax_dim(ndim: int) -> int:
    # torch.nn.Softmax(dim=None) picks this dim (torch.nn.functional._get_softmax_dim); kept for drop-in use.
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(_nn.Module):
    """torch.nn.Softmax(dim) on gptfast's softmax, with its scale= and causal= options.

    forward(x) -> softmax(scale * x) along dim, same shape and dtype as x (float32 for fp16/bf16 x under CUDA
    autocast, whose float32 list holds softmax, as torch's module gives). causal=True masks x[..., i, j] for
    j > i (the last two dims form the (L, S) score matrix) and needs dim=-1. dim=None follows torch's legacy
    rule (dim 0 for 0-, 1- and 3-d inputs, else dim 1), so the module can replace torch's one for one. One
    difference, design.md's: a row that is all -inf gives zeros where torch's gives NaN.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        scale: float | None = None,
        causal: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.dim, self.scale, self.causal, self.backend = dim, scale, causal, backend

    def forward(self, x: Tensor) -> Tensor:
        dim = _legacy_softmax_dim(x.dim()) if self.dim is None else self.dim
        if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda and torch.is_autocast_enabled("cuda"):
            x = x.float()  # what autocast does for torch's softmax; custom ops are outside its lists
        return ops.softmax(x, dim, scale=self.scale, causal=self.causal, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, causal={self.causal}, backend={self.backend!r}"


class CrossEntropyLoss(_nn.Module):
    """torch.nn.CrossEntropyLoss on gptfast's cross_entropy, plus PaLM's z_loss.

    The constructor takes torch's arguments in torch's order, and forward(input, target) torch's layout:
    input (C,), (N, C) or (N, C, d1, ..., dk) logits with target (), (N,) or (N, d1, ..., dk) int64/int32
    class indices. class_dim=-1 keeps the classes last instead, a GPT's (B, T, V) logits with (B, T)
    targets, with no transpose. Returns a scalar for 'mean'/'sum', target's shape for 'none'.
    inplace_backward=True writes the gradient over the logits in the backward instead of a new buffer
    (ops.cross_entropy documents the contract). Per-class
    `weight` and class-probability targets are not supported (a clear error); size_average and reduce are
    torch's deprecated spellings of reduction and are read as torch reads them.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        class_dim: int = 1,
        inplace_backward: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        if weight is not None:
            raise ValueError(
                "CrossEntropyLoss: weight (per-class weights) is not supported by gptfast's cross_entropy; "
                "expected None, got a tensor of shape " + str(tuple(getattr(weight, "shape", ())))
            )
        if class_dim not in (-1, 1):
            raise ValueError(
                "CrossEntropyLoss: class_dim must be 1 (torch's layout) or -1 (class-last), "
                f"got {class_dim!r}"
            )
        if size_average is not None or reduce is not None:
            reduction = _Reduction.legacy_get_string(size_average, reduce)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.class_dim, self.backend = z_loss, class_dim, backend
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if self.class_dim == 1 and input.dim() > 2 and isinstance(target, Tensor):
            expected = (input.shape[0], *input.shape[2:])
            if tuple(target.shape) != expected:
                raise ValueError(
                    f"CrossEntropyLoss: target must have shape {expected} for input {tuple(input.shape)} "
                    f"(classes in dim 1, as torch), got {tuple(target.shape)}; for class-last logits such as "
                    "a GPT's (B, T, V) pass class_dim=-1"
                )
            # torch's (N, C, d1, ..., dk): one class-last row per position; 'none' gets target's shape back.
            rows = input.movedim(1, -1).reshape(-1, input.shape[1])
            loss = self._loss(rows, target.reshape(-1))
            return loss.view(target.shape) if self.reduction == "none" else loss
        return self._loss(input, target)

    def _loss(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.cross_entropy(
            input,
            target,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, class_dim={self.class_dim}, "
            f"inplace_backward={self.inplace_backward}, backend={self.backend!r}"
        )


class LinearCrossEntropyLoss(_nn.Module):
    """cross_entropy(hidden @ weight.T + bias, target) without materialising the logits (an LM head + loss).

    forward(hidden, weight, target, bias=None): hidden (N, H) or (B, T, H), weight (V, H), bias (V,) or None,
    target (N,) or (B, T). The loss equals CrossEntropyLoss on the full logits; at most chunk_size rows of
    logits exist at once (None: gptfast's default, about N * H / V rows).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.chunk_size, self.backend = z_loss, chunk_size, backend

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return ops.linear_cross_entropy(
            hidden,
            weight,
            target,
            bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, chunk_size={self.chunk_size}, "
            f"backend={self.backend!r}"
        )


class KVCache:
    """One attention layer's keys and values for incremental decoding.

    Buffers k, v of shape (B, H, capacity, D) are allocated on the first append (with that call's dtype and
    device, so autocast is respected) and filled up to `length`. `length` is a Python int: decoding loops
    index with it, no device sync involved.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"KVCache: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.length = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores k, v (B, H, T, D) at [length, length + T); returns all keys/values (B, H, length + T, D)."""
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.capacity:
            raise ValueError(
                f"KVCache: {T} new positions after {self.length} exceed the capacity {self.capacity}"
            )
        if self.k is None:
            self.k = k.new_empty(B, H, self.capacity, D)
            self.v = v.new_empty(B, H, self.capacity, v.shape[-1])
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(_nn.Module):
    """GPT-2's causal multi-head self-attention on ops.scaled_dot_product_attention.

    forward(x, kv_cache=None): x (B, T, n_embd) -> (B, T, n_embd). A fused qkv projection (c_attn), causal
    SDPA with attention dropout in training, an output projection (c_proj) and residual dropout. With a
    KVCache the T new positions follow the cache's `length` earlier ones and attend to all of them.
    """

    def __init__(
        self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True, *, backend: str | None = None
    ):
        super().__init__()
        if n_head < 1 or n_embd % n_head:
            raise ValueError(
                f"CausalSelfAttention: n_embd ({n_embd}) must be a multiple of n_head ({n_head})"
            )
        self.n_embd, self.n_head, self.dropout, self.backend = n_embd, n_head, dropout, backend
        self.c_attn = _nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = _nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = _nn.Dropout(dropout)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # Strided views of the fused projection: the kernels read them in place, with no copy.
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.append(k, v)  # (B, H, past + T, D)
        mask, is_causal = None, past == 0
        if past and T > 1:
            # New queries sit at positions past..past+T-1: query i sees key j iff j <= past + i. SDPA's
            # is_causal is top-left aligned (right only when past == 0), so this case needs an explicit mask.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # With past > 0 and T == 1 the single query sees every cached key: no mask at all.
        y = ops.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            backend=self.backend,
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, n_head={self.n_head}, dropout={self.dropout}, backend={self.backend!r}"
