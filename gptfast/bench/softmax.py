"""Softmax over the last dim of an (M, N) matrix: a memory-bound op, reported in GB/s of copy bandwidth."""

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import reference
from .core import Inputs, Peer
from .suite import OpSuite, compiled, element_size, gptfast_peers, optional_module

# (M, N) per device and size mode. The GPU's full sizes end at issue 3's target, 32k x 32k in bf16.
SHAPES = {
    ("tiny", "cpu"): [(64, 256)],
    ("quick", "cpu"): [(256, 1024), (1024, 4096), (2048, 8192)],
    ("full", "cpu"): [(256, 1024), (1024, 4096), (4096, 16384), (8192, 32768)],
    ("tiny", "cuda"): [(256, 1024)],
    ("quick", "cuda"): [(4096, 4096), (8192, 16384)],
    ("full", "cuda"): [(8192, 8192), (32768, 32768)],
}
CHECK_ELEMENTS = 1 << 26  # rows checked against the fp32/fp64 reference: at most this many elements


class SoftmaxSuite(OpSuite):
    name = "softmax"
    metric = "GB/s"
    ceiling = "copy"
    baselines = (
        "torch eager is F.softmax; torch.compile compiles the reference softmax (gptfast/ops/reference.py)"
    )
    formulas = {
        "fwd": "2 * M * N * elt bytes (read x, write y)",
        "fwd+bwd": "5 * M * N * elt bytes (forward 2; backward reads y and dy, writes dx: 3)",
    }

    def shapes(self, device, mode):
        return [{"M": m, "N": n} for m, n in SHAPES[(mode, device.type)]]

    def label(self, shape):
        return f"{shape['M']} x {shape['N']}"

    def size(self, shape):
        return shape["M"] * shape["N"]

    def work(self, shape, dtype, phase):
        passes = 2 if phase == "fwd" else 5
        return passes * shape["M"] * shape["N"] * element_size(dtype)

    def inputs(self, shape, dtype, device):
        x = torch.randn(shape["M"], shape["N"], device=device, dtype=dtype)
        return Inputs((x,), diff=(0,), grad_out=torch.randn_like(x))

    def peers(self, device, dtype):
        peers, notes = gptfast_peers(
            "softmax", device, lambda b: lambda shape, inp: lambda x: ops.softmax(x, -1, backend=b)
        )
        peers.append(Peer("torch", "eager", lambda shape, inp: lambda x: F.softmax(x, dim=-1)))
        peers.append(
            Peer("torch.compile(reference)", "compile", lambda shape, inp: compiled(_reference_softmax))
        )
        liger, why = optional_module("liger_kernel.ops.softmax")
        fn = getattr(liger, "LigerSoftmaxFunction", None)
        if fn is not None and device.type == "cuda":
            peers.append(Peer("liger", "external", lambda shape, inp: fn.apply))
        else:
            notes.append(
                f"liger not run: {why or 'needs CUDA and liger_kernel.ops.softmax.LigerSoftmaxFunction'}"
            )
        return peers, notes

    def reference(self, x):
        return ops.softmax(x, -1, backend="reference")

    def torch_same_dtype(self, x):
        return F.softmax(x, dim=-1)

    def subset(self, shape, inputs):
        rows = max(1, min(shape["M"], CHECK_ELEMENTS // shape["N"]))
        if rows == shape["M"]:
            return inputs, lambda name, t: t
        (x,) = inputs.args
        return Inputs((x[:rows],), (0,), inputs.grad_out[:rows]), lambda name, t: t[:rows]


def _reference_softmax(x):
    return reference.softmax_fwd(x, 1.0, 0)


SUITE = SoftmaxSuite()
