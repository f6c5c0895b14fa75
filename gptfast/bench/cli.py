"""`gptfast bench` (and `python -m gptfast.bench`): the benchmark report for this machine.

gptfast/cli.py registers add_arguments on its `bench` subcommand and calls main with the parsed namespace, or
passes the raw argv list; both work.
"""

import argparse
import sys

from . import runner


def _ops(text: str) -> list[str]:
    ops = [o.strip() for o in text.split(",") if o.strip()]
    unknown = [o for o in ops if o not in runner.OPS]
    if unknown or not ops:
        raise argparse.ArgumentTypeError(
            f"unknown op(s) {', '.join(unknown) or '(none)'}; choose from {','.join(runner.OPS)}"
        )
    return ops


KINDS = ("gptfast", "eager", "compile", "external")


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown peer kind(s) {', '.join(unknown)}; choose from {','.join(KINDS)}"
        )
    return kinds


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="device to benchmark (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--ops",
        type=_ops,
        default=list(runner.OPS),
        help=f"comma-separated suites to run (default: all): {','.join(runner.OPS)}",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="small sizes, minutes on a laptop CPU (the default)",
    )
    size.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="sizes that fill a GPU (issue 3's targets on an H200)",
    )
    size.add_argument(
        "--tiny",
        dest="mode",
        action="store_const",
        const="tiny",
        help="smoke-test sizes (seconds per suite), for tests and dry runs",
    )
    parser.set_defaults(mode="quick")
    parser.add_argument(
        "--dtype",
        choices=sorted(runner.DTYPES),
        default=None,
        help="data type of the inputs (default: bf16 on cuda, fp32 on cpu)",
    )
    parser.add_argument("--out", default="bench-out", help="output directory (default: bench-out/)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="share this many seconds among the suites and skip the cases left when a suite's "
        "share runs out (the report says which); default: none, except "
        f"{runner.QUICK_CPU_BUDGET_S:.0f} s for the quick CPU run; 0: no limit",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--exclude",
        type=_kinds,
        default=(),
        metavar="KINDS",
        help="peer kinds to leave out, comma-separated: " + ",".join(KINDS) + " (e.g. compile, "
        "to save torch.compile's compile time)",
    )
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(
            prog="gptfast bench",
            description="Benchmark gptfast's ops and GPT training step against torch and peers; "
            "writes report.md, results.json and PNG plots.",
        )
    )


def main(args=None) -> int:
    if args is None or isinstance(args, (list, tuple)):
        args = build_parser().parse_args(args)
    dtype = runner.DTYPES[args.dtype] if args.dtype else None
    try:
        results = runner.run(
            device=args.device,
            ops=args.ops,
            mode=args.mode,
            dtype=dtype,
            out=args.out,
            time_budget=args.time_budget,
            threads=args.threads,
            plots=not args.no_plots,
            progress=not args.no_progress,
            exclude=args.exclude,
        )
    except (RuntimeError, ValueError) as e:
        print(f"gptfast bench: error: {e}", file=sys.stderr)
        return 2
    print(
        f"gptfast bench: wrote {args.out}/report.md, results.json and {len(results['plots'])} plots "
        f"in {results['meta']['elapsed_s']:.0f} s"
    )
    return 0
