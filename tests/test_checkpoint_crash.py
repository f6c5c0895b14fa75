"""Crash-safe training state (issue 7).

- A real training process SIGKILLed while it writes a checkpoint leaves the previous checkpoint loadable, and
  `gptfast train --resume` from it ends with parameters bitwise identical to an uninterrupted run over the
  same steps (on CPU, dropout on, data order and dropout seeded).
- A truncated or corrupt checkpoint is refused with a CheckpointError naming the file: every truncation, a
  flipped byte anywhere (torch's reader checks no checksum, gptfast.checkpoint does), bytes appended.

The killed run and the resume are subprocesses; the uninterrupted run trains in this process meanwhile. The
model's state is large enough (a 16384-class head: 13 MB of parameters and AdamW moments) for a save at every
step to take a fair share of the step (~80 ms of ~300 ms on a 2-core machine), so the kill lands inside one.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptfast import checkpoint
from gptfast.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# A big vocabulary makes the state big (1M embedding parameters, three copies with AdamW) and the steps cheap.
MODEL = dict(vocab_size=16384, block_size=32, n_layer=1, n_head=2, n_embd=64)
SETTINGS = dict(
    max_steps=STEPS, batch_size=4, dropout=0.1, eval_every=0, progress=False, device="cpu", seed=7
)
# The subprocesses use this process's intra-op thread count: results are bitwise reproducible for a fixed
# count, but the cpu attention backward picks its parallel decomposition (fused or split) by the count.
TRAIN = """
import sys
import torch
from gptfast.train import TrainConfig, train
torch.set_num_threads(int(sys.argv[4]))
train(TrainConfig(data=sys.argv[1], out=sys.argv[2], save_every=int(sys.argv[3]), model_overrides={model},
                  **{settings}))
"""


@pytest.fixture
def corpus(word_corpus):
    return word_corpus(3000)


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GPTFAST_BACKEND", None)
    return env


def _train(corpus, out, save_every):
    """A training subprocess; its output goes to OUT.log (shown when the test fails)."""
    script = TRAIN.format(model=MODEL, settings=SETTINGS)
    cmd = [sys.executable, "-c", script, corpus, out, str(save_every), str(torch.get_num_threads())]
    with open(out + ".log", "wb") as log:
        return subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _temps(out):
    return [n for n in os.listdir(out) if n.endswith(".tmp")] if os.path.isdir(out) else []


def _kill_during_a_save(proc, out, timeout_s=120):
    """SIGKILLs the training process `proc` (saving every step) while a temp file is being written after the
    first checkpoint exists. Returns the temp file's name, or None if the run finished first."""
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if os.path.exists(os.path.join(out, "ckpt.pt")) and _temps(out):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The temp file outliving the process shows the kill landed before the save's rename.
    temps = _temps(out)
    return temps[0] if proc.returncode == -signal.SIGKILL and temps else None


def test_sigkill_mid_save_keeps_the_previous_checkpoint_and_resume_is_bit_exact(tmp_path, corpus):
    crashed, temp, whole = None, None, None
    for attempt in range(3):  # a kill can race the save's rename; the temp file's survival tells
        crashed = str(tmp_path / f"crash{attempt}")
        proc = _train(corpus, crashed, save_every=1)
        if whole is None:  # the uninterrupted run, here, while the subprocess starts up
            whole = train(
                TrainConfig(data=corpus, out=str(tmp_path / "whole"), model_overrides=MODEL, **SETTINGS)
            )
        temp = _kill_during_a_save(proc, crashed)
        if temp:
            break
    with open(crashed + ".log") as log:
        assert temp, f"the training process was never caught writing a checkpoint:\n{log.read()}"

    # The previous checkpoint is whole; the interrupted save left a partial file that is refused by name.
    state = checkpoint.load(os.path.join(crashed, "ckpt.pt"))
    assert 1 <= state["step"] < STEPS
    with pytest.raises(checkpoint.CheckpointError, match=os.path.join(crashed, temp)):
        checkpoint.load(os.path.join(crashed, temp))

    # --resume from it runs the remaining steps and lands on the uninterrupted run's parameters, bit for bit.
    resumed = subprocess.run(
        [sys.executable, "-m", "gptfast.cli", "train", "--resume", "--out", crashed, "--no-progress",
         "--threads", str(torch.get_num_threads())],  # fmt: skip
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {os.path.join(crashed, 'ckpt.pt')} at step {state['step']}" in resumed.stdout
    assert not _temps(crashed)  # the resumed run's first save removed the dead writer's partial file
    a = checkpoint.load(whole["checkpoint"])
    b = checkpoint.load(os.path.join(crashed, "ckpt.pt"))
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for (k, sa), sb in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[key], sb[key]) for key in sa), f"optimizer state {k}"


# ------------------------------------------------------------------------------------ damaged checkpoints
@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"step": 3, "w": torch.randn(20000), "nested": {"b": torch.arange(10)}}, path)
    with open(path, "rb") as f:
        return path, f.read()


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_a_saved_checkpoint_loads_and_ends_with_its_checksum(saved):
    path, data = saved
    assert checkpoint.load(path)["step"] == 3
    assert data[-(len(checkpoint.TRAILER) + 64) :].startswith(checkpoint.TRAILER)


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -65, -64, -1])
def test_truncated_checkpoint_is_refused_naming_the_file(saved, keep):
    # Cut anywhere: nothing left, inside the zip header, halfway, just before and inside the trailer.
    path, data = saved
    n = int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(data) + keep
    _write(path, data[:n])
    with pytest.raises(checkpoint.CheckpointError, match=path):
        checkpoint.load(path)


@pytest.mark.parametrize("where", [10, 0.3, 0.6, 0.9, -70, -5])
def test_a_flipped_byte_is_refused_naming_the_file(saved, where):
    # In the zip's local header, in tensor data (torch alone would load it as a wrong weight), near the
    # central directory, in the trailer's tag and in its digest.
    path, data = saved
    i = int(len(data) * where) if isinstance(where, float) else where if where >= 0 else len(data) + where
    damaged = bytearray(data)
    damaged[i] ^= 0x01
    _write(path, bytes(damaged))
    with pytest.raises(checkpoint.CheckpointError, match=path):
        checkpoint.load(path)


def test_bytes_appended_are_refused(saved):
    path, data = saved
    _write(path, data + b"\0" * 16)
    with pytest.raises(checkpoint.CheckpointError, match=f"{path} does not end with its checksum"):
        checkpoint.load(path)


def test_a_version_1_checkpoint_without_a_checksum_still_loads(tmp_path):
    path = str(tmp_path / "old.pt")
    torch.save({"format": checkpoint.FORMAT, "version": 1, "step": 9, "w": torch.ones(3)}, path)
    assert checkpoint.load(path)["step"] == 9
