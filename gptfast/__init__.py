"""gptfast: fused Triton and C++/CUDA kernels for GPT training in PyTorch."""
from . import backends, ops

# Bound here, not lazily: importing the submodule gptfast.patch sets the package attribute `patch` to the
# module, and this import then rebinds it to the function, so gptfast.patch(model) is always the function.
from .patch import patch, unpatch

__version__ = "0.1.0"
__all__ = ["backends", "ops", "nn", "GPT", "GPTConfig", "patch", "unpatch"]


def __getattr__(name):
    # The model and nn modules import lazily so `import gptfast` stays light for kernel-only users.
    if name in ("GPT", "GPTConfig"):
        from . import model

        return getattr(model, name)
    if name == "nn":
        import importlib

        return importlib.import_module("gptfast.nn")
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")
