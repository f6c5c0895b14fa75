"""`gptfast train` under torchrun: 2 CPU processes on gloo against one process on the same global batch.

Each torchrun launch costs about 10 s here (three interpreters importing torch), so the fast suite launches
twice: a DDP run that stops halfway, then an FSDP run that resumes its checkpoint. Together they check that
the ranks stay identical, that the losses and the final weights match a single process, that checkpoints pass
between DDP, FSDP and a single process, and that only rank 0 logs and writes.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from gptfast import checkpoint, distributed
from gptfast.cli import main

# Same math, summed in a different order over two ranks: fp32 round-off (~1e-7 relative per op) grows to
# ~1e-6 over a few steps (measured: 3e-7 on the losses, 3e-6 on the weights after 4 steps). A rank training
# on the wrong rows, or gradients not averaged over ranks, moves the losses by ~1e-3 and the weights by about
# one learning rate (1e-3) per step.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4


@pytest.fixture
def text_file(word_corpus):
    return word_corpus(6000)


def train_args(text_file, out, *extra, device="cpu"):
    # The tiny preset, a global batch of 4 (2 rows per rank), an eval after every step: the loss curve.
    return [
        "train", "--preset", "tiny", "--data", text_file, "--out", str(out), "--device", device,
        "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--eval-every", "1", "--eval-iters", "1",
        "--save-every", "0", "--no-progress", *extra,
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2) -> str:
    """Runs `gptfast <args>` in nproc processes; returns their combined output."""
    env = {k: v for k, v in os.environ.items() if k not in (*distributed.ENV, "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores: no thread oversubscription
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "gptfast.cli", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def assert_same_losses(a: dict, b: dict, steps: int):
    """The same held-out loss before the first step and after each of the next `steps`, in two checkpoints."""
    history_a, history_b = a["metrics"]["history"][: steps + 1], b["metrics"]["history"][: steps + 1]
    assert [s for s, _ in history_a] == [s for s, _ in history_b] == list(range(steps + 1))
    losses_a, losses_b = (torch.tensor([v for _, v in h]) for h in (history_a, history_b))
    torch.testing.assert_close(losses_a, losses_b, rtol=LOSS_RTOL, atol=0)


def assert_same_run(a: dict, b: dict, steps: int):
    """Two checkpoints of one training run: the same losses and the same weights, in tolerance."""
    assert_same_losses(a, b, steps)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_two_ranks_match_one_process(tmp_path, text_file):
    assert main(train_args(text_file, tmp_path / "single")) == 0
    single = checkpoint.load(str(tmp_path / "single" / "ckpt.pt"))

    # DDP for the first half: both ranks end with the very same parameters.
    split = tmp_path / "split"
    log = torchrun(train_args(text_file, split, "--stop-after", "2"))
    assert log.count("gptfast train: preset tiny") == 1 and "2 ranks (DDP)" in log  # rank 0 logs, alone
    assert os.listdir(split) == ["ckpt.pt"]  # one writer, no temporary files left behind
    half = checkpoint.load(str(split / "ckpt.pt"))
    assert half["step"] == 2 and half["distributed"]["world_size"] == 2
    sums = half["distributed"]["parameter_sums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert_same_losses(half, single, steps=2)

    # FSDP resumes the DDP checkpoint and finishes the schedule: the same run as the single process's.
    log = torchrun(["train", "--out", str(split), "--resume", "--fsdp", "--no-progress"])
    assert "2 ranks (FSDP)" in log and log.count("resuming") == 1
    whole = checkpoint.load(str(split / "ckpt.pt"))
    assert whole["step"] == 4 and whole["distributed"]["fsdp"]
    assert_same_run(whole, single, steps=4)
    # The gathered optimizer state is torch's own format, state for state (ids in param-group order).
    assert whole["optimizer"]["param_groups"][1]["params"] == single["optimizer"]["param_groups"][1]["params"]
    for i, state in single["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(whole["optimizer"]["state"][i][key], state[key], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_fsdp_from_scratch_with_dropout_resumes_exactly(tmp_path, text_file):
    # Dropout on: each rank draws its own masks, and a resume restores every rank's RNG stream, so a run split
    # across DDP and FSDP equals an uninterrupted FSDP run (the masks differ from a single process's).
    args = ("--dropout", "0.1")
    torchrun(train_args(text_file, tmp_path / "whole", "--fsdp", *args))
    torchrun(train_args(text_file, tmp_path / "split", "--stop-after", "2", *args))
    torchrun(["train", "--out", str(tmp_path / "split"), "--resume", "--fsdp", "--no-progress"])
    whole, split = (checkpoint.load(str(tmp_path / d / "ckpt.pt")) for d in ("whole", "split"))
    assert_same_run(whole, split, steps=4)
    rng = whole["distributed"]["rng"]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])  # distinct dropout streams per rank


@pytest.mark.gpu
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_one_gpu_rank_on_nccl(tmp_path, text_file, fsdp):
    # The GPU check machine has one GPU: a 1-rank nccl job still takes the whole path (process group, DDP or
    # FSDP wrapping, the gathered checkpoint) and must train as a single process does. bf16 autocast and
    # kernels that are not bitwise reproducible between runs: 1e-2 relative on the losses.
    assert main(train_args(text_file, tmp_path / "single", device="cuda")) == 0
    mode = ["--fsdp"] if fsdp else []
    log = torchrun(train_args(text_file, tmp_path / "ranked", *mode, device="cuda"), nproc=1)
    assert f"device cuda:0, 1 ranks ({'FSDP' if fsdp else 'DDP'})" in log
    single, ranked = (checkpoint.load(str(tmp_path / d / "ckpt.pt")) for d in ("single", "ranked"))
    history = [torch.tensor([v for _, v in c["metrics"]["history"]]) for c in (single, ranked)]
    torch.testing.assert_close(history[1], history[0], rtol=1e-2, atol=0)
    assert ranked["model"].keys() == single["model"].keys()
    # One rank cannot train on the wrong rows; what this catches is wrapping or the gathered checkpoint going
    # wrong (weights off by whole updates). AdamW moves a weight by up to lr = 1e-3 per step whatever the
    # gradient's size, so bf16 noise in a near-zero gradient can move one by about that: 4 steps' worth.
    for name in single["model"]:
        torch.testing.assert_close(ranked["model"][name], single["model"][name], rtol=0, atol=4e-3, msg=name)


# ------------------------------------------------------------------------------------- in one process
def test_sharded_sampler_splits_the_global_batch():
    class Counter:
        def __init__(self):
            self.calls = 0

        def next(self):
            self.calls += 1
            x = torch.arange(12).view(6, 2) + 100 * self.calls
            return x, x + 1

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, state):
            self.calls = state["calls"]

    ranks = [distributed.Context(rank=r, world_size=3, distributed=True) for r in range(3)]
    samplers = [r.shard(Counter()) for r in ranks]
    shards = [s.next() for s in samplers]
    whole = Counter().next()
    for part in range(2):
        assert torch.equal(torch.cat([s[part] for s in shards]), whole[part])  # disjoint, in order, complete
    assert samplers[1].state_dict() == {"calls": 1}
    assert distributed.SINGLE.shard(whole) is whole  # one process: the sampler itself


def test_launch_errors_are_one_line(tmp_path, text_file, monkeypatch, capsys):
    assert main(train_args(text_file, tmp_path / "a", "--fsdp")) == 2
    assert "--fsdp shards the model over the processes torchrun starts" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(train_args(text_file, tmp_path / "b")) == 2  # refused before joining any process group
    err = capsys.readouterr().err
    assert "--batch-size 4 is the global batch; it must split evenly over the 3 processes" in err


@pytest.mark.slow
def test_captions_train_under_torchrun(tmp_path):
    # The captions task shares the text task's distributed path: DDP for one step (a run stopped early is not
    # scored), then an FSDP resume, whose test-split captioning runs on rank 0 alone from the gathered weights
    # (FSDP cannot generate sharded); and a whole DDP run, captioned by rank 0's replica.
    args = ["train", "--task", "captions", "--max-steps", "2", "--batch-size", "8", "--eval-every", "1",
            "--eval-iters", "1", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    split = tmp_path / "split"
    log = torchrun([*args, "--out", str(split), "--stop-after", "1"])
    assert "2 ranks (DDP)" in log and "test split" not in log
    log = torchrun(["train", "--out", str(split), "--resume", "--fsdp", "--no-progress"])
    assert "2 ranks (FSDP)" in log and log.count("test split, 1000 images") == 1
    log = torchrun([*args, "--out", str(tmp_path / "ddp")])
    assert "2 ranks (DDP)" in log and log.count("test split, 1000 images") == 1
    single, whole = (checkpoint.load(str(tmp_path / d / "ckpt.pt")) for d in ("single", "split"))
    assert whole["task"] == "captions" and whole["step"] == 2
    assert whole["metrics"]["test"].keys() == single["metrics"]["test"].keys()
    assert_same_run(whole, single, steps=2)
