"""The captions task's data: procedural images of coloured shapes and their captions, with no download.

An image (3, 32, 32 by default) holds 1 to max_shapes shapes on a dark, noisy background. Each shape has four
attributes, drawn uniformly and independently: a size (SIZES), a colour (COLOURS), a kind (SHAPES) and a
position, one cell of a 3 x 3 grid (POSITIONS). Its caption names them in a fixed grammar:

    "a small red circle at the top left"
    "a large blue square at the center and a small green cross at the bottom right"      (max_shapes=2)

The shapes of one image sit in distinct cells and are captioned in reading order (top left first), so the
caption is a function of the image. As the attributes are independent and uniform, the text alone tells
nothing: without the image the best guess scores CHANCE per attribute (1/2 for size, 1/6 for colour, ...).

Size is the shape's extent (bounding box), the same measure for every kind: small shapes span 0.54-0.64 of a
grid cell, large ones 0.84-0.92, which at 32x32 keeps at least a pixel between the two. Centres and sizes are
jittered and colours vary a little, so no two images are alike even where their captions are.

Tokens are words (VOCAB, 24 of them): a caption of one shape is 8 tokens or fewer.

Splits come from different seeds (split_seed): "train" is an unbounded stream (CaptionSampler, seeded by the
run's seed), "val" and "test" are fixed sets (make_split) that every run shares. Captions repeat across the
splits (there are 432 one-shape captions), images do not.
"""

import dataclasses

import torch
from torch import Tensor

from .model import IGNORE_INDEX  # the loss skips padding

SIZES = ("small", "large")
COLOURS = {
    "red": (0.90, 0.15, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "cyan": (0.10, 0.80, 0.85),
    "magenta": (0.85, 0.15, 0.80),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Cell r * 3 + c of the grid, in reading order.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
ATTRIBUTES = ("size", "colour", "shape", "position")
VALUES = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS}
CHANCE = {name: 1.0 / len(values) for name, values in VALUES.items()}  # uniform attributes: 1 / #values

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
GRAMMAR_WORDS = ("a", "and", "at", "the")
POSITION_WORDS = ("top", "bottom", "left", "right", "center")
VOCAB = (PAD, BOS, EOS, *GRAMMAR_WORDS, *SIZES, *COLOURS, *SHAPES, *POSITION_WORDS)
WORD_ID = {word: i for i, word in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID = WORD_ID[PAD], WORD_ID[BOS], WORD_ID[EOS]

SPLITS = ("train", "val", "test", "fresh")  # "fresh": images that `gptfast generate` captions
SEED_BITS = 28
# Extents (2 * half-size) as fractions of a grid cell, and the centre's jitter around the cell centre.
HALF_SIZE = {"small": (0.27, 0.32), "large": (0.42, 0.46)}
JITTER = 0.05
BACKGROUND = 0.15  # the background is uniform noise in [0, BACKGROUND]
COLOUR_JITTER = 0.08
MIN_IMAGE_SIZE = 24  # a small shape must still span a few pixels


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    """What the images look like: their side in pixels and the most shapes one image holds."""

    image_size: int = 32
    max_shapes: int = 2

    def __post_init__(self):
        for name, low in (("image_size", MIN_IMAGE_SIZE), ("max_shapes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CaptionSpec: {name} must be an int >= {low}, got {value!r}")
        if self.max_shapes > len(POSITIONS):
            raise ValueError(
                f"CaptionSpec: max_shapes must be <= {len(POSITIONS)} (one shape per grid cell), "
                f"got {self.max_shapes}"
            )

    @property
    def max_caption_words(self) -> int:
        return 8 * self.max_shapes + self.max_shapes - 1  # "a small red circle at the top left" + "and"s

    @property
    def seq_len(self) -> int:
        """Length of idx and targets: <bos> + the longest caption, or that caption + <eos>."""
        return self.max_caption_words + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Scenes:
    """n scenes of up to S shapes each, slots in reading order; attribute tensors are (n, S) value indices.

    present (n, S) bool: which slots hold a shape (the first count of them). centre (n, S, 2): (y, x) in
    pixels; half_size (n, S) in pixels; rgb (n, S, 3) in [0, 1].
    """

    present: Tensor
    size: Tensor
    colour: Tensor
    shape: Tensor
    position: Tensor
    centre: Tensor
    half_size: Tensor
    rgb: Tensor

    def __len__(self) -> int:
        return self.present.shape[0]

    def attributes(self) -> list[list[dict]]:
        """Each scene's shapes as {attribute: value name}, in caption order."""
        columns = [self.present.tolist()] + [getattr(self, name).tolist() for name in ATTRIBUTES]
        return [
            [
                {name: VALUES[name][values[s]] for name, values in zip(ATTRIBUTES, row)}
                for s, here in enumerate(present)
                if here
            ]
            for present, *row in zip(*columns)
        ]


def split_seed(split: str, seed: int = 0) -> int:
    """The generator seed of a split: distinct (split, seed) pairs never share one.

    torch's CPU generator keeps only the low 32 bits of a seed, so the split's index takes bits 28-29 and the
    seed must fit in the 28 below.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**SEED_BITS:
        raise ValueError(f"seed must be an int in [0, 2^{SEED_BITS}), got {seed!r}")
    return SPLITS.index(split) << SEED_BITS | seed


# ------------------------------------------------------------------------------------------ scenes
def sample_scenes(n: int, spec: CaptionSpec, generator: torch.Generator) -> Scenes:
    """n random scenes: 1..max_shapes shapes in distinct cells, every attribute uniform and independent."""
    S, cells = spec.max_shapes, len(POSITIONS)
    count = torch.randint(1, S + 1, (n,), generator=generator)
    present = torch.arange(S)[None] < count[:, None]  # (n, S)
    # Distinct cells: the first S of a random permutation; empty slots get the sentinel `cells`, and sorting
    # puts the shapes first, in reading order.
    position = torch.rand(n, cells, generator=generator).argsort(dim=1)[:, :S]
    position = position.masked_fill(~present, cells).sort(dim=1).values.masked_fill(~present, 0)

    def uniform(*shape):
        return torch.rand(*shape, generator=generator)

    size = torch.randint(len(SIZES), (n, S), generator=generator)
    colour = torch.randint(len(COLOURS), (n, S), generator=generator)
    shape = torch.randint(len(SHAPES), (n, S), generator=generator)
    cell = spec.image_size / 3
    bounds = torch.tensor([HALF_SIZE[name] for name in SIZES])[size]  # (n, S, 2): low, high in cells
    half_size = cell * (bounds[..., 0] + (bounds[..., 1] - bounds[..., 0]) * uniform(n, S))
    grid = torch.stack([position // 3, position % 3], dim=-1).float()  # (n, S, 2): row, column
    centre = cell * (grid + 0.5 + JITTER * (2 * uniform(n, S, 2) - 1))
    palette = torch.tensor(list(COLOURS.values()))
    rgb = (palette[colour] + COLOUR_JITTER * (2 * uniform(n, S, 3) - 1)).clamp(0, 1)
    return Scenes(present, size, colour, shape, position, centre, half_size, rgb)


def render(scenes: Scenes, spec: CaptionSpec, generator: torch.Generator) -> Tensor:
    """Scenes -> images (n, 3, image_size, image_size) float32 in [0, 1]: noise, then the shapes on top."""
    n, S = scenes.present.shape
    side = spec.image_size
    pixel = torch.arange(side, dtype=torch.float32) + 0.5  # pixel centres
    dy = pixel[None, None, :, None] - scenes.centre[..., 0, None, None]  # (n, S, side, 1)
    dx = pixel[None, None, None, :] - scenes.centre[..., 1, None, None]  # (n, S, 1, side)
    r = scenes.half_size[..., None, None]  # (n, S, 1, 1)
    arm = r / 3  # the cross's half-thickness
    masks = torch.stack(  # (n, S, kind, side, side), in SHAPES order
        [
            dx**2 + dy**2 <= r**2,
            (dx.abs() <= r) & (dy.abs() <= r),
            (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2),  # apex up, base 2r wide
            ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r)),
        ],
        dim=2,
    )
    mask = masks.gather(2, scenes.shape[:, :, None, None, None].expand(n, S, 1, side, side))[:, :, 0]
    mask &= scenes.present[..., None, None]  # (n, S, side, side)
    images = BACKGROUND * torch.rand(n, 3, side, side, generator=generator)
    for s in range(S):
        images = torch.where(mask[:, s, None], scenes.rgb[:, s, :, None, None], images)
    return images


# -------------------------------------------------------------------------------------- captions, tokens
def caption(shapes: list[dict]) -> str:
    """[{size, colour, shape, position}, ...] -> "a small red circle at the top left and ..."."""
    return " and ".join(f"a {s['size']} {s['colour']} {s['shape']} at the {s['position']}" for s in shapes)


def encode(text: str) -> list[int]:
    """A caption -> word ids (no <bos>/<eos>); ValueError naming a word outside VOCAB."""
    ids = []
    for word in text.split():
        if word not in WORD_ID:
            raise ValueError(f"captions.encode: {word!r} is not in the caption vocabulary {VOCAB[3:]}")
        ids.append(WORD_ID[word])
    return ids


def decode(ids) -> str:
    """Word ids -> text, up to the first <eos>; <bos> and <pad> are dropped."""
    words = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i not in (BOS_ID, PAD_ID) and 0 <= i < len(VOCAB):
            words.append(VOCAB[i])
    return " ".join(words)


def parse_caption(text: str) -> list[dict]:
    """A (generated) caption -> its shapes as {attribute: value or None}, one dict per "and"-joined phrase.

    Lenient, so a half-right caption still scores its right attributes: each attribute takes the first word
    of its kind in the phrase, the position is the words after "the".
    """
    shapes = []
    for phrase in text.split(" and ") if text.strip() else []:
        words = phrase.split()
        found = {
            name: next((w for w in words if w in VALUES[name]), None) for name in ("size", "colour", "shape")
        }
        where = " ".join(words[words.index("the") + 1 :]) if "the" in words else ""
        found["position"] = where if where in POSITIONS else None
        shapes.append(found)
    return shapes


def tokenize(scenes: Scenes, spec: CaptionSpec) -> tuple[list[str], Tensor, Tensor]:
    """(captions, idx, targets): idx (n, seq_len) = <bos> + words + padding, targets = words + <eos> and
    IGNORE_INDEX at the padding, both int64."""
    captions = [caption(shapes) for shapes in scenes.attributes()]
    rows = [[BOS_ID, *encode(text), EOS_ID] for text in captions]
    rows = torch.tensor([ids + [PAD_ID] * (spec.seq_len + 1 - len(ids)) for ids in rows], dtype=torch.long)
    targets = rows[:, 1:].masked_fill(rows[:, 1:] == PAD_ID, IGNORE_INDEX)
    return captions, rows[:, :-1].clone(), targets


# ---------------------------------------------------------------------------------------------- splits
@dataclasses.dataclass
class CaptionBatch:
    """Images (n, 3, S, S), their scenes and captions, and the model's idx and targets (n, seq_len)."""

    images: Tensor
    scenes: Scenes
    captions: list[str]
    idx: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def draw(n: int, spec: CaptionSpec, generator: torch.Generator) -> CaptionBatch:
    scenes = sample_scenes(n, spec, generator)
    images = render(scenes, spec, generator)
    captions, idx, targets = tokenize(scenes, spec)
    return CaptionBatch(images, scenes, captions, idx, targets)


def make_split(split: str, n: int, spec: CaptionSpec, seed: int = 0) -> CaptionBatch:
    """The n examples of a fixed split ("val", "test" or "fresh"): the same on every call with that seed."""
    return draw(n, spec, torch.Generator().manual_seed(split_seed(split, seed)))


class CaptionSampler:
    """The train split: an unbounded stream of fresh examples, from a generator seeded by split_seed("train").

    next() -> (images, idx, targets), the batch MultimodalGPT(*batch) trains on. The generator's state is the
    whole state (state_dict/load_state_dict), so a resumed run draws the images it would have drawn.
    """

    def __init__(self, spec: CaptionSpec, batch_size: int, seed: int):
        self.spec, self.batch_size = spec, batch_size
        self.generator = torch.Generator().manual_seed(split_seed("train", seed))

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        batch = draw(self.batch_size, self.spec, self.generator)
        return batch.images, batch.idx, batch.targets

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class SplitSampler:
    """Batches of a fixed split in order, wrapping around: the held-out sampler for Trainer's eval loss."""

    def __init__(self, split: CaptionBatch, batch_size: int):
        self.split, self.batch_size, self.start = split, batch_size, 0

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        rows = (torch.arange(self.batch_size) + self.start) % len(self.split)
        self.start = (self.start + self.batch_size) % len(self.split)
        return self.split.images[rows], self.split.idx[rows], self.split.targets[rows]


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def generate_captions(
    model,
    images: Tensor,
    spec: CaptionSpec,
    temperature: float = 0.0,
    top_k: int | None = None,
    batch_size: int = 250,
) -> list[str]:
    """A MultimodalGPT's captions of images (n, 3, S, S), batch_size images at a time; greedy by default."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(device)
        prompt = torch.full((chunk.shape[0], 1), BOS_ID, dtype=torch.long, device=device)
        ids = model.generate(chunk, prompt, spec.seq_len, temperature=temperature, top_k=top_k)  # (b, 1 + L)
        out.extend(decode(row[1:]) for row in ids.tolist())
    return out


def attribute_hits(text: str, shapes: list[dict]) -> dict:
    """For each attribute, how many of an image's true shapes the caption `text` names it right for.

    The i-th shape of the caption is checked against the image's i-th shape (both in reading order); a shape
    the caption leaves out counts as wrong on every attribute.
    """
    guessed = parse_caption(text)
    return {
        name: sum(s < len(guessed) and guessed[s][name] == truth[name] for s, truth in enumerate(shapes))
        for name in ATTRIBUTES
    }


def score(predicted: list[str], batch: CaptionBatch) -> dict:
    """Exact-match rate of the captions and, per attribute, the fraction of true shapes named right."""
    if len(predicted) != len(batch):
        raise ValueError(f"score: {len(predicted)} captions for {len(batch)} images")
    correct, total = dict.fromkeys(ATTRIBUTES, 0), 0
    for text, shapes in zip(predicted, batch.scenes.attributes()):
        total += len(shapes)
        for name, hits in attribute_hits(text, shapes).items():
            correct[name] += hits
    exact = sum(p == t for p, t in zip(predicted, batch.captions))
    return {
        "exact_match": exact / len(batch),
        **{name: correct[name] / total for name in ATTRIBUTES},
        "images": len(batch),
    }


def evaluate(model, batch: CaptionBatch, spec: CaptionSpec) -> dict:
    """score() of the model's greedy captions of a split."""
    return score(generate_captions(model, batch.images, spec), batch)


def format_scores(scores: dict) -> str:
    """ "exact match 93.1% | size 99.0% (chance 50%) | colour ..." for a score() result."""
    parts = [f"exact match {scores['exact_match']:.1%}"]
    parts += [f"{name} {scores[name]:.1%} (chance {CHANCE[name]:.0%})" for name in ATTRIBUTES]
    return " | ".join(parts)
