"""A multimodal GPT, Fuyu-style: image patches, projected into the token embedding space, precede the text.

    images (B, C, S, S) -> PatchEmbed -> (B, P, n_embd) prefix, P = (S / patch_size)^2 in raster order
    GPT(idx, targets, prefix_embeds=prefix): positions continue across the prefix, attention is causal
    over it, logits and loss cover the text positions only

There is no separate vision encoder: the GPT's own blocks, and so gptfast's fused attention and loss kernels
on whichever backend config.backend names, carry the image and the text together.
"""

import torch
from torch import Tensor
from torch import nn as _nn

from .model import GPT, GPTConfig, sinusoidal_positions

PATCH_POS_ENCODINGS = ("sinusoidal", None)
# The text's sinusoidal encoding is scaled down to GPT-2's init (model.SINUSOIDAL_SCALE = 0.02) so as not to
# drown the tokens. In an image the position is much of the content ("... at the top left"): on the captions
# task (4 layers of 64, 300 steps of 32 images) the position was right for 24% of the test shapes at 0.02
# (chance is 11%) and for 99.8-100% at 0.5 (three seeds).
PATCH_POS_SCALE = 0.5


def sinusoidal_positions_2d(rows: int, cols: int, dim: int) -> Tensor:
    """(rows * cols, dim) in raster order: the first dim // 2 channels encode the row, the rest the column.

    Each half is the 1-D formula of model.sinusoidal_positions (as in MAE's 2-D sin-cos embedding), so two
    patches in the same row share the row half exactly.
    """
    row_dim = dim // 2
    row = sinusoidal_positions(rows, row_dim)  # (rows, dim // 2)
    col = sinusoidal_positions(cols, dim - row_dim)  # (cols, dim - dim // 2)
    grid = torch.cat([row[:, None].expand(rows, cols, -1), col[None].expand(rows, cols, -1)], dim=-1)
    return grid.reshape(rows * cols, dim)


class PatchEmbed(_nn.Module):
    """images (B, channels, image_size, image_size) -> patch embeddings (B, num_patches, n_embd).

    The image is cut into non-overlapping patch_size x patch_size patches in raster order (row by row); each
    patch's pixels, flattened channel-major as a Conv2d kernel is, go through one learned Linear projection.
    With pos_encoding="sinusoidal" a fixed 2-D sin-cos encoding of the patch's (row, column), times
    PATCH_POS_SCALE, is added. The GPT then adds its own 1-D positions to the patches, as to any prefix.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int,
        n_embd: int,
        pos_encoding: str | None = "sinusoidal",
    ):
        super().__init__()
        for name, value in (
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("channels", channels),
            ("n_embd", n_embd),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PatchEmbed: {name} must be a positive int, got {value!r}")
        if image_size % patch_size:
            raise ValueError(
                f"PatchEmbed: image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
            )
        if pos_encoding not in PATCH_POS_ENCODINGS:
            raise ValueError(
                f"PatchEmbed: pos_encoding must be one of {PATCH_POS_ENCODINGS}, got {pos_encoding!r}"
            )
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.n_embd = n_embd
        self.pos_encoding = pos_encoding
        self.grid = image_size // patch_size  # patches per side
        self.num_patches = self.grid * self.grid
        self.proj = _nn.Linear(channels * patch_size * patch_size, n_embd)
        if pos_encoding == "sinusoidal":
            # Fixed, so rebuilt rather than saved in checkpoints.
            self.register_buffer(
                "pe", sinusoidal_positions_2d(self.grid, self.grid, n_embd), persistent=False
            )

    def forward(self, images: Tensor) -> Tensor:
        self.check_images(images)
        B, C, p, g = images.shape[0], self.channels, self.patch_size, self.grid
        x = images.to(self.proj.weight.dtype).reshape(B, C, g, p, g, p)  # (B, C, row, y, col, x)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, self.num_patches, C * p * p)  # (B, P, C*p*p) raster order
        x = self.proj(x)  # (B, P, n_embd)
        if self.pos_encoding == "sinusoidal":
            x = x + PATCH_POS_SCALE * self.pe.to(x.dtype)
        return x

    def check_images(self, images) -> None:
        """TypeError / ValueError naming what images must be and what they are."""
        expected = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, Tensor) or not images.is_floating_point():
            got = images.dtype if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(
                f"PatchEmbed: images must be a floating-point tensor (values in [0, 1]), got {got}"
            )
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                "PatchEmbed: images must be (B, channels, image_size, image_size) = "
                f"(B, {', '.join(map(str, expected))}), got {tuple(images.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, patch_size={self.patch_size}, channels={self.channels}, "
            f"n_embd={self.n_embd}, pos_encoding={self.pos_encoding!r}"
        )


class MultimodalGPT(_nn.Module):
    """A GPT that reads an image before its text: PatchEmbed's patches are the GPT's prefix_embeds.

    forward(images, idx, targets=None) -> (logits (B, T, V), loss), exactly GPT.forward's contract for the
    text positions. generate(images, prompt_idx, max_new_tokens, ...) -> (B, T + max_new_tokens) token ids.
    The image needs num_patches of the config's block_size; the text gets the rest.
    """

    def __init__(
        self,
        config: GPTConfig,
        image_size: int,
        patch_size: int,
        channels: int = 3,
        patch_pos_encoding: str | None = "sinusoidal",
    ):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(image_size, patch_size, channels, config.n_embd, patch_pos_encoding)
        if self.patch_embed.num_patches >= config.block_size:
            raise ValueError(
                f"MultimodalGPT: image_size {image_size} / patch_size {patch_size} gives "
                f"{self.patch_embed.num_patches} patches, which leave no room for text in block_size "
                f"{config.block_size}; use a larger patch_size or block_size"
            )
        self.gpt = GPT(config)
        self.patch_embed.apply(GPT._init_weights)  # GPT-2's init for the projection too

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def max_text_len(self) -> int:
        """The most text tokens that fit after the image in block_size."""
        return self.config.block_size - self.num_patches

    def image_config(self) -> dict:
        """The constructor's arguments besides the GPTConfig: what a checkpoint needs to rebuild the model."""
        pe = self.patch_embed
        return {
            "image_size": pe.image_size,
            "patch_size": pe.patch_size,
            "channels": pe.channels,
            "patch_pos_encoding": pe.pos_encoding,
        }

    def num_parameters(self) -> int:
        return self.gpt.num_parameters() + sum(p.numel() for p in self.patch_embed.parameters())

    def forward(
        self, images: Tensor, idx: Tensor, targets: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """images (B, channels, S, S) in [0, 1], idx (B, T), targets (B, T) or None -> (logits, loss)."""
        self._check_pair(images, idx)
        return self.gpt(idx, targets, prefix_embeds=self.patch_embed(images))

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        prompt_idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        """Appends max_new_tokens tokens sampled after each image and its prompt (B, T >= 1): (B, T + new).

        GPT.generate with the patches as prefix: temperature 0 is greedy, the KV cache (use_cache) encodes the
        image once, and a text longer than max_text_len slides its window while the image stays.
        """
        self._check_pair(images, prompt_idx)
        return self.gpt.generate(
            prompt_idx,
            max_new_tokens,
            temperature,
            top_k,
            prefix_embeds=self.patch_embed(images),
            use_cache=use_cache,
        )

    def _check_pair(self, images, idx) -> None:
        """Checks the images, then what concerns both: equal batch sizes, a text that fits after them."""
        self.patch_embed.check_images(images)
        if not isinstance(idx, Tensor) or idx.dim() != 2:
            return  # GPT names this
        if images.shape[0] != idx.shape[0]:
            raise ValueError(
                f"MultimodalGPT: images and idx must have the same batch size, got {images.shape[0]} images "
                f"and idx of shape {tuple(idx.shape)}"
            )
        if idx.shape[1] > self.max_text_len:
            raise ValueError(
                f"MultimodalGPT: {self.num_patches} image patches + idx length {idx.shape[1]} exceed "
                f"block_size {self.config.block_size}; idx may hold at most {self.max_text_len} tokens"
            )
