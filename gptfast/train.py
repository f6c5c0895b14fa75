"""Training: AdamW, cosine schedule with warmup, gradient clipping, bf16 autocast on CUDA, held-out eval loss,
atomic checkpoints, and resume that continues bit for bit.

train(TrainConfig(...)) trains a GPT on text (the embedded stdlib corpus or a file), or with task="captions" a
MultimodalGPT on procedural images (gptfast.caption_task). The loop itself is the Trainer, which works for any
model called as model(*batch) -> (logits, loss) with batches from a sampler that has next(), state_dict() and
load_state_dict() (see data.BatchSampler).

Resume is exact: the checkpoint holds the model, the optimizer, the step (the schedule is a pure function of
it), torch's CPU (and CUDA) RNG state, which drives dropout, and the data sampler's generator. Eval draws from
its own fixed-seed sampler and touches no shared RNG, so evaluating or saving never perturbs training.
"""

import dataclasses
import math
import os
import sys
import time
from typing import Callable

import torch
from tqdm import tqdm

from . import backends, checkpoint, data, distributed
from .data import DEFAULT_CORPUS_BYTES
from .model import GPT, GPTConfig

CHECKPOINT_NAME = "ckpt.pt"
DEFAULT_LR = {"tiny": 2e-3, "gpt2": 6e-4, "gpt2-medium": 3e-4}
TASKS = ("text", "captions")


class UsageError(ValueError):
    """A bad setting or input file; the CLI prints it as one line and exits with status 2."""


@dataclasses.dataclass
class TrainConfig:
    task: str = "text"  # or "captions": see gptfast.caption_task
    preset: str = "tiny"
    data: str | None = None  # a text file; None trains on the embedded stdlib corpus
    corpus_bytes: int = DEFAULT_CORPUS_BYTES
    max_steps: int = 200  # the schedule's length
    stop_after: int | None = None  # stop (and save) after this many steps, keeping max_steps' schedule
    batch_size: int = 16
    lr: float | None = None  # peak learning rate; None takes DEFAULT_LR for the preset
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int | None = None  # None: 10% of max_steps, at most 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    dropout: float | None = None  # None keeps the preset's
    fused_loss: bool = False
    eval_every: int = 50
    eval_iters: int = 8
    save_every: int = 100  # 0 saves only at the end
    log_every: int = 10
    out: str = "runs/demo"
    seed: int = 1337
    device: str = "auto"
    backend: str | None = None
    resume: bool = False
    overwrite: bool = False  # a new run where out/ckpt.pt exists replaces it; else that is refused
    progress: bool = True
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP (see gptfast.distributed)
    model_overrides: dict = dataclasses.field(default_factory=dict)  # GPTConfig fields over the preset's
    task_options: dict = dataclasses.field(default_factory=dict)  # another task's settings, e.g. max_shapes

    # What a resume does not take from the checkpoint: where and how this process runs, not what it computes.
    NOT_RESUMED = ("out", "device", "backend", "resume", "overwrite", "progress", "stop_after", "fsdp")

    def validate(self) -> None:
        """UsageError naming the first setting out of range (the CLI checks them too; this covers the API),
        since each of these trained to NaN, ascended the gradient or wrote nothing without an error."""
        ints = {"max_steps": 1, "batch_size": 1, "eval_every": 0, "eval_iters": 1, "save_every": 0,
                "log_every": 1, "corpus_bytes": 1}
        for name, low in ints.items():
            _check_number(name, getattr(self, name), low, integer=True)
        if self.stop_after is not None:
            _check_number("stop_after", self.stop_after, 1, integer=True)
        if self.warmup_steps is not None:
            _check_number("warmup_steps", self.warmup_steps, 0, integer=True)
        _check_number("seed", self.seed, 0, MAX_SEED, integer=True)
        if self.lr is not None:
            _check_number("lr", self.lr, 0.0)
        _check_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_number("weight_decay", self.weight_decay, 0.0)
        _check_number("grad_clip", self.grad_clip, 0.0)
        for name in ("beta1", "beta2"):
            _check_number(name, getattr(self, name), 0.0, 1.0, high_open=True)
        if self.dropout is not None:
            _check_number("dropout", self.dropout, 0.0, 1.0, high_open=True)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.preset, 6e-4)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, min(100, self.max_steps // 10))

    def checkpoint_path(self) -> str:
        return os.path.join(self.out, CHECKPOINT_NAME)


MAX_SEED = 2**63 - 2  # torch seeds are 64-bit signed, and the held-out batches take seed + 1


def _check_number(name: str, value, low, high=None, high_open: bool = False, integer: bool = False) -> None:
    flag = "--" + name.replace("_", "-")
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise UsageError(f"{flag}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (math.isfinite(value) and value >= low) or too_high:
        bound = f"in [{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        bound = bound if integer or high is not None else f"finite and {bound}"
        raise UsageError(f"{flag}: must be {bound}, got {value!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to the peak over cfg.warmup steps, then a cosine to peak * min_lr_ratio at max_steps."""
    peak, warmup = cfg.peak_lr, cfg.warmup
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    floor = peak * cfg.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: gptfast trains on cpu or cuda devices")
    return device


def check_backend(name: str | None, device: torch.device) -> None:
    """Refuses up front a named backend that cannot run the model's ops on `device`."""
    if name is None:
        return
    for op in ("attention", "cross_entropy", "softmax"):
        reason = backends.why_not(name, op, device)
        if reason:
            raise UsageError(f"--backend {name}: cannot run {op} on {device.type}: {reason}")


def check_out(cfg: TrainConfig) -> None:
    """Refuses, before any step, an --out that would lose an earlier run's checkpoint or that the first save
    would fail on (after the whole run's compute)."""
    path = cfg.checkpoint_path()
    if not (cfg.resume or cfg.overwrite) and os.path.exists(path):
        raise UsageError(
            f"--out {cfg.out}: {path} already holds a checkpoint; pass --resume to continue that run, or "
            "--overwrite to start a new one over it"
        )
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {cfg.out}: cannot create the output directory ({e.strerror or e})") from None
    if not os.access(cfg.out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {cfg.out}: the output directory is not writable")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-d parameters (matrices, embeddings), not on biases or LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied head is one parameter, listed once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )


def rng_state(device: torch.device) -> dict:
    """torch's CPU RNG state and, on CUDA, that of this process's own GPU only: a resume on a machine (or a
    rank) that sees a different set of GPUs must still be able to restore it."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints kept every visible GPU's state
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


class Trainer:
    """The training loop for model(*batch) -> (logits, loss), with eval, progress bar and checkpoints.

    sampler: next() -> batch (a tuple of CPU tensors), state_dict(), load_state_dict(). eval_sampler: a
    callable returning a fresh sampler over held-out data (called per eval, so every eval sees the same
    batches). extra: what else the checkpoint records (model config, data fingerprint, ...). dist: this
    process's place in a torchrun job (model wrapped by dist.wrap, samplers sharded by dist.shard); only its
    rank 0 logs and writes checkpoints.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sampler,
        eval_sampler: Callable,
        cfg: TrainConfig,
        device: torch.device,
        extra: dict,
        dist: distributed.Context = distributed.SINGLE,
    ):
        self.model, self.sampler, self.eval_sampler = model, sampler, eval_sampler
        self.cfg, self.device, self.extra, self.dist = cfg, device, extra, dist
        self.optimizer = make_optimizer(model, cfg, device)
        self.step = 0
        self.metrics: dict = {"val_loss": None, "train_loss": None, "history": []}
        # The losses of the steps since the last logged train loss: their sum (on device) and count. Saved, so
        # that a resumed run logs the same train losses as an uninterrupted one.
        self.window, self.window_count = None, 0
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        rng = rng_state(self.device)
        return {
            **self.extra,
            "model": self.dist.model_state_dict(self.model),
            "optimizer": self.dist.optimizer_state_dict(self.model, self.optimizer),
            "step": self.step,
            "rng": {**rng, "sampler": self.sampler.state_dict()},
            "train_config": dataclasses.asdict(self.cfg),
            "metrics": self.metrics,
            "loss_window": self._window_state(),
            **self.dist.checkpoint_extra(self.model, rng),
        }

    def _window_state(self) -> dict:
        # A collective under torchrun (every rank saves in step): rank 0 writes the ranks' mean sum.
        total = None if self.window is None else self.dist.mean(self.window).item()
        return {"sum": total, "count": self.window_count}

    def load_state_dict(self, state: dict) -> None:
        self.dist.load_model_state_dict(self.model, state["model"])
        self.dist.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.step = int(state["step"])
        self.metrics = state.get("metrics", self.metrics)
        window = state.get("loss_window", {"sum": None, "count": 0})
        self.window_count = window["count"]
        self.window = None if window["sum"] is None else torch.tensor(window["sum"], device=self.device)
        self.sampler.load_state_dict(state["rng"]["sampler"])
        own_rng = self.dist.rank_rng_state(state)
        set_rng_state(own_rng or state["rng"], self.device)
        if own_rng is None:
            self.dist.seed(self.cfg.seed + self.step)  # saved by another number of ranks: fresh per-rank RNG

    def save(self) -> str:
        path = self.cfg.checkpoint_path()
        state = self.state_dict()  # on every rank: FSDP gathers the full state to rank 0 here
        if self.dist.is_main:
            checkpoint.save(state, path)
        return path

    # ------------------------------------------------------------------------------------------ steps
    def _to_device(self, batch):
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def train_step(self, batch) -> torch.Tensor:
        """One optimizer step at the current step's learning rate; returns the loss (on device, no sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        batch = self._to_device(batch)
        with self.autocast:
            _, loss = self.model(*batch)
        loss = self.dist.global_mean_share(loss, batch[-1])
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over cfg.eval_iters held-out batches (the same ones every time), in eval mode."""
        self.model.eval()
        sampler = self.eval_sampler()
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.eval_iters):
            batch = self._to_device(sampler.next())
            with self.autocast:
                _, loss = self.model(*batch)
            total += self.dist.global_mean_share(loss.float(), batch[-1])
        self.model.train()
        return (self.dist.mean(total) / self.cfg.eval_iters).item()

    # ------------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        cfg = self.cfg
        end = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, cfg.stop_after)
        self.model.train()
        if self.step == 0 and cfg.eval_every:
            self._log_eval(self.evaluate())
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not cfg.progress or not self.dist.is_main,
            dynamic_ncols=True,
            desc="train",
            unit="step",
        )
        tokens_per_step = None
        timed, tick, tok_s = 0, time.perf_counter(), None
        last_window_loss = self.metrics["train_loss"]
        while self.step < end:
            batch = self.sampler.next()
            tokens_per_step = batch[-1].numel() * self.dist.world_size  # targets: one per trained position
            loss = self.train_step(batch)
            self.window = loss.float() if self.window is None else self.window + loss.float()
            self.window_count += 1
            timed += 1
            bar.update(1)
            logged = self.window_count == cfg.log_every or self.step == cfg.max_steps
            if logged or self.step == end:
                now = time.perf_counter()
                # One sync (and one all-reduce across ranks) per log interval.
                window_loss = self.dist.mean(self.window / self.window_count).item()
                tok_s = timed * tokens_per_step / (now - tick)
                bar.set_postfix(loss=f"{window_loss:.3f}", tok_s=f"{tok_s:,.0f}")
                last_window_loss = window_loss
                if logged:
                    self.metrics["train_loss"] = window_loss
                    self.window, self.window_count = None, 0
                # else a --stop-after stop inside a window: it keeps the window and leaves the metrics as an
                # uninterrupted run has them, so the resumed run logs the same train losses where this would.
                timed, tick = 0, now
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                self._log_eval(self.evaluate())
                tick = time.perf_counter()  # eval time is not training throughput
            if self.step == end or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save()
                tick = time.perf_counter()
        bar.close()
        return {
            "step": self.step,
            "train_loss": last_window_loss,  # the last window's mean, logged or not
            "val_loss": self.metrics["val_loss"],
            "tokens_per_s": tok_s,
            "checkpoint": cfg.checkpoint_path(),
        }

    def _log_eval(self, val_loss: float) -> None:
        self.metrics["val_loss"] = val_loss
        self.metrics["history"].append((self.step, val_loss))
        train = self.metrics["train_loss"]
        train_text = f"train loss {train:.4f} | " if train is not None else ""
        if self.dist.is_main:
            tqdm.write(f"step {self.step:>5} | {train_text}val loss {val_loss:.4f}")


# --------------------------------------------------------------------------------------------- text task
def load_corpus(cfg: TrainConfig) -> tuple[bytes, str]:
    """(bytes, description) of the training text."""
    if cfg.data is not None:
        text = data.read_text_file(cfg.data)
        return text, f"{cfg.data} ({len(text) / 1e6:.2f} MB)"
    text = data.stdlib_corpus(cfg.corpus_bytes)
    return text, f"the Python standard library's sources ({len(text) / 1e6:.2f} MB)"


def resolve_config(explicit: dict) -> TrainConfig:
    """The run's TrainConfig: explicit settings, then (on resume) the checkpoint's, then the defaults.

    On resume every setting except those in TrainConfig.NOT_RESUMED comes from the checkpoint unless given
    explicitly, so `--resume` alone continues the same run with the same schedule, data and batches.
    """
    defaults = task_defaults(explicit.get("task", "text"))
    cfg = TrainConfig(**{**defaults, **explicit})
    if not cfg.resume:
        return cfg
    saved = _load_for_resume(cfg.checkpoint_path())["train_config"]
    if "task" in explicit and explicit["task"] != saved.get("task", "text"):
        trained_on = saved.get("task", "text")
        raise UsageError(f"--task {explicit['task']}: the checkpoint was trained on task {trained_on!r}")
    # The task's defaults stand for what is not resumed (its output folder); an explicit task option changes
    # that one option, not the checkpoint's others.
    merged = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    for name in TrainConfig.NOT_RESUMED:
        merged.pop(name, None)
    merged = {**defaults, **merged, **explicit}
    merged["task_options"] = {**saved.get("task_options", {}), **explicit.get("task_options", {})}
    if "preset" in explicit and explicit["preset"] != saved.get("preset"):
        raise UsageError(
            f"--preset {explicit['preset']}: the checkpoint was trained with {saved.get('preset')!r}"
        )
    return TrainConfig(**merged)


def task_defaults(task: str) -> dict:
    """The TrainConfig settings a task changes from the text defaults."""
    if task == "captions":
        from .caption_task import TRAIN_DEFAULTS

        return TRAIN_DEFAULTS
    return {}


def _load_for_resume(path: str) -> dict:
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"--resume: {e}") from None


def model_config(cfg: TrainConfig, saved: dict | None = None, **fixed) -> GPTConfig:
    """The run's GPTConfig: a checkpoint's (`saved`), or cfg.preset's with cfg.model_overrides and a task's
    `fixed` fields (its vocabulary); then cfg's backend, fused_loss and dropout, which leave the weights as
    they are and so may change on resume."""
    runtime = {"backend": cfg.backend, "fused_loss": cfg.fused_loss}
    if cfg.dropout is not None:
        runtime["dropout"] = cfg.dropout
    try:
        if saved is not None:
            return GPTConfig(**{**saved, **runtime})
        return GPTConfig.preset(cfg.preset, **{**cfg.model_overrides, **fixed, **runtime})
    except ValueError as e:
        raise UsageError(str(e)) from None


def train(cfg: TrainConfig) -> dict:
    """Trains (or with cfg.resume continues) a GPT on text, or for task "captions" a MultimodalGPT on images;
    returns the last step, losses, checkpoint.

    Launched by torchrun it is one rank of a data-parallel job (DDP, or FSDP2 with cfg.fsdp): see
    gptfast.distributed.
    """
    if cfg.task not in TASKS:
        raise UsageError(f"--task: must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    cfg.validate()
    device = resolve_device(cfg.device)
    check_backend(cfg.backend, device)
    try:
        ctx, device = distributed.setup(device, cfg.fsdp, cfg.batch_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        if cfg.task == "captions":
            from .caption_task import train_captions

            result = train_captions(cfg, device, ctx)
        else:
            result = _train(cfg, device, ctx)
    except BaseException:
        ctx.close(barrier=False)
        raise
    ctx.close()
    return result


def _train(cfg: TrainConfig, device: torch.device, ctx: distributed.Context) -> dict:
    state = _load_for_resume(cfg.checkpoint_path()) if cfg.resume else None
    try:
        text, description = load_corpus(cfg)
    except data.DataError as e:
        raise UsageError(str(e)) from None

    torch.manual_seed(cfg.seed)  # model init; on resume the RNG state is restored from the checkpoint below
    model = GPT(model_config(cfg, state["config"] if state is not None else None))
    ctx.seed(cfg.seed)
    block = model.config.block_size
    try:
        train_tokens, val_tokens = data.split(text, block)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    check_out(cfg)
    model.to(device)
    sampler = ctx.shard(data.BatchSampler(train_tokens, block, cfg.batch_size, cfg.seed))

    def eval_sampler():
        return ctx.shard(data.BatchSampler(val_tokens, block, cfg.batch_size, cfg.seed + 1))

    fp = data.fingerprint(text)
    extra = {
        "task": "text",
        "config": dataclasses.replace(model.config, backend=None).to_dict(),
        "data": {"source": cfg.data, "fingerprint": fp},
    }
    trainer = Trainer(ctx.wrap(model, device), sampler, eval_sampler, cfg, device, extra, ctx)
    if state is not None:
        if state["data"]["fingerprint"] != fp and ctx.is_main:
            print(
                f"warning: the training text differs from the checkpoint's ({cfg.checkpoint_path()}); "
                "the resumed run will not match an uninterrupted one",
                file=sys.stderr,
            )
        trainer.load_state_dict(state)

    try:
        backend_name = backends.select("attention", device, cfg.backend, dropout=model.config.dropout > 0)
    except backends.BackendUnavailable as e:  # before the step-0 eval rather than at the first step
        raise UsageError(f"--backend {cfg.backend} with --dropout {model.config.dropout}: {e}") from None
    if ctx.is_main:
        ranks = f", {ctx.world_size} ranks ({'FSDP' if ctx.fsdp else 'DDP'})" if ctx.distributed else ""
        print(
            f"gptfast train: preset {cfg.preset}, {model.num_parameters() / 1e6:.2f}M parameters, "
            f"backend {backend_name}, device {device}{ranks}",
            flush=True,
        )
        print(
            f"data: {description}: {train_tokens.numel():,} train / {val_tokens.numel():,} val tokens",
            flush=True,
        )
        if state is not None:
            print(f"resuming {cfg.checkpoint_path()} at step {trainer.step} of {cfg.max_steps}", flush=True)
    result = trainer.run()
    if ctx.is_main:
        print(f"saved {result['checkpoint']} at step {result['step']}", flush=True)
    return {**result, "is_main": ctx.is_main}
