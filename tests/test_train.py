"""Training: schedule, optimizer groups, data, atomic checkpoints, corrupt-file refusal, bit-exact resume."""

import os
import subprocess
import sys

import pytest
import torch

from gptfast import backends, checkpoint, data
from gptfast.train import Trainer, TrainConfig, UsageError, lr_at, make_optimizer, train
from gptfast.model import GPT, GPTConfig

# A model small enough for a few steps per second on a loaded 2-core machine.
MICRO = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def text_file(word_corpus):
    return word_corpus(3000)


def micro_config(tmp_path, text_file, **overrides) -> TrainConfig:
    base = dict(
        data=text_file,
        out=str(tmp_path / "run"),
        batch_size=4,
        max_steps=6,
        eval_every=3,
        eval_iters=2,
        save_every=0,
        progress=False,
        model_overrides=MICRO,
    )
    return TrainConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------ schedule, AdamW
def test_lr_schedule_warms_up_then_follows_a_cosine():
    cfg = TrainConfig(lr=1e-3, max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # (step + 1) / warmup of the peak
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # the cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)  # halfway: the mean of peak and floor
    assert lr_at(110, cfg) == pytest.approx(1e-4)  # ends at peak * min_lr_ratio
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=50, **MICRO))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    n_params = len({id(p) for p in model.parameters()})
    assert len(decayed["params"]) + len(plain["params"]) == n_params  # the tied head once, nothing missed


# ------------------------------------------------------------------------------------------------ data
def test_stdlib_corpus_is_deterministic_and_capped():
    a, b = data.stdlib_corpus(200_000), data.stdlib_corpus(200_000)
    assert a == b and len(a) == 200_000
    assert a.startswith(b"# file: ") and b"def " in a


def test_split_and_sampler():
    text = bytes(range(256)) * 10
    train_tokens, val_tokens = data.split(text, block_size=16)
    assert train_tokens.numel() + val_tokens.numel() == len(text) and val_tokens.numel() == 256
    sampler = data.BatchSampler(train_tokens, 16, 3, seed=4)
    x, y = sampler.next()
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    state = sampler.state_dict()
    expected = sampler.next()
    sampler.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(sampler.next(), expected))


def test_too_short_text_is_refused():
    with pytest.raises(data.DataError, match="too short: 40 bytes.*at least 66"):
        data.split(b"x" * 40, block_size=32)


def test_encode_decode_round_trip():
    assert data.decode(data.encode("héllo ✓")) == "héllo ✓"
    assert data.decode([104, 0xC3]) == "h\ufffd"  # a sample cut mid-character does not raise


# ------------------------------------------------------------------------------------------- checkpoints
def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial bytes")  # a crash mid-write leaves a half-written temp file behind
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temp file was removed


def test_save_removes_only_dead_writers_temp_files(tmp_path):
    # A SIGKILLed writer leaves .ckpt.pt.<pid>.<random>.tmp behind; the next save deletes it, but not the
    # temp file of a writer that is still alive (this process), nor other checkpoints' or unrelated files.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ckpt.pt.{dead.pid}.abc.tmp"
    live = tmp_path / f".ckpt.pt.{os.getpid()}.def.tmp"
    other = tmp_path / f".other.pt.{dead.pid}.ghi.tmp"
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("keep")
    checkpoint.save({"step": 1}, str(tmp_path / "ckpt.pt"))
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", live.name, other.name, "notes.txt"])


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="needs Linux's /proc")
def test_save_removes_a_dead_writers_temp_file_whose_pid_came_back(tmp_path):
    # A writer records its start time beside its PID: a temp file named with this live PID but another
    # start time was left by a dead writer whose PID was reused (PID 1 in a restarted container), and goes.
    reused = tmp_path / f".ckpt.pt.{os.getpid()}-1.abc.tmp"
    live = tmp_path / checkpoint._temp_prefix(str(tmp_path / "ckpt.pt"), os.getpid())
    live = live.with_name(live.name + "def.tmp")
    for f in (reused, live):
        f.write_bytes(b"partial")
    checkpoint.save({"step": 1}, str(tmp_path / "ckpt.pt"))
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", live.name])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"step": 1, "w": torch.randn(1000)}, path)
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"not a checkpoint at all")
    else:
        torch.save({"weights": torch.ones(2)}, path)  # a torch file, but not ours
    with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path)):
        checkpoint.load(path)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found: .*nope.pt"):
        checkpoint.load(str(tmp_path / "nope.pt"))


# ----------------------------------------------------------------------------------------------- train
def test_training_lowers_the_loss(tmp_path, text_file):
    result = train(micro_config(tmp_path, text_file, max_steps=30, eval_every=30, lr=3e-3))
    state = checkpoint.load(result["checkpoint"])
    (first_step, first), (last_step, last) = state["metrics"]["history"][0], state["metrics"]["history"][-1]
    assert (first_step, last_step) == (0, 30)
    assert last < first - 1.0, (first, last)


def test_resume_is_bit_exact(tmp_path, text_file):
    # Dropout on, so the torch RNG state matters as much as the sampler's and the optimizer's.
    common = dict(dropout=0.1, max_steps=6)
    whole = train(micro_config(tmp_path / "whole", text_file, **common))
    train(micro_config(tmp_path / "split", text_file, stop_after=3, **common))
    stopped = checkpoint.load(str(tmp_path / "split" / "run" / "ckpt.pt"))
    assert stopped["step"] == 3
    assert stopped["metrics"]["train_loss"] is None  # none logged by step 3 uninterrupted (a 10-step window)
    resumed = train(micro_config(tmp_path / "split", text_file, resume=True, **common))
    assert resumed["step"] == whole["step"] == 6
    a, b = checkpoint.load(whole["checkpoint"]), checkpoint.load(resumed["checkpoint"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for (k, sa), sb in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[key], sb[key]) for key in sa), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["metrics"]["val_loss"] == b["metrics"]["val_loss"]
    # The stop (step 3) falls inside a log window (10 steps): its partial window is saved, so the train loss
    # logged at the end averages the same six steps (it averaged only the resumed three before).
    assert a["metrics"]["train_loss"] == b["metrics"]["train_loss"]
    assert a["metrics"]["history"] == b["metrics"]["history"]


def test_overwrite_starts_a_new_run_over_an_old_checkpoint(tmp_path, text_file):
    train(micro_config(tmp_path, text_file, max_steps=2, seed=1))
    with pytest.raises(UsageError, match="already holds a checkpoint.*--resume.*--overwrite"):
        train(micro_config(tmp_path, text_file, max_steps=1, seed=2))
    result = train(micro_config(tmp_path, text_file, max_steps=1, seed=2, overwrite=True))
    assert checkpoint.load(result["checkpoint"])["step"] == 1


@pytest.mark.parametrize(
    "setting, match",
    [
        # Each of these ran without an error before: NaN losses, a NaN checkpoint, or gradient ascent.
        (dict(batch_size=0), "--batch-size: must be >= 1, got 0"),
        (dict(eval_iters=0), "--eval-iters: must be >= 1"),
        (dict(max_steps=0), "--max-steps: must be >= 1"),
        (dict(lr=float("inf")), "--lr: must be finite and >= 0.0, got inf"),
        (dict(min_lr_ratio=-1.0), r"--min-lr-ratio: must be in \[0.0, 1.0\], got -1.0"),
        (dict(warmup_steps=-3), "--warmup-steps: must be >= 0"),
        (dict(weight_decay=float("nan")), "--weight-decay: must be finite"),
        (dict(beta2=1.0), r"--beta2: must be in \[0.0, 1.0\)"),
        (dict(seed=2**64), "--seed: must be in"),
        (dict(log_every=1.5), "--log-every: must be an integer"),
    ],
)
def test_bad_settings_are_refused_by_the_api(tmp_path, text_file, setting, match, monkeypatch):
    monkeypatch.setattr(Trainer, "train_step", _no_step)
    with pytest.raises(UsageError, match=match):
        train(micro_config(tmp_path, text_file, **setting))


def _no_step(*args):
    raise AssertionError("the settings must be refused before any step")


def test_backend_without_dropout_is_refused_before_any_step(tmp_path, text_file, monkeypatch):
    if backends.why_not("cpu", "attention", torch.device("cpu")) is not None:
        pytest.skip("the cpu backend is not built here")
    monkeypatch.setattr(Trainer, "evaluate", _no_step)
    with pytest.raises(UsageError, match="--backend cpu with --dropout 0.1: .*dropout"):
        train(micro_config(tmp_path, text_file, backend="cpu", dropout=0.1))


def test_checkpoint_has_an_ordinary_file_mode(tmp_path):
    # mkstemp's 0600 had locked other users (a shared --out) out of every checkpoint.
    old = os.umask(0o022)
    try:
        checkpoint.save({"step": 1}, str(tmp_path / "ckpt.pt"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "ckpt.pt").st_mode & 0o777 == 0o644


def test_checkpoint_holds_what_resume_needs(tmp_path, text_file):
    result = train(micro_config(tmp_path, text_file, max_steps=2))
    state = checkpoint.load(result["checkpoint"])
    assert {"model", "optimizer", "step", "rng", "config", "train_config", "data"} <= set(state)
    assert {"torch", "cuda", "sampler"} <= set(state["rng"])
    assert state["config"]["block_size"] == MICRO["block_size"] and state["config"]["backend"] is None
