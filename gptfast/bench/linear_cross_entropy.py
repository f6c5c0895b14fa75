"""Linear cross-entropy: cross_entropy(hidden @ weight.T, target) over M tokens, hidden H, vocab V.

Matmul-bound, so TFLOP/s of the matmul ceiling; the point of fusing is memory, so peak memory is reported
and plotted against tokens. The torch peers are the unfused composition (the full M x V logits exist),
eager and compiled, which is what a user runs today and what issue 3's memory target compares against.
"""

import math

import torch
import torch.nn.functional as F

from .. import ops
from .core import Inputs, Peer
from .suite import OpSuite, compiled, gptfast_peers, optional_module, require_memory

# (M tokens, H, V). The GPU's full sizes end at issue 3's target: H 4096, V 128256 (Llama 3), 8k tokens.
SHAPES = {
    ("tiny", "cpu"): [(32, 32, 256), (64, 32, 256)],
    ("quick", "cpu"): [(256, 128, 4096), (1024, 128, 4096), (4096, 128, 4096)],
    ("full", "cpu"): [(512, 256, 8192), (2048, 256, 8192), (8192, 256, 8192)],
    ("tiny", "cuda"): [(256, 256, 4096), (1024, 256, 4096)],
    ("quick", "cuda"): [(1024, 4096, 128256), (4096, 4096, 128256)],
    ("full", "cuda"): [(2048, 4096, 128256), (8192, 4096, 128256)],
}


class LinearCrossEntropySuite(OpSuite):
    name = "linear_cross_entropy"
    metric = "TFLOP/s"
    ceiling = "matmul"
    measure_memory = True
    baselines = (
        "torch eager is F.cross_entropy(F.linear(hidden, weight), target), which holds the M x V logits; "
        "torch.compile compiles that"
    )
    formulas = {
        "fwd": "2 * M * H * V FLOPs (the logits matmul; softmax work is negligible beside it)",
        "fwd+bwd": "6 * M * H * V FLOPs (logits, dhidden = dlogits @ W, dW = dlogits^T @ hidden); "
        "kernels that recompute the logits in backward do 8 * M * H * V but are credited 6",
    }
    eager_prefix = "torch (unfused)"
    compile_prefix = "torch.compile(unfused)"

    def shapes(self, device, mode):
        return [{"M": m, "H": h, "V": v} for m, h, v in SHAPES[(mode, device.type)]]

    def label(self, shape):
        return f"T={shape['M']} H={shape['H']} V={shape['V']}"

    def size(self, shape):
        return shape["M"]

    def work(self, shape, dtype, phase):
        passes = 2 if phase == "fwd" else 6
        return passes * shape["M"] * shape["H"] * shape["V"]

    def inputs(self, shape, dtype, device):
        M, H, V = shape["M"], shape["H"], shape["V"]
        hidden = torch.randn(M, H, device=device, dtype=dtype)
        # Scaled so that the logits are about unit normal, as with a trained LM head.
        weight = (torch.randn(V, H, device=device) / math.sqrt(H)).to(dtype)
        target = torch.randint(0, V, (M,), device=device)
        return Inputs((hidden, weight, target), diff=(0, 1))

    def peers(self, device, dtype):
        peers, notes = gptfast_peers(
            "linear_cross_entropy",
            device,
            lambda b: lambda shape, inp: lambda h, w, t: ops.linear_cross_entropy(h, w, t, backend=b),
        )
        peers.append(Peer("torch (unfused)", "eager", _unfused_peer(device, lambda: _unfused)))
        peers.append(
            Peer("torch.compile(unfused)", "compile", _unfused_peer(device, lambda: compiled(_unfused)))
        )
        liger, why = optional_module("liger_kernel.transformers.fused_linear_cross_entropy")
        if liger is not None and device.type == "cuda":

            def make(shape, inp):
                loss = liger.LigerFusedLinearCrossEntropyLoss()
                return lambda h, w, t: loss(w, h, t)

            peers.append(Peer("liger", "external", make))
        else:
            notes.append(f"liger not run: {why or 'Liger-Kernel runs on CUDA only'}")
        return peers, notes

    def reference(self, h, w, t):
        return ops.linear_cross_entropy(h, w, t, backend="reference")

    def torch_same_dtype(self, h, w, t):
        return _unfused(h, w, t)


def _unfused(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


def _unfused_peer(device, build):
    def make(shape, inp):
        # logits, their gradient and softmax's fp32 temporaries: about 4 x M x V x 4 bytes at once.
        require_memory(4 * shape["M"] * shape["V"] * 4, device, "the unfused M x V logits")
        return build()

    return make


SUITE = LinearCrossEntropySuite()
