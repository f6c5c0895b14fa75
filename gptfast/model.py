"""The GPT: a decoder-only transformer (GPT-2 layout, nanoGPT-style) whose hot spots run on gptfast's ops.

    tokens (B, T) -> token embedding + positions -> dropout -> n_layer x Block -> LayerNorm -> LM head (tied)
    Block: x + attn(ln_1(x)), then x + mlp(ln_2(x))      (pre-LayerNorm)

Attention goes through ops.scaled_dot_product_attention, the loss through ops.cross_entropy, or through
ops.linear_cross_entropy when config.fused_loss (the (B, T, V) logits are then never materialised).
config.backend is passed as backend= to every op call; None lets gptfast pick per call.

An optional prefix of embeddings (B, P, n_embd), e.g. image patches (Fuyu-style, see gptfast.multimodal), can
precede the tokens: it gets positions 0..P-1, the tokens P..P+T-1, attention is causal over the whole
sequence, and logits and loss cover the token positions only. That loss is the whole sequence's with the
prefix targets set to ignore_index, but the prefix's logits are never computed.
"""

import dataclasses
import math

import torch
from torch import Tensor
from torch import nn as _nn

from . import backends, ops
from .nn import CausalSelfAttention, KVCache

POS_ENCODINGS = ("sinusoidal", "learned")
IGNORE_INDEX = -100  # the targets the loss skips (padding, an image prefix): ops.cross_entropy's default
INIT_STD = 0.02  # GPT-2's init std for every weight matrix and embedding
# The sinusoidal encoding has entries of size ~1 and the token embeddings start at INIT_STD: added as is,
# position drowns the token 50 to 1 and training crawls (tiny preset: val loss 3.06 instead of 2.34 after
# 150 steps). Vaswani et al. balance the two by scaling the embeddings up by sqrt(d_model); with GPT-2's
# init and a tied head (whose logits must keep their scale) the fixed encoding is scaled down instead.
SINUSOIDAL_SCALE = INIT_STD


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # the longest sequence (prefix + tokens) the model accepts
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0  # embedding, attention and residual dropout
    bias: bool = True  # biases in the Linear and LayerNorm layers
    pos_encoding: str = "sinusoidal"
    fused_loss: bool = False  # loss via ops.linear_cross_entropy; forward then gives logits=None
    backend: str | None = None

    PRESETS = {
        # GPT-2 (124M) and GPT-2 medium (350M), learned positions as in the originals.
        "gpt2": dict(
            vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, pos_encoding="learned"
        ),
        "gpt2-medium": dict(
            vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024, pos_encoding="learned"
        ),
        # Byte-level, small enough to learn visibly in a couple of minutes on a 2-core CPU.
        "tiny": dict(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128),
    }

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(
                f"GPTConfig: pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}"
            )
        if self.backend is not None:
            backends._check_name(self.backend)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named configuration ("gpt2", "gpt2-medium", "tiny") with any field overridden."""
        if name not in cls.PRESETS:
            raise ValueError(
                f"GPTConfig.preset: unknown preset {name!r}; known presets: {', '.join(cls.PRESETS)}"
            )
        return cls(**{**cls.PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """(length, dim): PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(pos / 10000^(2i/dim))."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (L, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)  # (ceil(dim/2),): 2i
    inv_freq = 10000.0 ** (-two_i / dim)  # 1 / 10000^(2i/d)
    angles = pos * inv_freq  # (L, ceil(dim/2))
    pe = torch.empty(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : dim // 2])  # an odd dim has one sine column more than cosines
    return pe.float()


class MLP(_nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = _nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = _nn.GELU(approximate="tanh")  # GPT-2's "gelu_new", so GPT-2 weights keep their meaning
        self.c_proj = _nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = _nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(_nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = _nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(
            config.n_embd, config.n_head, config.dropout, config.bias, backend=config.backend
        )
        self.ln_2 = _nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(_nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = _nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.wpe = _nn.Embedding(config.block_size, config.n_embd)
        else:
            # The formula's values (see SINUSOIDAL_SCALE); fixed, so not saved in checkpoints but rebuilt.
            self.register_buffer(
                "pe", sinusoidal_positions(config.block_size, config.n_embd), persistent=False
            )
        self.drop = _nn.Dropout(config.dropout)
        self.blocks = _nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = _nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one (V, C) matrix embeds tokens and scores them
        self.apply(self._init_weights)
        # GPT-2: the projections that write into the residual stream get std 0.02 / sqrt(2 * n_layer), so the
        # residual's variance does not grow with depth (two such writes per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                _nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: _nn.Module) -> None:
        if isinstance(module, (_nn.Linear, _nn.Embedding)):
            _nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, _nn.Linear) and module.bias is not None:
            _nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count (the tied head once); by default without the position embedding, as nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_encoding == "learned":
            n -= self.wpe.weight.numel()
        return n

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self, idx: Tensor, targets: Tensor | None = None, *, prefix_embeds: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, V), loss) ; loss is None without targets.

        targets (B, T): the token each position should predict (ignore_index -100 skips a position); the loss
        is their mean cross-entropy. With config.fused_loss and targets, logits is None: the loss comes from
        ops.linear_cross_entropy, which never materialises them. prefix_embeds (B, P, n_embd) precede the
        tokens (P + T <= block_size); logits and loss cover the T token positions only.
        """
        P = self._check_inputs(idx, targets, prefix_embeds)
        x = self._embed(idx, prefix_embeds, start=0)  # (B, P + T, C)
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)[:, P:]  # (B, T, C): the token positions
        if targets is None:
            return self.lm_head(h), None  # (B, T, V)
        if self.config.fused_loss:
            weight = self.wte.weight  # (V, C), the tied head
            if torch.is_autocast_enabled(h.device.type):
                # Custom ops are outside autocast's lists: cast as autocast would for the lm_head matmul.
                dtype = torch.get_autocast_dtype(h.device.type)
                h, weight = h.to(dtype), weight.to(dtype)
            loss = ops.linear_cross_entropy(
                h, weight, targets, ignore_index=IGNORE_INDEX, backend=self.config.backend
            )
            return None, loss
        logits = self.lm_head(h)  # (B, T, V)
        loss = ops.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, backend=self.config.backend)
        return logits, loss

    def _embed(self, idx: Tensor, prefix_embeds: Tensor | None, start: int) -> Tensor:
        """Prefix, then token embeddings, plus positions start..start+P+T-1, then dropout: (B, P + T, C)."""
        x = self.wte(idx)  # (B, T, C)
        if prefix_embeds is not None:
            x = torch.cat([prefix_embeds.to(x.dtype), x], dim=1)  # (B, P + T, C)
        pos = torch.arange(start, start + x.shape[1], device=idx.device)
        x = x + (self.wpe(pos) if self.config.pos_encoding == "learned" else SINUSOIDAL_SCALE * self.pe[pos])
        return self.drop(x)

    def _check_inputs(self, idx, targets, prefix_embeds) -> int:
        """Validates forward's inputs; returns the prefix length P."""
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32):
            got = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
            raise TypeError(f"GPT: idx must be an int64 or int32 tensor of token ids, got {got}")
        if idx.dim() != 2:
            raise ValueError(f"GPT: idx must be (batch, seq_len), got shape {tuple(idx.shape)}")
        P = 0
        if prefix_embeds is not None:
            if not isinstance(prefix_embeds, Tensor) or not prefix_embeds.is_floating_point():
                raise TypeError("GPT: prefix_embeds must be a floating-point tensor (B, P, n_embd)")
            if (
                prefix_embeds.dim() != 3
                or prefix_embeds.shape[0] != idx.shape[0]
                or prefix_embeds.shape[2] != self.config.n_embd
            ):
                raise ValueError(
                    f"GPT: prefix_embeds must be (B, P, n_embd) = ({idx.shape[0]}, P, {self.config.n_embd}), "
                    f"got {tuple(prefix_embeds.shape)}"
                )
            P = prefix_embeds.shape[1]
        total = P + idx.shape[1]
        if total > self.config.block_size:
            what = f"prefix ({P}) + idx ({idx.shape[1]})" if P else f"idx length ({idx.shape[1]})"
            raise ValueError(f"GPT: {what} exceeds block_size {self.config.block_size}; crop the input")
        if total == 0:
            raise ValueError("GPT: the input is empty (no tokens and no prefix)")
        if targets is not None:
            if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
                raise TypeError("GPT: targets must be an int64 or int32 tensor of token ids")
            if targets.shape != idx.shape:
                raise ValueError(
                    f"GPT: targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}"
                )
        # Out-of-range ids: checked on CPU, where it costs no device sync (CUDA asserts inside the embedding).
        if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"GPT: token ids must be in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]"
                )
        return P

    # --------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        prefix_embeds: Tensor | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Appends max_new_tokens sampled tokens to idx (B, T >= 1) and returns (B, T + max_new_tokens).

        Each token is drawn with torch.multinomial from softmax(logits / temperature) restricted to the top_k
        most likely tokens (all when None); temperature 0 takes the argmax. The model runs in eval mode (no
        dropout) and is put back afterwards. With use_cache (the default) a per-layer KVCache makes each step
        encode one position. Once prefix + tokens pass block_size the window slides, which shifts every
        absolute position, so from then on each step re-encodes the window, as use_cache=False does every
        step. Both give the same tokens for the same torch seed.
        """
        self._check_generate_args(idx, max_new_tokens, temperature, top_k, prefix_embeds)
        caches = [KVCache(self.config.block_size) for _ in self.blocks] if use_cache else None
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self._next_logits(idx, prefix_embeds, caches)  # (B, V)
                idx = torch.cat([idx, self._sample(logits, temperature, top_k)], dim=1)  # (B, T + 1)
        finally:
            self.train(was_training)
        return idx

    def _next_logits(self, idx: Tensor, prefix_embeds: Tensor | None, caches: list[KVCache] | None) -> Tensor:
        """Logits (B, V) of the token after idx, encoding only what the caches do not hold yet."""
        P = 0 if prefix_embeds is None else prefix_embeds.shape[1]
        window = idx[:, -(self.config.block_size - P) :]  # the tokens that fit after the prefix
        if caches is None:
            logits, _ = self(window, prefix_embeds=prefix_embeds)
            return logits[:, -1]
        cached = caches[0].length  # positions (prefix included) already encoded
        if cached == 0 or P + idx.shape[1] > self.config.block_size:
            # First step, or the window slid: (re)encode prefix + window from position 0 (prefill).
            for cache in caches:
                cache.reset()
            x = self._embed(window, prefix_embeds, start=0)  # (B, P + T, C)
        else:
            x = self._embed(idx[:, cached - P :], None, start=cached)  # (B, new, C): normally one token
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self.lm_head(self.ln_f(x[:, -1]))  # (B, V)

    def _sample(self, logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
        """logits (B, V) -> next token ids (B, 1)."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        # Shifted so that the largest is 0 first, and the temperature kept above fp32's underflow: a tiny one then
        # sends the others to -inf (the limit: the argmax, ties shared) instead of overflowing every logit to
        # inf, or dividing by a temperature that rounds to 0, whose softmax is NaN.
        logits = logits.float()
        shifted = logits - logits.amax(dim=-1, keepdim=True)
        logits = shifted / max(temperature, torch.finfo(torch.float32).tiny)
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = ops.softmax(logits, dim=-1, backend=self.config.backend)  # (B, V)
        return torch.multinomial(probs, num_samples=1)

    def _check_generate_args(self, idx, max_new_tokens, temperature, top_k, prefix_embeds) -> None:
        self._check_inputs(idx, None, prefix_embeds)
        if idx.shape[1] == 0:
            raise ValueError("GPT.generate: idx must hold at least one token (B, T >= 1)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"GPT.generate: temperature must be a number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"GPT.generate: top_k must be a positive int or None, got {top_k!r}")
