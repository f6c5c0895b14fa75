"""What the C++ extension's kernels (backends "cpu" and "cuda") refuse; they are reached via torch.ops.gptfast."""


def unsupported(op: str, **features) -> str | None:
    return None
