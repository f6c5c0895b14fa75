"""Text data for training: the embedded default corpus, byte tokens, a train/val split and a seeded sampler.

The default corpus needs no download: it is the Python standard library's own source code, read from the
running interpreter's installation in a fixed file order and capped in size, so every run on a machine
sees the same bytes. Tokens are bytes (vocab 256), so any text file works with no tokenizer to train or ship.
"""

import hashlib
import os
import sysconfig

import torch
from torch import Tensor

VOCAB_SIZE = 256
DEFAULT_CORPUS_BYTES = 4 * 2**20
VAL_FRACTION = 0.1
# Directories of the stdlib left out of the corpus: installed third-party packages, and test suites full of
# deliberately odd encodings and generated data.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}


class DataError(ValueError):
    """The text source cannot be used (missing, unreadable or too short); the message says which and why."""


def encode(text: str) -> list[int]:
    """Text -> byte ids (UTF-8)."""
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Byte ids -> text; bytes that are not valid UTF-8 (a sample may end mid-character) show as U+FFFD."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def stdlib_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> bytes:
    """The stdlib's .py sources, each under a '# file: <path>' line, in sorted path order, capped."""
    root = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted in place, so os.walk descends in a fixed order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    body = f.read()
            except OSError:
                continue
            part = f"# file: {os.path.relpath(path, root)}\n".encode() + body + b"\n"
            parts.append(part)
            size += len(part)
            if size >= max_bytes:
                return b"".join(parts)[:max_bytes]
    if not parts:
        raise DataError(
            f"no Python sources found under the standard library at {root}; pass --data PATH instead"
        )
    return b"".join(parts)


def read_text_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"--data: no such file: {path}") from None
    except IsADirectoryError:
        raise DataError(f"--data: {path} is a directory, expected a text file") from None
    except OSError as e:
        raise DataError(f"--data: cannot read {path}: {e.strerror}") from None


def fingerprint(data: bytes) -> str:
    """A short hash of the corpus, stored in checkpoints so a resume can tell it is reading the same data."""
    return hashlib.sha256(data).hexdigest()[:16]


def split(data: bytes, block_size: int, val_fraction: float = VAL_FRACTION) -> tuple[Tensor, Tensor]:
    """Bytes -> (train, val) uint8 tensors: the last val_fraction (at least one sequence) is held out."""
    need = block_size + 1  # one input sequence plus its shifted targets
    n_val = max(int(len(data) * val_fraction), need)
    if len(data) - n_val < need:
        raise DataError(
            f"the text is too short: {len(data)} bytes, but a train and a validation split of "
            f"block_size + 1 = {need} bytes each need at least {2 * need}"
        )
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return tokens[: len(data) - n_val], tokens[len(data) - n_val :]


class BatchSampler:
    """Random (x, y) windows of a token stream, drawn from its own seeded generator.

    next() -> x, y int64 (batch_size, block_size), y = x shifted by one token. The generator's state is the
    sampler's whole state (state_dict/load_state_dict): a resumed run draws the batches it would have drawn.
    """

    def __init__(self, tokens: Tensor, block_size: int, batch_size: int, seed: int):
        if tokens.numel() < block_size + 1:
            raise DataError(
                f"BatchSampler: {tokens.numel()} tokens are fewer than block_size + 1 = {block_size + 1}"
            )
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(block_size + 1)

    def next(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(
            self.tokens.numel() - self.block_size, (self.batch_size,), generator=self.generator
        )  # (B,)
        windows = self.tokens[starts[:, None] + self._offsets].long()  # (B, T + 1)
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
