"""What the C++ extension's kernels refuse. Both backends are reached through torch.ops.gptfast.<op>_fwd/_bwd;
the dispatcher picks the CPU or CUDA kernel by the tensors' device."""


def unsupported_cpu(op: str, **features) -> str | None:
    """None when the "cpu" backend's kernel for `op` handles these features, else the reason."""
    return None


def unsupported_cuda(op: str, **features) -> str | None:
    """None when the "cuda" backend's kernel for `op` handles these features, else the reason."""
    return None
