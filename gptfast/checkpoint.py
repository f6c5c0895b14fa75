"""Atomic checkpoint files: a crash mid-save leaves the previous checkpoint whole; a damaged file is refused.

save() writes to a temporary file in the target's directory, fsyncs it, and os.replace()s it over the target
(atomic on POSIX within one filesystem), then fsyncs the directory so the rename itself is durable. load()
reads with weights_only=True (tensors and plain containers, no arbitrary pickles) and checks the format tag.
"""

import os
import tempfile

import torch

FORMAT = "gptfast-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or is not a gptfast checkpoint; the message names the file."""


def save(state: dict, path: str) -> None:
    """Writes {format, version, **state} to path atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Whatever went wrong (disk full, Ctrl-C), the previous checkpoint at `path` was never touched.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open directories; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str, map_location="cpu") -> dict:
    """The state saved by save(); CheckpointError naming `path` when it is missing, truncated or foreign."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint {path} is a directory; pass the file, e.g. {os.path.join(path, 'ckpt.pt')}"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gptfast checkpoint (no '{FORMAT}' tag)")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('version')!r}; "
            f"this gptfast reads version {VERSION}"
        )
    return state
