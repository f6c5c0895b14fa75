"""Cross-entropy (mean over M rows of V-class logits): memory-bound, GB/s of copy bandwidth; peak memory."""

import torch
import torch.nn.functional as F

from .. import ops
from .core import Inputs, Peer
from .suite import OpSuite, compiled, element_size, gptfast_peers, optional_module

# (M rows, V classes). The GPU's full sizes end at issue 3's target, 16k x 128k in bf16.
SHAPES = {
    ("tiny", "cpu"): [(64, 512)],
    ("quick", "cpu"): [(256, 8192), (1024, 16384)],
    ("full", "cpu"): [(256, 8192), (1024, 32768), (4096, 65536)],
    ("tiny", "cuda"): [(256, 4096)],
    ("quick", "cuda"): [(4096, 32768), (8192, 65536)],
    ("full", "cuda"): [(4096, 32768), (16384, 131072)],
}


class CrossEntropySuite(OpSuite):
    name = "cross_entropy"
    metric = "GB/s"
    ceiling = "copy"
    measure_memory = True
    baselines = "torch eager is F.cross_entropy; torch.compile compiles the reference's math"
    formulas = {
        "fwd": "M * V * elt bytes (one read of the logits; the M targets and losses are negligible)",
        "fwd+bwd": "3 * M * V * elt bytes (forward reads the logits; backward reads again, writes dlogits)",
    }

    def shapes(self, device, mode):
        return [{"M": m, "V": v} for m, v in SHAPES[(mode, device.type)]]

    def label(self, shape):
        return f"{shape['M']} x {shape['V']}"

    def size(self, shape):
        return shape["M"] * shape["V"]

    def work(self, shape, dtype, phase):
        passes = 1 if phase == "fwd" else 3
        return passes * shape["M"] * shape["V"] * element_size(dtype)

    def inputs(self, shape, dtype, device):
        logits = torch.randn(shape["M"], shape["V"], device=device, dtype=dtype)
        target = torch.randint(0, shape["V"], (shape["M"],), device=device)
        return Inputs((logits, target), diff=(0,))

    def peers(self, device, dtype):
        peers, notes = gptfast_peers(
            "cross_entropy",
            device,
            lambda b: lambda shape, inp: lambda x, t: ops.cross_entropy(x, t, backend=b),
        )
        peers.append(Peer("torch", "eager", lambda shape, inp: F.cross_entropy))
        peers.append(
            Peer("torch.compile(reference)", "compile", lambda shape, inp: compiled(_reference_mean))
        )
        liger, why = optional_module("liger_kernel.transformers.cross_entropy")
        if liger is not None and device.type == "cuda":
            peers.append(Peer("liger", "external", lambda shape, inp: liger.LigerCrossEntropyLoss()))
        else:
            notes.append(f"liger not run: {why or 'Liger-Kernel runs on CUDA only'}")
        return peers, notes

    def reference(self, x, t):
        return ops.cross_entropy(x, t, backend="reference")

    def torch_same_dtype(self, x, t):
        return F.cross_entropy(x, t)


def _reference_mean(x, t):
    """The reference's math (gptfast/ops/reference.py) for the default options, without its CPU-only target
    check: that check is a host sync, which would split the compiled graph in two."""
    xf = x.float()
    loss = torch.logsumexp(xf, dim=-1) - xf.gather(1, t[:, None]).squeeze(1)
    return loss.mean().to(x.dtype)


SUITE = CrossEntropySuite()
