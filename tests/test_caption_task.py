"""The captions task: learning from the image, exact resume, `gptfast train/generate --task captions`."""

import os

import pytest
import torch

from gptfast import caption_task, captions, checkpoint
from gptfast.cli import main
from gptfast.train import TrainConfig, UsageError, resolve_config, resolve_device, train

# One layer of width 32: a few milliseconds per step, for the tests that check plumbing, not learning.
MICRO = dict(n_layer=1, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def one_thread():
    # What `gptfast train --task captions` does (caption_task.CPU_THREADS); restored for the other tests.
    threads = torch.get_num_threads()
    torch.set_num_threads(caption_task.CPU_THREADS)
    yield
    torch.set_num_threads(threads)


BASE = dict(
    task="captions",
    batch_size=8,
    max_steps=4,
    eval_every=2,
    eval_iters=1,
    save_every=0,
    progress=False,
    model_overrides=MICRO,
    task_options={"test_images": 16},
)


def config(tmp_path, **overrides) -> TrainConfig:
    return resolve_config({**BASE, "out": str(tmp_path / "run"), **overrides})


# ---------------------------------------------------------------------------------------------- learning
def test_a_short_run_captions_far_above_chance(tmp_path):
    # One shape per image, 4 layers of width 64, 300 steps of 32 images: 14-26 s on one thread of the shared
    # 2-core machine. Colour, size and position are learned by then (95-100% in four trial runs), the kind of
    # shape is on its way (46-64%); chance is 1/6, 1/2, 1/9 and 1/4. On the CPU, where the bounds were set.
    cfg = config(
        tmp_path,
        device="cpu",
        max_steps=300,
        batch_size=32,
        lr=3e-3,
        eval_every=0,
        model_overrides=dict(n_layer=4, n_head=4, n_embd=64),
        task_options={"max_shapes": 1, "test_images": 500},
    )
    scores = train(cfg)["test"]
    assert min(scores["colour"], scores["size"], scores["position"]) > 0.85, scores
    assert scores["shape"] > captions.CHANCE["shape"] + 0.15, scores


# ----------------------------------------------------------------------------------- resume, checkpoint
def test_resume_is_bit_exact(tmp_path):
    # Dropout on, so the torch RNG state matters as much as the image stream's and the optimizer's.
    whole = train(config(tmp_path / "whole", dropout=0.1))
    train(config(tmp_path / "split", dropout=0.1, stop_after=2))
    assert checkpoint.load(str(tmp_path / "split" / "run" / "ckpt.pt"))["step"] == 2
    resumed = train(config(tmp_path / "split", resume=True))  # everything else from the checkpoint
    a, b = checkpoint.load(whole["checkpoint"]), checkpoint.load(resumed["checkpoint"])
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for (k, sa), sb in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[key], sb[key]) for key in sa), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert (
        a["metrics"]["val_loss"] == b["metrics"]["val_loss"] and a["metrics"]["test"] == b["metrics"]["test"]
    )


def test_resume_finds_the_task_default_folder_and_keeps_the_saved_task_options(tmp_path, monkeypatch):
    # `gptfast train --task captions --resume` with no --out: the checkpoint is in the task's default folder,
    # and an option given again (--max-shapes) leaves the checkpoint's others (test_images 16) as they were.
    monkeypatch.chdir(tmp_path)
    stopped = train(resolve_config({**BASE, "out": caption_task.TRAIN_DEFAULTS["out"], "stop_after": 2}))
    assert stopped["step"] == 2 and stopped["test"] is None  # scored when the run is finished, not before
    assert "test" not in checkpoint.load(stopped["checkpoint"])["metrics"]
    cfg = resolve_config({"task": "captions", "resume": True, "task_options": {"max_shapes": 2}})
    assert cfg.out == caption_task.TRAIN_DEFAULTS["out"] and cfg.max_steps == 4
    assert cfg.task_options == {"test_images": 16, "max_shapes": 2}
    assert train(cfg)["test"]["images"] == 16


def test_checkpoint_records_the_task_and_rebuilds_the_model(tmp_path):
    result = train(config(tmp_path, max_steps=2))
    state = checkpoint.load(result["checkpoint"])
    assert state["task"] == "captions" and state["train_config"]["task"] == "captions"
    assert state["image"] == {
        "image_size": 32,
        "patch_size": 8,
        "channels": 3,
        "patch_pos_encoding": "sinusoidal",
    }
    assert state["data"]["spec"] == {"image_size": 32, "max_shapes": 2}
    assert state["config"]["vocab_size"] == len(captions.VOCAB) and state["metrics"]["test"] == result["test"]
    # Reloaded on the device it trained on, so that the same weights give the same captions.
    model, spec = caption_task.load_captioner(result["checkpoint"], resolve_device("auto"))
    test = captions.make_split("test", 16, spec)
    assert captions.evaluate(model, test, spec) == result["test"]


def test_resume_refuses_another_patch_size(tmp_path):
    # The resumed model is the checkpoint's (8-pixel patches): a new patch_size was ignored, then recorded.
    train(config(tmp_path, stop_after=1))
    cfg = config(tmp_path, resume=True, task_options={"test_images": 16, "patch_size": 4})
    with pytest.raises(UsageError, match="takes 8-pixel patches, these settings give patch_size=4"):
        train(cfg)


def test_bad_task_settings(tmp_path):
    with pytest.raises(UsageError, match="unknown task option.*patch"):
        train(config(tmp_path, task_options={"patch": 4}))
    with pytest.raises(UsageError, match="max_shapes must be <= 9"):
        train(config(tmp_path, task_options={"max_shapes": 10}))
    with pytest.raises(UsageError, match="--data: the captions task draws its own images"):
        train(config(tmp_path, data="corpus.txt"))
    with pytest.raises(UsageError, match="image_size 32 / patch_size 2 gives 256 patches"):
        train(config(tmp_path, task_options={"patch_size": 2}))
    with pytest.raises(UsageError, match="--task: must be one of text, captions, got 'video'"):
        train(TrainConfig(task="video"))


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`gptfast train --task captions` with the tiny preset: 2 of 4 steps, then --resume for the rest."""
    out = str(tmp_path_factory.mktemp("captions"))
    argv = ["train", "--task", "captions", "--max-steps", "4", "--batch-size", "4", "--eval-every", "2"]
    argv += ["--eval-iters", "1", "--out", out, "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(caption_task.TASK_OPTIONS, "test_images", 16)  # the default 1000 take seconds to caption
        assert main([*argv, "--stop-after", "2"]) == 0
        assert main(["train", "--out", out, "--resume", "--no-progress"]) == 0
    return out


def test_cli_trains_and_resumes_the_captions_task(trained, capsys):
    state = checkpoint.load(os.path.join(trained, "ckpt.pt"))
    assert state["task"] == "captions" and state["step"] == 4 and state["train_config"]["batch_size"] == 4
    assert state["config"]["n_embd"] == 128  # the tiny preset, over the caption vocabulary
    assert set(state["metrics"]["test"]) == {"exact_match", *captions.ATTRIBUTES, "images"}


def test_cli_generate_captions_fresh_images(trained, capsys):
    ckpt = os.path.join(trained, "ckpt.pt")
    assert main(["generate", "--checkpoint", ckpt, "--num-images", "3", "--seed", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    truths = captions.make_split("fresh", 3, captions.CaptionSpec(max_shapes=2), seed=5).captions
    assert [line.split(": ", 1)[0].strip() for line in out[:6]] == ["image 1", "true", "image 2", "true"] + [
        "image 3",
        "true",
    ]
    assert [out[i].split(": ", 1)[1].split("  [")[0] for i in (1, 3, 5)] == truths
    assert out[6].startswith("3 fresh images: exact match") and "position" in out[6]
    assert (
        main(["generate", "--task", "captions", "--checkpoint", ckpt, "--num-images", "3", "--seed", "5"])
        == 0
    )
    assert capsys.readouterr().out.splitlines() == out  # greedy: the same captions again


def _one_line_error(capsys, argv, match: str):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err


def test_cli_errors(trained, capsys, tmp_path):
    ckpt = os.path.join(trained, "ckpt.pt")
    _one_line_error(
        capsys, ["generate", "--checkpoint", ckpt, "--task", "text"], "holds a model of task 'captions'"
    )
    _one_line_error(capsys, ["generate", "--checkpoint", ckpt, "--prompt", "a"], "--prompt: a caption starts")
    _one_line_error(
        capsys, ["generate", "--checkpoint", ckpt, "--max-new-tokens", "0"], "--max-new-tokens: a caption starts"
    )
    _one_line_error(
        capsys, ["train", "--out", trained, "--resume", "--task", "text"], "trained on task 'captions'"
    )
    _one_line_error(capsys, ["train", "--max-shapes", "2"], "--max-shapes: only the captions task")
    _one_line_error(capsys, ["train", "--task", "captions", "--max-shapes", "12"], "max_shapes must be <= 9")
    _one_line_error(capsys, ["generate", "--checkpoint", ckpt, "--seed", str(2**28)], "seeds in [0, 2^28)")
    _one_line_error(capsys, ["train", "--task", "captions", "--seed", str(2**28)], "seeds in [0, 2^28)")
