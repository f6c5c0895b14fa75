"""The model suite: one GPT training step (forward, backward, AdamW step), in tokens/s and peak memory.

Peers: gptfast.GPT on every backend that runs its ops here, the same GPT with the fused loss
(ops.linear_cross_entropy), and the baselines: the same architecture in torch's own ops (torch_gpt.TorchGPT),
eager and under torch.compile. All start from the same weights, in the benchmark dtype (parameters too), and
the check compares each one's first loss and every parameter gradient with the GPT on the reference backend in
higher precision (fp64 for fp32, fp32 for bf16/fp16).
"""

import copy
import importlib

import torch

from .. import backends
from .core import Inputs, Peer, Skip
from .suite import OpSuite, backends_for, compiled
from .torch_gpt import TorchGPT

# (preset, batch, seq_len, overrides). GPT-2 124M at T=1024 on GPUs, the tiny preset on CPUs.
SHAPES = {
    ("tiny", "cpu"): [("tiny", 2, 32, {"n_layer": 1})],
    ("quick", "cpu"): [("tiny", 8, 128, {})],
    ("full", "cpu"): [("tiny", 16, 128, {})],
    ("tiny", "cuda"): [("tiny", 8, 128, {})],
    ("quick", "cuda"): [("gpt2", 4, 1024, {})],
    ("full", "cuda"): [("gpt2", 8, 1024, {})],
}
MODEL_OPS = ("attention", "cross_entropy")


def _model_module():
    return importlib.import_module("gptfast.model")


class ModelSuite(OpSuite):
    name = "model"
    metric = "tokens/s"
    ceiling = "matmul"
    measure_memory = True
    phases = ("step",)
    baselines = (
        "torch eager is the same GPT in torch's own ops (gptfast/bench/torch_gpt.py: F.scaled_dot_product_"
        "attention, F.cross_entropy) with the same weights; torch.compile compiles it"
    )
    formulas = {
        "step": "tokens/s = B * T / median step time (forward, backward, AdamW step, zero_grad). "
        "Model FLOPs per step = (6 * N + 12 * n_layer * n_embd * T) * B * T (nanoGPT's estimate, N = "
        "parameters without position embeddings); the % column is that rate over the matmul ceiling (MFU). "
        "Peak memory = parameters + AdamW state + the step's peak allocation above them.",
    }
    eager_prefix = "torch eager"
    compile_prefix = "torch.compile"

    def __init__(self):
        self._masters: dict[str, dict] = {}
        self._dtype = torch.float32

    def unavailable(self):
        try:
            _model_module()
        except ImportError as e:
            return f"gptfast.model is not in this install ({e})"
        return None

    def shapes(self, device, mode):
        return [{"preset": p, "B": b, "T": t, "overrides": o} for p, b, t, o in SHAPES[(mode, device.type)]]

    def label(self, shape):
        extra = "".join(f" {k}={v}" for k, v in shape["overrides"].items())
        return f"{shape['preset']}{extra} B={shape['B']} T={shape['T']}"

    def size(self, shape):
        return shape["B"] * shape["T"]

    def config(self, shape, **fields):
        GPTConfig = _model_module().GPTConfig
        return GPTConfig.preset(shape["preset"], dropout=0.0, **{**shape["overrides"], **fields})

    def work(self, shape, dtype, phase):
        return shape["B"] * shape["T"]

    def rate(self, work, median_ms):
        return work / (median_ms * 1e-3)

    def flops_per_step(self, shape) -> float:
        return model_flops(self.config(shape), shape["B"], shape["T"])

    def ceiling_rate(self, row):
        return row.extra.get("TFLOP/s")

    def finish_row(self, row, runnable):
        row.extra["TFLOP/s"] = self.flops_per_step(row.shape) / (row.median_ms * 1e-3) / 1e12
        row.extra["static_bytes"] = runnable.static_bytes()
        if row.peak_bytes is not None:
            row.peak_bytes += row.extra["static_bytes"]

    def inputs(self, shape, dtype, device):
        V = self.config(shape).vocab_size
        idx = torch.randint(0, V, (shape["B"], shape["T"]), device=device)
        targets = torch.randint(0, V, (shape["B"], shape["T"]), device=device)
        return Inputs((idx, targets))

    def peers(self, device, dtype):
        peers, notes = [], []
        for name in backends_for(device):
            reason = next(filter(None, (backends.why_not(name, op, device) for op in MODEL_OPS)), None)
            if name == "triton" and device.type == "cpu":
                reason = (
                    "triton runs CPU tensors only in its interpreter, a correctness tool, so it is not timed"
                )
            if reason:
                notes.append(f"gptfast:{name} not run: {reason}")
            else:
                peers.append(Peer(f"gptfast:{name}", "gptfast", self._gpt(backend=name)))
        peers.append(Peer("gptfast:auto fused_loss", "gptfast", self._gpt(fused_loss=True)))
        peers.append(Peer("torch eager", "eager", lambda shape, inp: TorchGPT(self.config(shape))))
        peers.append(Peer("torch.compile", "compile", lambda shape, inp: TorchGPT(self.config(shape))))
        if device.type == "cuda":
            # What a torch.compile user runs with gptfast: the same GPT compiled, gptfast's ops traced through
            # as custom ops and inductor fusing the rest. Last, so a short time budget drops it first. (Not on
            # CPUs, where a second inductor compile would double the quick report's compile time.)
            name = "gptfast:auto fused_loss + torch.compile"
            peers.append(Peer(name, "gptfast", self._gpt(fused_loss=True), compiled=True))
        else:
            notes.append(
                "gptfast:auto fused_loss + torch.compile not run: CUDA only (a second inductor compile here)"
            )
        return peers, notes

    def _gpt(self, **fields):
        return lambda shape, inp: _model_module().GPT(self.config(shape, **fields))

    # ------------------------------------------------------------------------------------------ weights
    def master(self, shape, device) -> dict:
        """The weights every peer starts from (fp32, on device), and whether TorchGPT can take them."""
        key = self.label(shape)
        if key not in self._masters:
            self._masters.clear()
            torch.manual_seed(0)
            gpt = _model_module().GPT(self.config(shape, backend="reference")).to(device)
            state = {k: v.detach().clone() for k, v in gpt.state_dict().items()}
            idx, targets = (
                torch.randint(0, gpt.config.vocab_size, (1, min(16, shape["T"])), device=device)
                for _ in range(2)
            )
            gelu, why = _matching_baseline(self.config(shape), state, gpt, idx, targets)
            self._masters[key] = {
                "state": state,
                "gelu": gelu,
                "why": why,
                "names": [n for n, _ in gpt.named_parameters()],
            }
        return self._masters[key]

    def expected(self, shape, inputs):
        idx, targets = inputs.args
        device, dtype = idx.device, self._dtype
        m = self.master(shape, device)
        ref_dtype = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
        ref = _loss_and_grads(
            self._load(self._gpt(backend="reference")(shape, inputs), m, device, ref_dtype),
            idx,
            targets,
            m["names"],
        )
        if m["gelu"]:
            base = self._load(TorchGPT(self.config(shape), m["gelu"]), m, device, dtype)
        else:
            base = self._load(self._gpt(backend="reference")(shape, inputs), m, device, dtype)
        same = _loss_and_grads(base, idx, targets, m["names"])
        both = list(zip(["loss", *m["names"]], ref, same))
        return (lambda phase: both), (lambda name, t: t)

    def _load(self, model, m, device, dtype):
        model.load_state_dict(m["state"], strict=isinstance(model, _model_module().GPT))
        return model.to(device=device, dtype=dtype).train()

    def bind(self, peer, shape, inputs, settings):
        m = self.master(shape, settings.device)
        model = peer.make(shape, inputs)
        unchecked = ""
        if isinstance(model, TorchGPT):
            if m["gelu"]:
                model = TorchGPT(self.config(shape), m["gelu"])
                model.load_state_dict(m["state"])
            else:
                unchecked = f"TorchGPT cannot take gptfast.GPT's weights: {m['why']}"
        else:
            model.load_state_dict(m["state"])
        model = model.to(device=settings.device, dtype=settings.dtype).train()
        forward = compiled(model) if peer.kind == "compile" or peer.compiled else model
        return StepRunnable(model, forward, inputs, m["names"], unchecked)

    def setup(self, settings):
        self._dtype = settings.dtype


class StepRunnable:
    """A model bound to a batch: run() gives the first loss and gradients, timed() the training step."""

    def __init__(self, model, forward, inputs: Inputs, names: list[str], unchecked: str):
        self.model, self.forward, self.names, self.unchecked = model, forward, names, unchecked
        self.idx, self.targets = inputs.args
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run(self, phase):
        if self.unchecked:
            self.forward(self.idx, self.targets)  # still compiles / warms up before timing
            return None
        return _split(_loss_and_grads(self.forward, self.idx, self.targets, self.names))

    def timed(self, phase):
        def step():
            _, loss = self.forward(self.idx, self.targets)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        return step

    def static_bytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        state = sum(
            t.numel() * t.element_size()
            for s in self.opt.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        return params + state


def model_flops(config, batch: int, seq_len: int) -> float:
    """(6 * N + 12 * n_layer * n_embd * T) * B * T: nanoGPT's FLOPs per training step, N without positions."""
    with torch.device("meta"):
        n = sum(p.numel() for p in TorchGPT(config).parameters())
    if getattr(config, "pos_encoding", "learned") == "learned":
        n -= config.block_size * config.n_embd
    return (6 * n + 12 * config.n_layer * config.n_embd * seq_len) * batch * seq_len


def _split(values):
    return values[0], values[1:]


def _loss_and_grads(model, idx, targets, names) -> list[torch.Tensor]:
    """[loss, d loss / d parameter for each name in names]: one forward and backward, current weights."""
    module = getattr(model, "_orig_mod", model)
    params = dict(module.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise Skip(f"the model has no parameters named {missing[:3]}")
    _, loss = model(idx, targets)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return [loss.detach(), *grads]


def _matching_baseline(config, state, gpt, idx, targets) -> tuple[str | None, str]:
    """The GELU with which TorchGPT, given gptfast.GPT's weights, gives GPT's loss (fp64), or (None, why)."""
    want = copy.deepcopy(gpt).double()(idx, targets)[1].item()
    for gelu in ("tanh", "none"):
        base = TorchGPT(config, gelu)
        try:
            base.load_state_dict(state)
        except RuntimeError as e:
            return None, f"parameter names or shapes differ ({str(e).splitlines()[0]})"
        got = base.to(device=idx.device, dtype=torch.float64)(idx, targets)[1].item()
        if abs(got - want) <= 1e-9 * max(1.0, abs(want)):
            return gelu, ""
    return None, f"same weights, different loss ({got!r} vs gptfast.GPT's {want!r})"


SUITE = ModelSuite()
