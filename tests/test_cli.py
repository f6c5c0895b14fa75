"""The gptfast command: train / resume / generate end to end, and one-line errors with exit status 2."""

import os
import subprocess
import sys

import pytest
import torch

from gptfast import checkpoint
from gptfast.cli import main


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """A tiny-preset run of 3 steps (of a 5-step schedule), saved: what the other CLI tests start from."""
    out = str(tmp_path_factory.mktemp("run"))
    argv = [
        "train",
        "--preset",
        "tiny",
        "--data",
        text_file,
        "--max-steps",
        "5",
        "--stop-after",
        "3",
        "--batch-size",
        "2",
        "--eval-every",
        "3",
        "--eval-iters",
        "1",
        "--out",
        out,
        "--seed",
        "3",
        "--no-progress",
    ]
    assert main(argv) == 0
    return out


def test_train_saves_a_checkpoint(trained, capsys):
    state = checkpoint.load(os.path.join(trained, "ckpt.pt"))
    assert (
        state["step"] == 3 and state["train_config"]["max_steps"] == 5 and state["train_config"]["seed"] == 3
    )


def test_resume_continues_with_the_saved_settings(trained, capsys):
    # Only --out and --resume: batch size, seed, data and schedule come from the checkpoint.
    assert main(["train", "--out", trained, "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "at step 3 of 5" in out
    state = checkpoint.load(os.path.join(trained, "ckpt.pt"))
    assert (
        state["step"] == 5 and state["train_config"]["batch_size"] == 2 and state["train_config"]["seed"] == 3
    )


def test_generate_prints_text(trained, capsys):
    ckpt = os.path.join(trained, "ckpt.pt")
    assert (
        main(["generate", "--checkpoint", ckpt, "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1"])
        == 0
    )
    first = capsys.readouterr().out
    assert first.startswith("def ") and len(first.encode()) >= 4 + 1  # the prompt, sampled bytes, a newline
    assert (
        main(["generate", "--checkpoint", ckpt, "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1"])
        == 0
    )
    assert capsys.readouterr().out == first  # same seed, same text


def test_console_script_end_to_end(tmp_path):
    # The real entry point in a fresh process, on the embedded stdlib corpus: train 2 steps, then sample.
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "gptfast.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = str(tmp_path / "run")
    r = run(
        "train", "--max-steps", "2", "--batch-size", "2", "--eval-iters", "1", "--out", out, "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "standard library" in r.stdout and "val loss" in r.stdout and "saved" in r.stdout
    assert os.path.exists(os.path.join(out, "ckpt.pt"))
    r = run("generate", "--checkpoint", os.path.join(out, "ckpt.pt"), "--max-new-tokens", "10")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


# ---------------------------------------------------------------------------------------------- errors
def _one_line_error(capsys, argv, match: str):
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and match in err, err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--max-steps", "-1"], "--max-steps: must be >= 1, got -1"),
        (["train", "--max-steps", "ten"], "expected an integer, got 'ten'"),
        (["train", "--lr", "fast"], "expected a number"),
        (["train", "--dropout", "1.5"], "--dropout: must be in [0.0, 1.0)"),
        (["train", "--preset", "huge"], "invalid choice: 'huge'"),
        (["train", "--backend", "metal"], "invalid choice: 'metal'"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate"], "the following arguments are required: --checkpoint"),
        (["generate", "--checkpoint", "x.pt", "--top-k", "0"], "--top-k: must be >= 1"),
        (["train", "--lr", "inf"], "--lr: must be finite, got inf"),  # trained to NaN, exit 0, before
        (["train", "--weight-decay", "1e400"], "--weight-decay: must be finite"),
        (["train", "--seed", "18446744073709551615"], "--seed: must be in [0, 9223372036854775806]"),
        (["generate", "--checkpoint", "x.pt", "--seed", str(2**64)], "--seed: must be in [0,"),
        ([], "the following arguments are required"),
        (["fly"], "invalid choice: 'fly'"),
    ],
)
def test_bad_arguments(capsys, argv, match):
    _one_line_error(capsys, argv, match)


def test_missing_files(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "none.txt")], f"no such file: {tmp_path}")
    _one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path / "none.pt")], "checkpoint not found")
    _one_line_error(capsys, ["train", "--out", str(tmp_path), "--resume"], "--resume: checkpoint not found")


def test_corrupt_checkpoint(capsys, trained, tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(open(os.path.join(trained, "ckpt.pt"), "rb").read()[:1000])  # truncated
    _one_line_error(capsys, ["generate", "--checkpoint", str(bad)], f"cannot read checkpoint {bad}")


def test_too_short_data(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hello")
    _one_line_error(capsys, ["train", "--data", str(short)], "too short: 5 bytes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_new_run_over_an_existing_checkpoint_is_refused(capsys, trained, tmp_path):
    # It used to replace the earlier run's checkpoint without a word.
    before = open(os.path.join(trained, "ckpt.pt"), "rb").read()
    _one_line_error(capsys, ["train", "--out", trained, "--max-steps", "1"], "already holds a checkpoint")
    assert open(os.path.join(trained, "ckpt.pt"), "rb").read() == before


def test_unwritable_out_is_refused_before_training(capsys, tmp_path):
    # Found only at the first save (after the whole run's steps) before, as a traceback.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, ["train", "--out", str(blocker / "run")], f"--out {blocker / 'run'}: cannot create")


def test_unavailable_device_and_backend(capsys):
    _one_line_error(capsys, ["train", "--device", "cuda"], "CUDA is not available")
    _one_line_error(capsys, ["train", "--backend", "cuda"], "--backend cuda: cannot run")


def test_bench_without_the_harness(capsys, monkeypatch):
    # Until gptfast.bench.cli exists (or when it is missing from an install): one clear line, status 2.
    monkeypatch.setitem(sys.modules, "gptfast.bench.cli", None)
    code = main(["bench", "--quick"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "gptfast.bench.cli" in err
