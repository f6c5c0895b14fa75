"""Autotuning for the Triton kernels (softmax, cross-entropy, attention): one triton.autotune per config list.

A launcher lists its candidates as dicts of constexprs plus num_warps (and num_stages), its default first.
On a GPU with autotuning on (backends.autotune_enabled) the autotuner times them all once per key and keeps
the fastest, so a candidate can only help; otherwise the default runs alone, untimed (the interpreter, and
the test suites that set GPTFAST_AUTOTUNE=0 to skip the compiles). Only kernels that write outputs distinct
from their inputs are tuned: the timing runs would compound an in-place update.
"""

import triton

from gptfast import backends

_TUNED: dict = {}


def enabled() -> bool:
    return backends.autotune_enabled() and not backends.interpreting()


_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def autotuned(kernel, configs: list[dict], key: list[str]):
    """`kernel` under triton.autotune over `configs` ({constexpr: value, ..., "num_warps": w, optionally
    "num_stages": s}), keyed by the kernel arguments named in `key` (and, as triton always does, the tensors'
    dtypes). One autotuner per kernel and config list, so its timings are kept across calls."""
    cache_key = (kernel.__name__, tuple(tuple(sorted(c.items())) for c in configs), tuple(key))
    if cache_key not in _TUNED:
        tuned = [
            triton.Config(
                {k: v for k, v in c.items() if k not in _LAUNCH_OPTIONS},
                **{k: v for k, v in c.items() if k in _LAUNCH_OPTIONS},
            )
            for c in configs
        ]
        _TUNED[cache_key] = triton.autotune(configs=tuned, key=key)(kernel)
    return _TUNED[cache_key]


def next_power_of_2(n):
    """triton.next_power_of_2 (0 for 0) on host ints without triton's constexpr-function wrapper, which costs
    3.6 us a call in triton 3.9, several times per launch. Symbolic sizes (torch.compile) go to triton's."""
    if isinstance(n, int):
        return 1 << (n - 1).bit_length() if n > 0 else 0
    return triton.next_power_of_2(n)


def unique(configs: list[dict]) -> list[dict]:
    """configs without repeats, in order (the default stays first)."""
    out = []
    for c in configs:
        if c not in out:
            out.append(c)
    return out
