"""The `gptfast` command line: `gptfast train`, `gptfast generate`, `gptfast bench`.

Each subcommand is a registrar in SUBCOMMANDS: a function that adds its parser to the subparsers and sets
`func` (called with the parsed namespace, returns the exit status). A subcommand that parses its own argv (the
benchmark harness does) also sets `passthrough=True`; main then calls its func with the raw argv after the
name. Bad arguments, missing or damaged files print one line on stderr and exit with status 2, no traceback.
"""

import argparse
import dataclasses
import importlib
import math
import sys
from typing import Callable

import torch

from . import backends

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'gptfast train: error: ... (see gptfast train --help)'."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------- argument types
def _int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _float(low: float, high: float | None = None, high_open: bool = False, finite: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if finite and math.isinf(value):  # an infinite learning rate trains to NaN without an error
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        too_high = high is not None and (value >= high if high_open else value > high)
        if not value >= low or too_high:
            bracket = ")" if high_open else "]"
            bound = f"in [{low}, {high}{bracket}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def _default(field: str) -> str:
    from .train import TrainConfig

    value = {f.name: f.default for f in dataclasses.fields(TrainConfig)}[field]
    return f"(default: {value})"


# ---------------------------------------------------------------------------------------------- train
def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a GPT on text (the embedded stdlib corpus, or --data FILE), or to caption images",
        description="Train a byte-level GPT. Without --data it trains on the Python standard library's own "
        "sources (no download). With --task captions it trains a multimodal GPT to caption procedural "
        "images of shapes. Writes OUT/ckpt.pt atomically; --resume continues it exactly.",
    )
    from .model import GPTConfig
    from .train import MAX_SEED, TASKS

    p.add_argument(
        "--task",
        choices=TASKS,
        help="what to train on (default: text, or on --resume the checkpoint's); captions has its own "
        "defaults for steps, batch size, evals and --out (caption_task.TRAIN_DEFAULTS)",
    )
    p.add_argument("--max-shapes", type=_int(1), help="captions: shapes per image, 1 to N (default: 2)")
    # Defaults are None so that on --resume only the settings given explicitly override the checkpoint's.
    p.add_argument("--preset", choices=list(GPTConfig.PRESETS), help=f"model size {_default('preset')}")
    p.add_argument(
        "--data", metavar="PATH", help="a text file to train on (default: the embedded stdlib corpus)"
    )
    p.add_argument(
        "--max-steps", type=_int(1), help=f"optimizer steps; the schedule's length {_default('max_steps')}"
    )
    p.add_argument(
        "--stop-after",
        type=_int(1),
        metavar="N",
        help="stop and save after N steps, keeping the --max-steps schedule (continue with --resume)",
    )
    p.add_argument("--batch-size", type=_int(1), help=f"sequences per step {_default('batch_size')}")
    p.add_argument(
        "--lr", type=_float(0.0), help="peak learning rate (default: 2e-3 for tiny, 6e-4 for gpt2)"
    )
    p.add_argument(
        "--warmup-steps", type=_int(0), help="linear warmup steps (default: 10%% of --max-steps, <= 100)"
    )
    p.add_argument(
        "--weight-decay", type=_float(0.0), help=f"AdamW decay on 2-d weights {_default('weight_decay')}"
    )
    p.add_argument(
        "--grad-clip", type=_float(0.0), help=f"max gradient norm, 0 = off {_default('grad_clip')}"
    )
    p.add_argument(
        "--dropout", type=_float(0.0, 1.0, high_open=True), help="dropout (default: the preset's, 0)"
    )
    p.add_argument(
        "--fused-loss",
        action="store_true",
        default=None,
        help="compute the loss with linear_cross_entropy (no full logits)",
    )
    p.add_argument(
        "--eval-every", type=_int(0), help=f"steps between held-out evals, 0 = off {_default('eval_every')}"
    )
    p.add_argument("--eval-iters", type=_int(1), help=f"batches per eval {_default('eval_iters')}")
    p.add_argument(
        "--save-every", type=_int(0), help=f"steps between checkpoints, 0 = end only {_default('save_every')}"
    )
    p.add_argument("--out", metavar="DIR", help=f"output directory for ckpt.pt {_default('out')}")
    p.add_argument(
        "--seed", type=_int(0, MAX_SEED), help=f"seed for init, data order and dropout {_default('seed')}"
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--backend", choices=backends.NAMES, help="gptfast ops backend (default: the fastest here)"
    )
    p.add_argument(
        "--threads",
        type=_int(1),
        help="CPU threads per op (default: torch's, all cores; 1 for captions, see caption_task.CPU_THREADS)",
    )
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/ckpt.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start a new run even where OUT/ckpt.pt exists (replacing it); without it that is refused",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        default=None,
        help="under torchrun: shard the model with FSDP2 instead of replicating it with DDP",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from . import train

    explicit = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k in {f.name for f in dataclasses.fields(train.TrainConfig)}
    }
    if args.max_shapes is not None:
        explicit["task_options"] = {"max_shapes": args.max_shapes}
    cfg = train.resolve_config(explicit)
    if args.max_shapes is not None and cfg.task != "captions":
        raise train.UsageError("--max-shapes: only the captions task has shapes (add --task captions)")
    if args.threads is not None or cfg.task == "captions":
        from .caption_task import CPU_THREADS

        torch.set_num_threads(args.threads or CPU_THREADS)
    result = train.train(cfg)
    if result["val_loss"] is not None and result["is_main"]:
        print(f"final val loss {result['val_loss']:.4f}")
    return 0


# ------------------------------------------------------------------------------------------- generate
def add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample text from a checkpoint, or caption fresh images",
        description="Sample text from a checkpoint written by `gptfast train`; a captions checkpoint "
        "captions new images and prints each caption beside the true one, then the accuracy.",
    )
    from .train import MAX_SEED, TASKS

    p.add_argument("--checkpoint", required=True, metavar="PATH", help="e.g. runs/demo/ckpt.pt")
    p.add_argument("--task", choices=TASKS, help="the checkpoint's task, checked (default: the checkpoint's)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from a newline)")
    p.add_argument("--max-new-tokens", type=_int(0), help="text: bytes to generate (default: 200)")
    p.add_argument("--num-images", type=_int(1), help="captions: fresh images to caption (default: 8)")
    p.add_argument(
        "--temperature",
        type=_float(0.0, finite=False),
        help="softmax temperature, 0 = greedy (default: 0.8 for text, 0 for captions)",
    )
    p.add_argument(
        "--top-k", type=_int(1), default=None, help="sample among the k likeliest bytes (default: all)"
    )
    p.add_argument("--seed", type=_int(0, MAX_SEED), default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--backend", choices=backends.NAMES, help="gptfast ops backend (default: the fastest here)"
    )
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from .checkpoint import load
    from .generate import generate_text, model_from_state
    from .train import UsageError, check_backend, resolve_device

    device = resolve_device(args.device)
    check_backend(args.backend, device)
    state = load(args.checkpoint)
    task = state.get("task", "text")
    if args.task is not None and args.task != task:
        raise UsageError(f"--task {args.task}: {args.checkpoint} holds a model of task {task!r}")
    if task == "captions":
        return _caption_images(args, state, device)
    if args.num_images is not None:
        raise UsageError("--num-images: only a captions checkpoint captions images")
    model = model_from_state(state, args.checkpoint, device, args.backend)
    temperature = 0.8 if args.temperature is None else args.temperature
    max_new_tokens = 200 if args.max_new_tokens is None else args.max_new_tokens
    print(generate_text(model, args.prompt, max_new_tokens, temperature, args.top_k, args.seed))
    return 0


def _caption_images(args, state: dict, device) -> int:
    from .caption_task import FRESH_IMAGES, caption_fresh_images, captioner_from_state, check_seed
    from .train import UsageError

    text_only = {"--prompt": args.prompt != "", "--max-new-tokens": args.max_new_tokens is not None}
    for flag, given in text_only.items():
        if given:
            raise UsageError(f"{flag}: a caption starts from the image alone and ends at its <eos>")
    check_seed(args.seed)
    model, spec = captioner_from_state(state, args.checkpoint, device, args.backend)
    n_images = FRESH_IMAGES if args.num_images is None else args.num_images
    temperature = 0.0 if args.temperature is None else args.temperature
    print(caption_fresh_images(model, spec, n_images, args.seed, temperature, args.top_k))
    return 0


# ---------------------------------------------------------------------------------------------- bench
def add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", add_help=False, help="benchmark the kernels and the model (gptfast.bench)"
    )
    p.set_defaults(func=run_bench, passthrough=True)


def run_bench(argv: list[str]) -> int:
    try:
        bench_cli = importlib.import_module("gptfast.bench.cli")
    except ModuleNotFoundError as e:
        if e.name not in ("gptfast.bench", "gptfast.bench.cli"):
            raise
        print(
            "gptfast bench: error: the benchmark harness (gptfast.bench.cli) is not in this install",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return bench_cli.main(argv) or 0


SUBCOMMANDS: dict[str, Callable] = {"train": add_train, "generate": add_generate, "bench": add_bench}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gptfast", description="Fused GPT kernels for PyTorch: train, sample, benchmark.")
    subparsers = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True
    )
    for register in SUBCOMMANDS.values():
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import UsageError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    command = argv[0] if argv else None
    try:
        sub = parser._subparsers._group_actions[0].choices.get(command) if command else None
        if sub is not None and sub.get_default("passthrough"):
            return sub.get_default("func")(argv[1:])
        args = parser.parse_args(argv)
        return args.func(args)
    except (UsageError, DataError, CheckpointError, backends.BackendUnavailable) as e:
        print(f"gptfast {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"gptfast {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
