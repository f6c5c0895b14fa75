"""Atomic checkpoint files: a crash mid-save leaves the previous checkpoint whole; a damaged file is refused.

save() writes to a temporary file in the target's directory, fsyncs it, and os.replace()s it over the target
(atomic on POSIX within one filesystem), then fsyncs the directory so the rename itself is durable. The file
is torch.save's zip archive followed by a trailer, b"GPTFAST-SHA256:" and the hex SHA-256 of the archive:
torch's reader verifies no checksum (a flipped byte in a tensor loads as a wrong weight), so load() does,
before reading with weights_only=True (tensors and plain containers, no arbitrary pickles) and checking the
format tag. torch's zip reader finds the archive's directory from the end and ignores the trailer after it.

Version 1 files (no trailer) still load, unverified.
"""

import hashlib
import os
import tempfile

import torch

FORMAT = "gptfast-checkpoint"
VERSION = 2
READS = (1, 2)
TRAILER = b"GPTFAST-SHA256:"
_TRAILER_SIZE = len(TRAILER) + 64
_CHUNK = 1 << 24


class _HashingWriter:
    """A write-only file for torch.save that hashes what it writes."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or is not a gptfast checkpoint; the message names the file."""


def save(state: dict, path: str) -> None:
    """Writes {format, version, **state} to path atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_dead_writers_temps(directory, os.path.basename(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path, os.getpid()), suffix=".tmp")
    try:
        # mkstemp makes the file 0600 whatever the umask; the checkpoint gets an ordinary file's mode, so that
        # other users or nodes reading a shared --out (gptfast generate, a resume) still can.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save({"format": FORMAT, "version": VERSION, **state}, writer)
            f.write(TRAILER + writer.sha.hexdigest().encode())
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


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask sets it: put it straight back
    os.umask(mask)
    return mask


def _temp_prefix(path: str, pid: int) -> str:
    # The writer's PID (and, on Linux, its start time) in the name tells a later save whether a leftover temp
    # file's writer is still alive: a PID alone comes back in another process (PID 1 in every restarted
    # container), which would keep a dead writer's checkpoint-sized file forever.
    start = _start_time(pid)
    return f".{os.path.basename(path)}.{pid}{'' if start is None else '-' + start}."


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _remove_dead_writers_temps(directory: str, name: str) -> None:
    """Deletes the partial temp files that killed writers (SIGKILL, power loss) left beside `name`.

    A live writer's temp file is left alone; the PID test is this host's, so on storage shared between
    hosts only one of them should write a given checkpoint (rank 0 does).
    """
    stem = f".{name}."
    for entry in os.listdir(directory):
        if not (entry.startswith(stem) and entry.endswith(".tmp")):
            continue
        pid, _, start = entry[len(stem) :].split(".", 1)[0].partition("-")
        if not pid.isdigit() or _alive(int(pid), start or None):
            continue
        try:
            os.unlink(os.path.join(directory, entry))
        except FileNotFoundError:
            pass


def _alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` runs, and is the one that started at `start` (when the name recorded it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return start is None or _start_time(pid) in (None, start)


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


def _verify(path: str) -> bool:
    """Checks the trailer's SHA-256 against the archive before it; False when there is no trailer."""
    size = os.path.getsize(path)
    if size < _TRAILER_SIZE:
        return False
    with open(path, "rb") as f:
        f.seek(size - _TRAILER_SIZE)
        tail = f.read()
        if not tail.startswith(TRAILER):
            return False
        f.seek(0)
        sha, left = hashlib.sha256(), size - _TRAILER_SIZE
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    if sha.hexdigest().encode() != tail[len(TRAILER):]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its SHA-256 does not match the one saved with it "
            "(the file changed after it was written)"
        )
    return True


def load(path: str, map_location="cpu") -> dict:
    """The state saved by save(); CheckpointError naming `path` when it is missing, truncated, corrupt or
    foreign."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint {path} is a directory; pass the file, e.g. {os.path.join(path, 'ckpt.pt')}"
        )
    verified = _verify(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gptfast checkpoint (no '{FORMAT}' tag)")
    if state.get("version") not in READS:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('version')!r}; "
            f"this gptfast reads versions {', '.join(map(str, READS))}"
        )
    if state["version"] >= 2 and not verified:
        raise CheckpointError(
            f"checkpoint {path} does not end with its checksum trailer (truncated, or appended to?)"
        )
    return state
