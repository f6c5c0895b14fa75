"""gptfast: fused Triton and C++/CUDA kernels for GPT training in PyTorch."""
from . import backends, ops

__version__ = "0.1.0"
__all__ = ["backends", "ops", "nn", "GPT", "GPTConfig", "patch", "unpatch"]


def __getattr__(name):
    # The model and nn modules import lazily so `import gptfast` stays light for kernel-only users.
    if name in ("GPT", "GPTConfig"):
        from . import model

        return getattr(model, name)
    if name in ("patch", "unpatch"):
        from . import patch as patch_module

        return getattr(patch_module, name)
    if name == "nn":
        import importlib

        return importlib.import_module("gptfast.nn")
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")
