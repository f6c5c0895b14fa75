"""The captions data: seeded splits, what the pixels show, captions and tokens, scoring, chance, resume."""

import pytest
import torch

from gptfast import captions as c

ONE, TWO = c.CaptionSpec(max_shapes=1), c.CaptionSpec(max_shapes=2)


# ---------------------------------------------------------------------------------------------- splits
def test_splits_are_fixed_by_their_seeds_and_differ():
    a, b = c.make_split("test", 32, ONE), c.make_split("test", 32, ONE)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.idx, b.idx)
    val = c.make_split("val", 32, ONE)
    assert not torch.equal(a.images, val.images)
    assert not torch.equal(a.images, c.make_split("test", 32, ONE, seed=1).images)
    # No two (split, seed) pairs share a generator seed in the 32 bits torch's CPU generator keeps.
    seeds = {c.split_seed(split, seed) % 2**32 for split in c.SPLITS for seed in (0, 1, 2**28 - 1)}
    assert len(seeds) == len(c.SPLITS) * 3


def test_bad_split_seed_and_spec():
    with pytest.raises(ValueError, match="split must be one of"):
        c.split_seed("holdout")
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\^28\), got -1"):
        c.split_seed("train", -1)
    with pytest.raises(ValueError, match=r"got 268435456"):
        c.split_seed("train", 2**28)
    with pytest.raises(ValueError, match="image_size must be an int >= 24, got 16"):
        c.CaptionSpec(image_size=16)
    with pytest.raises(ValueError, match="max_shapes must be <= 9"):
        c.CaptionSpec(max_shapes=10)


def test_sampler_state_resumes_the_stream():
    sampler = c.CaptionSampler(ONE, 4, seed=3)
    sampler.next()
    state = sampler.state_dict()
    expected = sampler.next()
    sampler.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(sampler.next(), expected))
    assert not torch.equal(
        c.CaptionSampler(ONE, 4, seed=4).next()[0], c.CaptionSampler(ONE, 4, seed=3).next()[0]
    )


def test_split_sampler_walks_the_split_in_order_and_wraps():
    split = c.make_split("val", 5, ONE)
    sampler = c.SplitSampler(split, 3)
    first, second = sampler.next(), sampler.next()
    assert torch.equal(first[0], split.images[:3])
    assert torch.equal(second[1], split.idx[[3, 4, 0]])


# ------------------------------------------------------------------------------------------ the pixels
def _shape_pixels(image, rgb):
    """(ys, xs) of the pixels painted with rgb (the background noise stays below BACKGROUND everywhere)."""
    painted = (image - rgb[:, None, None]).abs().amax(dim=0) < 1e-6  # (S, S)
    return painted.nonzero(as_tuple=True)


def test_each_image_shows_its_caption():
    # Reads the attributes back from the pixels of 300 one-shape images: the colour (the painted value), the
    # position (the cell of the painted box's centre), the size (its extent) and features of the kind.
    batch = c.make_split("val", 300, ONE)
    cell = ONE.image_size / 3
    palette = torch.tensor(list(c.COLOURS.values()))
    for i, (shape,) in enumerate(batch.scenes.attributes()):
        image, rgb = batch.images[i], batch.scenes.rgb[i, 0]
        ys, xs = _shape_pixels(image, rgb)
        assert (image.amax(dim=0) <= c.BACKGROUND).sum() + len(ys) == image[0].numel()  # shape or noise
        colour = list(c.COLOURS)[int((palette - rgb).abs().sum(dim=1).argmin())]
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        row, col = int((top + bottom) / 2 // cell), int((left + right) / 2 // cell)
        assert colour == shape["colour"] and c.POSITIONS[row * 3 + col] == shape["position"], (i, shape)
        # HALF_SIZE keeps a pixel between the sizes: small spans at most 7 pixels, large at least 8.
        extent = max(bottom - top, right - left)
        assert extent <= 7 if shape["size"] == "small" else extent >= 8, (i, shape, extent)
        fill = len(ys) / ((bottom - top) * (right - left))  # of the bounding box
        centre = (top + bottom - 1) / 2
        bottom_heavy = ((ys > centre).sum() - (ys < centre).sum()) / len(ys)
        assert (fill == 1) == (shape["shape"] == "square"), (i, shape, fill)
        assert (bottom_heavy > 0.28) == (shape["shape"] == "triangle"), (i, shape, bottom_heavy)  # apex up
        if shape["size"] == "large" and shape["shape"] in ("circle", "cross"):
            # At 5-7 pixels a cross can fill its box as a circle does; from 8 on, fill tells them apart.
            assert (fill > 0.66) == (shape["shape"] == "circle"), (i, shape, fill)


def test_two_shape_scenes_use_distinct_cells_in_reading_order():
    batch = c.make_split("val", 300, TWO)
    counts = batch.scenes.present.sum(dim=1)
    assert set(counts.tolist()) == {1, 2}
    two = counts == 2
    first, second = batch.scenes.position[two, 0], batch.scenes.position[two, 1]
    assert torch.all(first < second)  # distinct cells, top left first
    text = batch.captions[int(two.nonzero()[0])]
    assert text.count(" and a ") == 1 and len(c.parse_caption(text)) == 2


# --------------------------------------------------------------------------------- captions and tokens
def test_caption_encode_decode_parse_round_trip():
    shapes = [
        {"size": "small", "colour": "red", "shape": "circle", "position": "top left"},
        {"size": "large", "colour": "cyan", "shape": "cross", "position": "center"},
    ]
    text = c.caption(shapes)
    assert text == "a small red circle at the top left and a large cyan cross at the center"
    ids = c.encode(text)
    assert c.decode([c.BOS_ID, *ids, c.EOS_ID, c.PAD_ID, c.WORD_ID["red"]]) == text  # stops at <eos>
    assert c.parse_caption(text) == shapes
    with pytest.raises(ValueError, match="'purple' is not in the caption vocabulary"):
        c.encode("a small purple circle")


def test_parse_is_lenient_with_broken_captions():
    assert c.parse_caption("") == []
    assert c.parse_caption("a red at the middle") == [
        {"size": None, "colour": "red", "shape": None, "position": None}
    ]


def test_tokens_are_bos_words_eos_then_ignored_padding():
    batch = c.make_split("test", 64, TWO)
    assert batch.idx.shape == batch.targets.shape == (64, TWO.seq_len)
    assert torch.all(batch.idx[:, 0] == c.BOS_ID)
    for idx, targets, text in zip(batch.idx, batch.targets, batch.captions):
        n = len(text.split())
        assert targets[:n].tolist() == c.encode(text) and targets[n] == c.EOS_ID
        assert torch.all(targets[n + 1 :] == c.IGNORE_INDEX)
        assert torch.equal(idx[1 : n + 1], targets[:n])  # the inputs are the targets shifted by one


# ------------------------------------------------------------------------------------------- scoring
def test_score_counts_exact_matches_and_each_attribute():
    batch = c.make_split("test", 4, TWO)
    assert c.score(batch.captions, batch) == {
        "exact_match": 1.0,
        "size": 1.0,
        "colour": 1.0,
        "shape": 1.0,
        "position": 1.0,
        "images": 4,
    }
    shapes = batch.scenes.attributes()
    wrong = []
    for image in shapes:
        first = dict(image[0], colour="green" if image[0]["colour"] != "green" else "red")
        wrong.append(c.caption([first]))  # a wrong colour on the first shape, any second shape left out
    scores = c.score(wrong, batch)
    n_shapes = sum(len(s) for s in shapes)
    assert scores["exact_match"] == 0.0 and scores["colour"] == 0.0
    assert scores["shape"] == scores["size"] == scores["position"] == len(shapes) / n_shapes
    with pytest.raises(ValueError, match="3 captions for 4 images"):
        c.score(wrong[:3], batch)


def test_the_text_alone_scores_chance():
    # Attributes are uniform and independent of each other, so without the image the best guess (the most
    # frequent value, whatever else is known) scores about CHANCE, far below the 90% target.
    scenes = c.sample_scenes(20_000, ONE, torch.Generator().manual_seed(0))
    for name, values in c.VALUES.items():
        counts = torch.bincount(getattr(scenes, name)[:, 0], minlength=len(values)).float() / len(scenes)
        assert counts.max() < c.CHANCE[name] + 0.015, (name, counts)
        assert c.CHANCE[name] <= 0.5
    # Knowing one attribute does not tell another: the colour given the shape is still uniform.
    for kind in range(len(c.SHAPES)):
        rows = scenes.shape[:, 0] == kind
        counts = torch.bincount(scenes.colour[rows, 0], minlength=len(c.COLOURS)).float() / rows.sum()
        assert counts.max() < c.CHANCE["colour"] + 0.03
