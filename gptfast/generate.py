"""Sampling text from a trained checkpoint (byte-level tokens, see gptfast.data)."""

import torch

from . import checkpoint, data
from .model import GPT, GPTConfig


def load_model(path: str, device: torch.device | str = "cpu", backend: str | None = None) -> GPT:
    """The GPT of a `gptfast train` checkpoint, in eval mode on `device`; CheckpointError if unusable."""
    return model_from_state(checkpoint.load(path), path, device, backend)


def model_from_state(
    state: dict, path: str, device: torch.device | str = "cpu", backend: str | None = None
) -> GPT:
    """load_model for a checkpoint already read from `path` (named in the error if it holds no text GPT)."""
    if state.get("task", "text") != "text" or "config" not in state or "model" not in state:
        raise checkpoint.CheckpointError(f"{path} does not hold a text GPT (task {state.get('task')!r})")
    model = GPT(GPTConfig(**{**state["config"], "backend": backend}))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def generate_text(
    model: GPT,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The prompt followed by max_new_tokens sampled bytes, decoded as UTF-8.

    An empty prompt starts from a newline; a prompt longer than block_size conditions on its last
    block_size bytes.
    """
    ids = data.encode(prompt or "\n")[-model.config.block_size :]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)  # (1, T + max_new_tokens)
    return prompt + data.decode(out[0, len(ids) :].tolist())
