"""The captions task end to end: what `gptfast train/generate --task captions` run.

train_captions(cfg) trains a MultimodalGPT (the preset's GPT over the caption vocabulary, captions.VOCAB, with
a PatchEmbed in front) on the unbounded train stream (captions.CaptionSampler) with train.Trainer, so the
progress bar, the held-out loss (on the fixed "val" split), atomic checkpoints and bit-exact resume are the
text task's. At the end it captions the "test" split greedily and reports exact-match and per-attribute
accuracy; the checkpoint keeps them in metrics["test"].

cfg.task_options holds the task's own settings (TASK_OPTIONS: image_size, max_shapes, patch_size,
test_images); TRAIN_DEFAULTS are the TrainConfig settings in which captions differ from text.
"""

import dataclasses
import time

import torch

from . import backends, captions, checkpoint, distributed
from .captions import CaptionSpec
from .model import GPTConfig
from .multimodal import MultimodalGPT
from .train import TrainConfig, Trainer, UsageError, check_out, model_config

# 1000 steps of 64 images of one or two shapes reach >= 90% on every attribute of the test split (README).
TRAIN_DEFAULTS = {
    "max_steps": 1000,
    "batch_size": 64,
    "eval_every": 250,
    "eval_iters": 4,
    "save_every": 250,
    "out": "runs/captions",
}
TASK_OPTIONS = {"image_size": 32, "max_shapes": 2, "patch_size": 8, "test_images": 1000}
VAL_IMAGES = 256
# `gptfast train --task captions` runs its ops on one CPU thread unless --threads says otherwise. The model's
# ops are small (64 x 25 positions x 128 channels), so on a shared machine two threads mostly wait for each
# other. Measured on the shared 2-core machine: 200 default steps took 75 s on two threads and 55 s on one
# (load average 2-3.5); at load average 5-7 a step took 1.3-2.9 s on two threads and 0.33-0.45 s on one.
CPU_THREADS = 1
FRESH_IMAGES = 8  # what `gptfast generate --task captions` captions by default


def resolve_options(options: dict) -> dict:
    """TASK_OPTIONS with the given ones over them; UsageError for an unknown name or a bad value."""
    unknown = set(options) - set(TASK_OPTIONS)
    if unknown:
        raise UsageError(
            f"captions: unknown task option(s) {', '.join(sorted(unknown))}; known: {', '.join(TASK_OPTIONS)}"
        )
    merged = {**TASK_OPTIONS, **options}
    for name, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"captions: {name} must be a positive int, got {value!r}")
    return merged


def check_seed(seed: int) -> None:
    """A seed must fit below the split's bits of the generator seed (captions.split_seed)."""
    if not 0 <= seed < 2**captions.SEED_BITS:
        raise UsageError(f"--seed: the captions task takes seeds in [0, 2^{captions.SEED_BITS}), got {seed}")


def build_captioner(cfg: TrainConfig, options: dict, saved: dict | None = None) -> MultimodalGPT:
    """The run's MultimodalGPT: a checkpoint's (`saved`: its state) or cfg.preset's GPT with the caption
    vocabulary, cfg's overrides and `options`' image geometry (train.model_config). Weights not loaded."""
    if saved is not None:
        return MultimodalGPT(model_config(cfg, saved["config"]), **saved["image"])
    config = model_config(cfg, vocab_size=len(captions.VOCAB))
    try:
        return MultimodalGPT(config, options["image_size"], options["patch_size"])
    except ValueError as e:
        raise UsageError(str(e)) from None


def model_from_checkpoint(state: dict, **runtime) -> tuple[MultimodalGPT, CaptionSpec]:
    """The MultimodalGPT and CaptionSpec a captions checkpoint describes; runtime overrides GPTConfig fields
    that do not change the weights (backend, fused_loss, dropout). The weights are not loaded here."""
    config = GPTConfig(**{**state["config"], **runtime})
    return MultimodalGPT(config, **state["image"]), CaptionSpec(**state["data"]["spec"])


def _load(path: str, what: str) -> dict:
    """A captions checkpoint's state; UsageError (prefixed by `what`) when unreadable or of another task."""
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"{what}: {e}") from None
    if state.get("task", "text") != "captions":
        raise UsageError(f"{what}: {path} holds a {state.get('task', 'text')!r} model, not a captions one")
    return state


def train_captions(
    cfg: TrainConfig, device: torch.device, ctx: distributed.Context = distributed.SINGLE
) -> dict:
    """Trains (or with cfg.resume continues) a MultimodalGPT on the captions task, then scores the test split.

    train.train calls it with the resolved device and this process's place in a torchrun job (ctx): the
    model is wrapped in DDP or FSDP2 and every rank trains on its shard of each global batch, as for text.
    Returns Trainer.run's result with "test" (captions.score's dict), "train_seconds" and "is_main" added.
    """
    if cfg.data is not None:
        raise UsageError("--data: the captions task draws its own images; leave --data out")
    check_seed(cfg.seed)
    state = _load(cfg.checkpoint_path(), "--resume") if cfg.resume else None
    options = resolve_options(cfg.task_options)
    try:
        spec = CaptionSpec(options["image_size"], options["max_shapes"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_out(cfg)

    torch.manual_seed(cfg.seed)  # model init; on resume the RNG state is restored from the checkpoint below
    if state is not None and state["data"]["spec"] != spec.to_dict():
        raise UsageError(
            f"--resume: the checkpoint was trained on {state['data']['spec']}, these settings give "
            f"{spec.to_dict()}"
        )
    saved_patch = state["image"].get("patch_size") if state is not None else None
    if saved_patch is not None and options["patch_size"] != saved_patch:
        # The model is rebuilt from the checkpoint's geometry: another patch size would be ignored, and then
        # recorded in the new checkpoint's settings against the model it holds.
        raise UsageError(
            f"--resume: the checkpoint's model takes {saved_patch}-pixel patches, these settings give "
            f"patch_size={options['patch_size']}"
        )
    model = build_captioner(cfg, options, state)
    model.to(device)
    ctx.seed(cfg.seed)
    sampler = ctx.shard(captions.CaptionSampler(spec, cfg.batch_size, cfg.seed))
    val = captions.make_split("val", VAL_IMAGES, spec)
    extra = {
        "task": "captions",
        "config": dataclasses.replace(model.config, backend=None).to_dict(),
        "image": model.image_config(),
        "data": {"spec": spec.to_dict(), "vocab": list(captions.VOCAB)},
    }
    trainer = Trainer(
        ctx.wrap(model, device),
        sampler,
        lambda: ctx.shard(captions.SplitSampler(val, cfg.batch_size)),
        cfg,
        device,
        extra,
        ctx,
    )
    if state is not None:
        trainer.load_state_dict(state)

    log = print if ctx.is_main else (lambda *args, **kwargs: None)  # rank 0 speaks for the job
    shapes = "one shape" if spec.max_shapes == 1 else f"1 to {spec.max_shapes} shapes"
    ranks = f", {ctx.world_size} ranks ({'FSDP' if ctx.fsdp else 'DDP'})" if ctx.distributed else ""
    log(
        f"gptfast train --task captions: preset {cfg.preset}, {model.num_parameters() / 1e6:.2f}M params, "
        f"backend {backends.select('attention', device, cfg.backend)}, device {device}{ranks}",
        flush=True,
    )
    log(
        f"data: {spec.image_size}x{spec.image_size} images of {shapes}, "
        f"{model.num_patches} patches of {model.patch_embed.patch_size}x{model.patch_embed.patch_size} + "
        f"{spec.seq_len} caption tokens; a fresh train stream, {VAL_IMAGES} val / {options['test_images']} "
        "test images",
        flush=True,
    )
    if state is not None:
        log(f"resuming {cfg.checkpoint_path()} at step {trainer.step} of {cfg.max_steps}", flush=True)
    start_step, start = trainer.step, time.perf_counter()
    result = trainer.run()
    seconds = time.perf_counter() - start
    log(f"trained steps {start_step}..{result['step']} in {seconds:.0f} s", flush=True)

    scores = None
    if result["step"] == cfg.max_steps:  # a run stopped early (stop_after) is scored when it is resumed
        test = captions.make_split("test", options["test_images"], spec)
        scorer = _unsharded(model, trainer.model, ctx, device)  # collective under FSDP; None off rank 0
        if scorer is not None:
            scores = captions.evaluate(scorer, test, spec)
            trainer.metrics["test"] = scores
        trainer.save()  # the end-of-run checkpoint again, now with the test scores
        if scores is not None:
            log(f"test split, {len(test)} images: {captions.format_scores(scores)}", flush=True)
    log(f"saved {result['checkpoint']} at step {result['step']}", flush=True)
    return {**result, "test": scores, "train_seconds": seconds, "is_main": ctx.is_main}


def _unsharded(model: MultimodalGPT, trained, ctx: distributed.Context, device) -> MultimodalGPT | None:
    """On rank 0, a plain model with the trained weights, to caption the test split alone; None elsewhere.

    Generation calls the model's parts directly, which FSDP2 cannot run sharded (its all-gathers hang off the
    root forward), so under FSDP rank 0 captions with a fresh copy of the gathered full state dict.
    """
    if not ctx.fsdp:
        return model if ctx.is_main else None
    state = ctx.model_state_dict(trained)  # every rank joins the gather; rank 0 receives it
    if not ctx.is_main:
        return None
    copy = MultimodalGPT(dataclasses.replace(model.config), **model.image_config())
    copy.load_state_dict(state)
    return copy.to(device)


# ------------------------------------------------------------------------------------------- generate
def load_captioner(
    path: str, device: torch.device | str = "cpu", backend: str | None = None
) -> tuple[MultimodalGPT, CaptionSpec]:
    """The trained MultimodalGPT of a captions checkpoint (eval mode, on device) and its CaptionSpec."""
    return captioner_from_state(_load(path, "--checkpoint"), path, device, backend)


def captioner_from_state(
    state: dict, path: str, device: torch.device | str = "cpu", backend: str | None = None
) -> tuple[MultimodalGPT, CaptionSpec]:
    """load_captioner for a checkpoint already read from `path`."""
    if state.get("task", "text") != "captions":
        raise UsageError(
            f"--checkpoint: {path} holds a {state.get('task', 'text')!r} model, not a captions one"
        )
    model, spec = model_from_checkpoint(state, backend=backend)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), spec


def caption_fresh_images(
    model: MultimodalGPT,
    spec: CaptionSpec,
    n_images: int = FRESH_IMAGES,
    seed: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> str:
    """Captions n_images new images (the "fresh" split, drawn from `seed`): each generated caption beside the
    true one, then the accuracy over these images."""
    batch = captions.make_split("fresh", n_images, spec, seed)
    torch.manual_seed(seed)  # sampling, when temperature > 0
    predicted = captions.generate_captions(model, batch.images, spec, temperature=temperature, top_k=top_k)
    lines = []
    for i, (guess, truth, shapes) in enumerate(zip(predicted, batch.captions, batch.scenes.attributes())):
        hits = captions.attribute_hits(guess, shapes)
        wrong = [name for name in captions.ATTRIBUTES if hits[name] < len(shapes)]
        verdict = "right" if guess == truth else f"wrong: {', '.join(wrong) or 'wording'}"
        label = f"image {i + 1}"
        lines.append(f"{label}: {guess}")
        lines.append(f"{'true':>{len(label)}}: {truth}  [{verdict}]")
    lines.append(f"{n_images} fresh images: {captions.format_scores(captions.score(predicted, batch))}")
    return "\n".join(lines)
