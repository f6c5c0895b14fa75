"""Causal self-attention, (B, H, L, D) layout: compute-bound, TFLOP/s of the matmul ceiling.

Peers: every gptfast backend, torch SDPA under each of its backends (sdpa_kernel), torch.compile of the
reference (which materialises the scores), and flash-attn when importable.
"""

import math

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import reference
from .core import Inputs, Peer, Skip
from .suite import OpSuite, compiled, gptfast_peers, optional_module, require_memory

# (B, H, L, D), causal. The GPU's full sizes are issue 3's target: bf16, D 128, B x L = 16k tokens.
SHAPES = {
    ("tiny", "cpu"): [(1, 2, 64, 32)],
    ("quick", "cpu"): [(2, 4, 256, 64), (1, 4, 1024, 64)],
    ("full", "cpu"): [(4, 8, 512, 64), (1, 8, 2048, 64), (1, 8, 4096, 64)],
    ("tiny", "cuda"): [(2, 4, 512, 64)],
    ("quick", "cuda"): [(8, 16, 2048, 128), (2, 16, 8192, 128)],
    ("full", "cuda"): [(16, 16, 1024, 128), (4, 16, 4096, 128), (1, 16, 16384, 128)],
}
CHECK_SCORES = 1 << 27  # the check's reference holds at most this many fp32 scores per tensor
SDPA_BACKENDS = {
    "cpu": ("MATH", "FLASH_ATTENTION"),
    "cuda": ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"),
}
SDPA_NAMES = {
    "MATH": "math",
    "EFFICIENT_ATTENTION": "efficient",
    "FLASH_ATTENTION": "flash",
    "CUDNN_ATTENTION": "cudnn",
}


class AttentionSuite(OpSuite):
    name = "attention"
    metric = "TFLOP/s"
    ceiling = "matmul"
    baselines = (
        "torch eager is the fastest torch SDPA backend at each shape (each is also a row); "
        "torch.compile compiles the reference attention, which materialises the scores"
    )
    formulas = {
        "fwd": "4 * B * H * L * S * D FLOPs (QK^T and PV), halved for causal",
        "fwd+bwd": "3.5 x the forward (the backward's five matmuls are 2.5 x the forward's two)",
    }
    eager_prefix = "torch sdpa"

    def shapes(self, device, mode):
        return [
            {"B": b, "H": h, "L": n, "D": d, "causal": True} for b, h, n, d in SHAPES[(mode, device.type)]
        ]

    def label(self, shape):
        return f"B={shape['B']} H={shape['H']} L={shape['L']} D={shape['D']}" + (
            " causal" if shape["causal"] else ""
        )

    def size(self, shape):
        return shape["L"]

    def work(self, shape, dtype, phase):
        return attention_flops(
            shape["B"], shape["H"], shape["L"], shape["L"], shape["D"], shape["causal"], phase
        )

    def inputs(self, shape, dtype, device):
        dims = (shape["B"], shape["H"], shape["L"], shape["D"])
        q, k, v = (torch.randn(dims, device=device, dtype=dtype) for _ in range(3))
        return Inputs((q, k, v), diff=(0, 1, 2), grad_out=torch.randn(dims, device=device, dtype=dtype))

    def peers(self, device, dtype):
        peers, notes = gptfast_peers(
            "attention",
            device,
            lambda b: _materialising(
                b == "reference",
                (
                    lambda shape, inp: (
                        lambda q, k, v: ops.scaled_dot_product_attention(
                            q, k, v, is_causal=shape["causal"], backend=b
                        )
                    )
                ),
            ),
        )
        sdpa = _sdpa_backends()
        for name in SDPA_BACKENDS[device.type]:
            if name in sdpa:
                peers.append(
                    Peer(
                        f"torch sdpa[{SDPA_NAMES[name]}]",
                        "eager",
                        _materialising(name == "MATH", _sdpa_peer(sdpa[name])),
                    )
                )
        peers.append(Peer("torch.compile(reference)", "compile", _materialising(True, _compiled_reference())))
        flash, why = optional_module("flash_attn")
        if flash is not None and device.type == "cuda":
            to_bthd = lambda t: t.transpose(1, 2).contiguous()
            peers.append(
                Peer(
                    "flash-attn",
                    "external",
                    lambda shape, inp: lambda q, k, v: flash.flash_attn_func(q, k, v, causal=shape["causal"]),
                    prepare=to_bthd,
                    restore=lambda t: t.transpose(1, 2),
                )
            )
        else:
            notes.append(f"flash-attn not run: {why or 'flash-attn runs on CUDA only'}")
        return peers, notes

    def reference(self, q, k, v):
        return ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="reference")

    def torch_same_dtype(self, q, k, v):
        # torch's math SDPA: the plain same-dtype attention FlashAttention's tests measure against. A fused
        # backend as the yardstick would fail torch's own math path (seen on CPU: flash's fp32 dV is tighter).
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def subset(self, shape, inputs):
        L, H = shape["L"], shape["H"]
        heads = max(1, min(H, CHECK_SCORES // (L * L)))
        if shape["B"] * H * L * L <= CHECK_SCORES:
            return inputs, lambda name, t: t
        # Batches and heads are independent (no GQA here): the first batch's first heads are checked.
        cut = lambda t: t[:1, :heads]
        sub = Inputs(tuple(cut(a) for a in inputs.args), inputs.diff, cut(inputs.grad_out))
        return sub, lambda name, t: cut(t)


def attention_flops(B, H, L, S, D, causal, phase) -> float:
    fwd = 4 * B * H * L * S * D * (0.5 if causal else 1.0)
    return fwd if phase == "fwd" else 3.5 * fwd


def _sdpa_backends() -> dict:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return {}
    return {n: getattr(SDPBackend, n) for n in SDPA_NAMES if hasattr(SDPBackend, n)}


def _sdpa_peer(backend):
    def make(shape, inp):
        from torch.nn.attention import sdpa_kernel

        def fn(q, k, v):
            with sdpa_kernel(backend):
                try:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=shape["causal"])
                except RuntimeError as e:
                    if "No available kernel" in str(e):
                        raise Skip(f"torch has no {backend.name} SDPA kernel for this case") from None
                    raise

        return fn

    return make


def _reference_attention(q, k, v, causal: bool):
    scale = 1.0 / math.sqrt(q.shape[-1])
    return reference.attention_fwd(q, k, v, None, 0.0, causal, scale, _NO_RNG)[0]


_NO_RNG = torch.zeros(2, dtype=torch.int64)


def _compiled_reference():
    def make(shape, inp):
        fn = compiled(_reference_attention)
        return lambda q, k, v: fn(q, k, v, shape["causal"])

    return make


def _materialising(materialises: bool, make):
    """Peers that hold the (B, H, L, S) scores in fp32 (several copies in backward) skip shapes too big."""
    if not materialises:
        return make

    def guarded(shape, inp):
        device = inp.args[0].device
        require_memory(
            6 * shape["B"] * shape["H"] * shape["L"] ** 2 * 4, device, "the materialised fp32 scores"
        )
        return make(shape, inp)

    return guarded


SUITE = AttentionSuite()
