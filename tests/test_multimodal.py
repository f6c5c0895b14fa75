"""MultimodalGPT: patch embedding, the image as a causal prefix, every backend, KV-cache decoding, errors."""

import pytest
import torch
import torch.nn.functional as F

from backends_under_test import cases, ids
from gptfast import GPTConfig, backends, testing
from gptfast.model import sinusoidal_positions
from gptfast.multimodal import PATCH_POS_SCALE, MultimodalGPT, PatchEmbed, sinusoidal_positions_2d

# 16 patches of 8x8 and up to 9 text tokens fit block_size 32; two heads of dim 16 (the smallest head dim the
# Triton attention kernel's dots accept), so every backend runs the same small model in milliseconds.
SMALL = dict(vocab_size=24, block_size=32, n_layer=2, n_head=2, n_embd=32)
IMAGE = dict(image_size=32, patch_size=8, channels=3)


HEAD_DIM = SMALL["n_embd"] // SMALL["n_head"]
# The backends that run this fp32 model's attention (head dim 16) and loss; the cuda extension's attention
# takes only fp16/bf16 with head dim 64 or 128, so on a GPU machine it is left out.
MODEL_CASES = [
    (backend, device)
    for backend, device in cases("attention")
    if backends.why_not(
        backend, "attention", torch.device(device), dtype=torch.float32, head_dim=HEAD_DIM, value_dim=HEAD_DIM
    )
    is None
    and backends.why_not(backend, "cross_entropy", torch.device(device)) is None
]
# The whole-model check measures each kernel backend against the reference; the reference itself would be its
# own yardstick there (it is held to torch op by op in tests/ops/).
KERNEL_CASES = [(b, d) for b, d in MODEL_CASES if b != "reference"]


def small(**overrides) -> MultimodalGPT:
    return MultimodalGPT(GPTConfig(**{**SMALL, **overrides}), **IMAGE)


def images(B):
    return torch.rand(B, 3, 32, 32)


def tokens(B, T):
    return torch.randint(0, SMALL["vocab_size"], (B, T))


# --------------------------------------------------------------------------------------- PatchEmbed
def test_patch_embed_is_a_strided_convolution():
    embed = PatchEmbed(32, 8, 3, 48, pos_encoding=None)
    x = torch.rand(2, 3, 32, 32)
    weight = embed.proj.weight.view(48, 3, 8, 8)  # channel-major pixels: exactly a Conv2d kernel's layout
    conv = F.conv2d(x, weight, embed.proj.bias, stride=8)  # (B, 48, 4, 4)
    expected = conv.flatten(2).transpose(1, 2)  # (B, 16, 48): patches in raster order
    torch.testing.assert_close(embed(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [32, 7])  # an even and an odd width (the row half is the smaller one)
def test_2d_positions_encode_row_then_column(dim):
    rows, cols = 3, 5
    pe = sinusoidal_positions_2d(rows, cols, dim)
    assert pe.shape == (rows * cols, dim)
    row_pe, col_pe = sinusoidal_positions(rows, dim // 2), sinusoidal_positions(cols, dim - dim // 2)
    for r in range(rows):
        for c in range(cols):
            torch.testing.assert_close(pe[r * cols + c], torch.cat([row_pe[r], col_pe[c]]), rtol=0, atol=0)


def test_patch_embed_adds_scaled_2d_positions():
    with_pe, without = PatchEmbed(32, 8, 3, 32), PatchEmbed(32, 8, 3, 32, pos_encoding=None)
    without.load_state_dict(with_pe.state_dict())  # the encoding is a non-persistent buffer, not a weight
    x = torch.rand(2, 3, 32, 32)
    expected = without(x) + PATCH_POS_SCALE * sinusoidal_positions_2d(4, 4, 32)
    torch.testing.assert_close(with_pe(x), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ the image prefix
def test_forward_is_the_gpt_with_the_patches_as_prefix():
    model = small()
    x, idx, targets = images(3), tokens(3, 7), tokens(3, 7)
    logits, loss = model(x, idx, targets)
    assert logits.shape == (3, 7, SMALL["vocab_size"])  # the text positions only
    ref_logits, ref_loss = model.gpt(idx, targets, prefix_embeds=model.patch_embed(x))
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)


def test_every_text_position_sees_the_image_and_only_earlier_text():
    model = small().eval()
    x, idx = images(2), tokens(2, 6)
    base = model(x, idx)[0]
    other_image = model(images(2), idx)[0]
    assert (other_image - base).abs().amax(dim=(0, 2)).min() > 0  # every text position depends on the image
    changed = idx.clone()
    changed[:, 3] = (changed[:, 3] + 1) % SMALL["vocab_size"]
    later = model(x, changed)[0]
    assert torch.equal(later[:, :3], base[:, :3]) and not torch.equal(later[:, 3:], base[:, 3:])  # causal


def test_the_patch_projection_learns():
    model = small()
    _, loss = model(images(2), tokens(2, 5), tokens(2, 5))
    loss.backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("backend, device", KERNEL_CASES, ids=ids(KERNEL_CASES))
def test_every_backend_gives_the_reference_loss_and_gradients(backend, device):
    # design.md's rule on the whole model: out (fp32 on `backend`) against the reference in fp64, with the
    # reference backend in fp32 (plain torch ops) as torch's own error. Every parameter's gradient is checked.
    torch.manual_seed(1)
    ref64 = small(backend="reference").double()
    torch32 = small(backend="reference")
    out = small(backend=backend)
    for model in (torch32, out):
        model.load_state_dict(ref64.state_dict())
    x, idx, targets = images(3), tokens(3, 9), tokens(3, 9)
    targets[0, 6:] = -100  # padding, as the captions have
    results = []
    for model in (ref64, torch32, out):
        model.to(device)
        _, loss = model(x.to(device), idx.to(device), targets.to(device))
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss64, grads64), (loss32, grads32), (loss_out, grads_out) = results
    testing.assert_close(loss_out, loss64, loss32, "loss")
    for name, grad in grads64.items():
        testing.assert_close(grads_out[name], grad, grads32[name], name)


# -------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, 5)])  # greedy, sampled top-k
def test_cached_generation_equals_uncached(temperature, top_k):
    model = small()
    x, prompt = images(2), tokens(2, 2)
    # 16 patches + 2 + 20 tokens pass block_size 32: the text window slides while the image stays.
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(model.generate(x, prompt, 20, temperature, top_k, use_cache=use_cache))
    assert outs[0].shape == (2, 22) and torch.equal(outs[0][:, :2], prompt)
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make_images, error, match",
    [
        (lambda: torch.rand(2, 1, 32, 32), ValueError, r"\(B, 3, 32, 32\), got \(2, 1, 32, 32\)"),
        (lambda: torch.rand(2, 3, 28, 28), ValueError, r"\(B, 3, 32, 32\), got \(2, 3, 28, 28\)"),
        (lambda: torch.rand(3, 32, 32), ValueError, r"\(B, 3, 32, 32\), got \(3, 32, 32\)"),
        (
            lambda: torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
            TypeError,
            "floating-point.*uint8",
        ),
        (lambda: torch.rand(3, 3, 32, 32), ValueError, "same batch size, got 3 images and idx of shape"),
    ],
)
def test_bad_images(make_images, error, match):
    model = small()
    with pytest.raises(error, match=match):
        model(make_images(), tokens(2, 4))
    with pytest.raises(error, match=match):
        model.generate(make_images(), tokens(2, 1), 2)


def test_text_too_long_for_the_image():
    model = small()  # 16 patches leave 16 of block_size 32 for text
    with pytest.raises(
        ValueError, match="16 image patches \\+ idx length 17 exceed block_size 32.*at most 16"
    ):
        model(images(1), tokens(1, 17))
    with pytest.raises(ValueError, match="idx length 17 exceed block_size 32"):
        model.generate(images(1), tokens(1, 17), 1)


def test_prefix_of_the_wrong_width_is_refused_in_generate_too():
    model = small()
    with pytest.raises(
        ValueError, match=r"prefix_embeds must be \(B, P, n_embd\) = \(1, P, 32\), got \(1, 4, 16\)"
    ):
        model.gpt.generate(tokens(1, 2), 3, prefix_embeds=torch.randn(1, 4, 16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=32, patch_size=5), r"image_size \(32\) must be a multiple of patch_size \(5\)"),
        (dict(image_size=32, patch_size=4), "64 patches, which leave no room for text in block_size 32"),
        (dict(image_size=32, patch_size=8, channels=0), "channels must be a positive int, got 0"),
        (dict(image_size=32, patch_size=8, patch_pos_encoding="rope"), "pos_encoding must be one of"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultimodalGPT(GPTConfig(**SMALL), **kwargs)
