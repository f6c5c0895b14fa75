"""What the C++ extension's kernels refuse. Both backends are reached through torch.ops.gptfast.<op>_fwd/_bwd;
the dispatcher picks the CPU or CUDA kernel by the tensors' device."""
import functools
import platform

import torch

from .. import backends

_CPU_ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unsupported_cpu(op: str, **features) -> str | None:
    """None when the "cpu" backend's kernel for `op` handles these features, else the reason.

    The kernels are compiled for AVX2 + FMA on x86-64 (see setup.py), so a CPU without AVX2 is refused here
    rather than meeting an illegal instruction. Attention has no dropout and no fp64 path.
    """
    if _lacks_avx2():
        return "gptfast._C's cpu kernels are compiled for AVX2 and this CPU has no AVX2; use backend='reference'"
    if op == "attention":
        if features.get("dropout"):
            return "the cpu attention kernel does not implement dropout (dropout_p > 0); use backend='reference'"
        dtype = features.get("dtype")
        if dtype is not None and dtype not in _CPU_ATTENTION_DTYPES:
            return (
                f"the cpu attention kernel takes float32, float16 or bfloat16, got {str(dtype).replace('torch.', '')};"
                " use backend='reference'"
            )
    return None


@functools.cache
def _lacks_avx2() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and not torch.cpu._is_avx2_supported()


_CUDA_ATTENTION_HEAD_DIMS = (32, 64, 96, 128)
_FIX = "use backend='triton' or 'reference'"


def unsupported_cuda(op: str, **features) -> str | None:
    """None when the "cuda" backend's kernel for `op` handles these features, else the reason.

    softmax, cross_entropy and linear_cross_entropy take every option on fp32/fp16/bf16, and the two
    cross-entropies fp64 too (the public ops pass no dtype here; the softmax kernel refuses float64 with a
    clear error). attention runs fp16/bf16 with head dim 32, 64, 96 or 128, value dim equal to the head dim,
    no attn_mask and no dropout, and not in deterministic mode when gradients are needed.
    """
    if op != "attention":
        return None
    if features.get("grad") and backends.is_deterministic():
        return (
            "the cuda attention backward adds dQ with fp32 atomics, so its gradients are not bitwise"
            " reproducible, and deterministic mode is on; use backend='triton' (deterministic) or 'reference'"
        )
    if features.get("attn_mask"):
        return f"the cuda attention kernel takes no attn_mask (only is_causal); {_FIX}"
    if features.get("dropout"):
        return f"the cuda attention kernel has no dropout; {_FIX}"
    dtype = features.get("dtype")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda attention kernel takes float16 or bfloat16, got {str(dtype).replace('torch.', '')}; {_FIX}"
    head_dim, value_dim = features.get("head_dim"), features.get("value_dim")
    if head_dim is not None and head_dim not in _CUDA_ATTENTION_HEAD_DIMS:
        return f"the cuda attention kernel takes head dim 32, 64, 96 or 128, got {head_dim}; {_FIX}"
    if value_dim is not None and head_dim is not None and value_dim != head_dim:
        return f"the cuda attention kernel needs value dim == head dim, got {value_dim} and {head_dim}; {_FIX}"
    return None
