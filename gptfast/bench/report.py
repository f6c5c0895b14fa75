"""report.md, results.json and the PNG plots, built from the results dict, which results.json holds."""

import json
import math
from pathlib import Path

from .suite import SuiteResult

UNITS = {"copy": "GB/s", "matmul": "TFLOP/s"}


def suite_dict(res: SuiteResult) -> dict:
    return {
        "formulas": res.formulas,
        "metric": res.metric,
        "ceiling": res.ceiling,
        "baselines": res.baselines,
        "notes": res.notes,
        "rows": [r.as_dict() for r in res.rows],
    }


# ------------------------------------------------------------------------------------------------- numbers
def sig(x: float | None, digits: int = 3) -> str:
    """x with `digits` significant digits, never in exponent form (report tables read better that way)."""
    if x is None:
        return "—"
    if x != x or math.isinf(x):
        return str(x)
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= size:
            return f"{sig(b / size)} {unit}"
    return f"{int(b)} B"


def fmt_speedup(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}%" if x < 10 else f"{x:.0f}%"


def fmt_error(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


# ----------------------------------------------------------------------------------------------- headline
def headline(results: dict) -> list[dict]:
    """Per op and phase: the fastest gptfast row at the largest shape, with its ratios."""
    lines = []
    for op, suite in results["suites"].items():
        rows = suite["rows"]
        for phase in dict.fromkeys(r["phase"] for r in rows):
            in_phase = [r for r in rows if r["phase"] == phase]
            measured = [r for r in in_phase if r["kind"] == "gptfast" and r["status"] == "ok"]
            if not measured:
                label = max(in_phase, key=lambda r: r["size"])["label"]
                lines.append({"op": op, "phase": phase, "label": label, "row": None})
                continue
            # The largest shape at which a gptfast backend was measured (a time budget may skip bigger ones,
            # which the row then names: the caption promises the largest size).
            largest = max(r["size"] for r in measured)
            planned = max(in_phase, key=lambda r: r["size"])
            unmeasured = planned["label"] if planned["size"] > largest else None
            at_size = [r for r in in_phase if r["size"] == largest]
            ours = [r for r in measured if r["size"] == largest]
            best = min(ours, key=lambda r: r["timing"]["median_ms"])
            eager = [r for r in at_size if r["kind"] == "eager" and r["status"] == "ok" and r["peak_bytes"]]
            mem_ratio = None
            if best["peak_bytes"] and eager:
                mem_ratio = best["peak_bytes"] / min(r["peak_bytes"] for r in eager)
            lines.append(
                {
                    "op": op,
                    "phase": phase,
                    "label": best["label"],
                    "row": best,
                    "unit": suite["metric"],
                    "mem_vs_eager": mem_ratio,
                    "unmeasured": unmeasured,
                }
            )
    return lines


def _headline_md(results: dict) -> list[str]:
    out = [
        "## Headline",
        "",
        "The fastest gptfast backend at each op's largest size where one was measured (a larger size a time "
        "budget or an error left without one is named beside it; speedups > 1 mean gptfast is faster).",
        "",
        "| op | phase | shape | backend | median ms | rate | % of ceiling | vs torch eager | vs torch.compile "
        "| peak memory | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in headline(results):
        r = h["row"]
        if r is None:
            out.append(
                f"| {h['op']} | {h['phase']} | {h['label']} | no gptfast backend measured "
                "| — | — | — | — | — | — | — |"
            )
            continue
        mem = fmt_bytes(r["peak_bytes"])
        if h["mem_vs_eager"] is not None:
            mem += f" ({100 * h['mem_vs_eager']:.0f}% of torch eager)"
        label = r["label"] if not h["unmeasured"] else f"{r['label']} ({h['unmeasured']}: no gptfast row)"
        out.append(
            f"| {h['op']} | {h['phase']} | {label} | {r['peer']} | {sig(r['timing']['median_ms'])} "
            f"| {sig(r['rate'])} {h['unit']} | {fmt_pct(r['pct_ceiling'])} | {fmt_speedup(r['speedup_eager'])} "
            f"| {fmt_speedup(r['speedup_compile'])} | {mem} | {r['check']} |"
        )
    return out + [""]


# ------------------------------------------------------------------------------------------------- report.md
def markdown(results: dict) -> str:
    meta, ceil = results["meta"], results["ceilings"]
    lines = [
        "# gptfast benchmark report",
        "",
        f"- Device: **{meta['device_name']}** ({meta['device']}), dtype **{meta['dtype']}**, sizes **{meta['mode']}**",
        f"- torch {meta['torch']}"
        + (f" (CUDA {meta['cuda']})" if meta["cuda"] else "")
        + f", triton {meta['triton']}, Python {meta['python']}, "
        f"gptfast commit `{meta['gptfast_commit']}`, {meta['date']}",
        f"- Timing: {meta['timing_method']}; warm-up first (compilation and autotuning excluded), "
        "median of the repeats with p20–p80",
        f"- Peak memory: {meta['memory_method']}; for ops, above the inputs already allocated",
        f"- CPU: {meta['cpu_count']} cores, torch threads {meta['torch_threads']}, load average at start "
        f"{sig(meta['load_average'])}",
    ]
    if meta.get("elapsed_s") is not None:
        lines.append(f"- Run time: {meta['elapsed_s']:.0f} s")
    if meta["device"] == "cpu":
        lines.append(
            "- On a CPU, small cases run from cache and can beat the copy ceiling (a DRAM-sized copy)"
        )
    load = meta.get("load_average")
    if meta["device"] == "cpu" and load and meta["cpu_count"] and load > 0.75 * meta["cpu_count"]:
        lines += [
            "",
            f"> **Warning:** the load average ({load:.1f}) was high for {meta['cpu_count']} cores when "
            "this run started: other processes competed for the CPU, so these timings are noisy. Rerun on "
            "an idle machine (or with `--threads 1`) before drawing conclusions.",
        ]
    lines += [
        "",
        "## Ceilings (measured at the start of this run)",
        "",
        "| ceiling | value | formula | median ms (p20–p80) |",
        "|---|---|---|---|",
        f"| copy bandwidth | {sig(ceil['copy_GBps'])} GB/s | {ceil['copy_formula']} | {_ms(ceil['copy_timing'])} |",
        f"| matmul | {sig(ceil['matmul_TFLOPs'])} TFLOP/s | {ceil['matmul_formula']} | {_ms(ceil['matmul_timing'])} |",
        "",
    ]
    lines += _headline_md(results)
    for op, suite in results["suites"].items():
        lines += _suite_md(op, suite)
    if results.get("plots") or results.get("plot_note"):
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in results.get("plots", [])]
        if results.get("plot_note"):
            lines.append(results["plot_note"])
        lines.append("")
    return "\n".join(lines) + "\n"


def _ms(t: dict | None) -> str:
    if not t:
        return "—"
    return f"{sig(t['median_ms'])} ({sig(t['p20_ms'])}–{sig(t['p80_ms'])})"


def _suite_md(op: str, suite: dict) -> list[str]:
    unit = suite["metric"]
    ceiling = UNITS[suite["ceiling"]]
    lines = [f"## {op}", ""]
    for phase, formula in suite["formulas"].items():
        lines.append(f"- **{phase}**: {formula}")
    if op == "model":
        lines.append("- % of ceiling: the model TFLOP/s over the matmul ceiling")
    else:
        lines.append(f"- % of ceiling: {unit} over the {suite['ceiling']} ceiling ({ceiling})")
    if suite.get("baselines"):
        lines.append(f"- Speedups: {suite['baselines']}")
    lines.append(
        "- Forward is timed under torch.no_grad(); forward+backward times both passes together"
        if op != "model"
        else "- The first forward and backward of each peer (same weights) is what the check compares"
    )
    lines.append(
        "- check: design.md's rule, max error <= 2x torch's own error in the same dtype (against the reference "
        "in higher precision) + a floor. The torch eager computation that sets that yardstick (for attention "
        "sdpa[math]) passes it by construction: its PASS only rules out NaN and inf"
    )
    lines.append("")
    if not suite["rows"]:
        lines += [f"- {n}" for n in suite["notes"]] + [""]
        return lines
    failures = []
    for phase in dict.fromkeys(r["phase"] for r in suite["rows"]):
        lines += [f"### {phase}", ""]
        if op == "model":
            lines += [
                "| shape | backend | median ms (p20–p80) | tokens/s | TFLOP/s | % of matmul (MFU) | vs torch eager "
                "| vs torch.compile | peak memory | max error | check |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
        else:
            lines += [
                f"| shape | backend | median ms (p20–p80) | {unit} | % of {suite['ceiling']} | vs torch eager "
                "| vs torch.compile | peak memory | max error | check |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        for r in sorted((r for r in suite["rows"] if r["phase"] == phase), key=lambda r: r["size"]):
            lines.append(_row_md(r, op == "model"))
            if r["check"] == "FAIL" or (r["check"] == "n/a" and r["status"] == "ok" and r["check_detail"]):
                failures.append(f"- {r['check']} {phase} {r['label']} {r['peer']}: {r['check_detail']}")
        lines.append("")
    if failures:
        lines += ["Check details:", ""] + failures + [""]
    if suite["notes"]:
        lines += ["Not run here:", ""] + [f"- {n}" for n in suite["notes"]] + [""]
    return lines


def _row_md(r: dict, model: bool) -> str:
    if r["status"] != "ok":
        blank = " — |" * (8 if model else 7)
        return f"| {r['label']} | {r['peer']} | {r['status']}: {r['note']} |{blank}"
    check = "**FAIL**" if r["check"] == "FAIL" else r["check"]
    cells = [r["label"], r["peer"], _ms(r["timing"]), sig(r["rate"])]
    if model:
        cells.append(sig(r["extra"].get("TFLOP/s")))
    cells += [
        fmt_pct(r["pct_ceiling"]),
        fmt_speedup(r["speedup_eager"]),
        fmt_speedup(r["speedup_compile"]),
        fmt_bytes(r["peak_bytes"]),
        fmt_error(r["max_error"]),
        check,
    ]
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------------------------- results.json
def _finite(value):
    """JSON without NaN/Infinity (not valid JSON): non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write(results: dict, out: Path) -> None:
    out = Path(out)
    results["headline"] = [
        {
            **h,
            "row": h["row"]
            and {
                k: h["row"][k]
                for k in (
                    "label",
                    "peer",
                    "rate",
                    "pct_ceiling",
                    "speedup_eager",
                    "speedup_compile",
                    "peak_bytes",
                    "check",
                )
            },
        }
        for h in headline(results)
    ]
    (out / "results.json").write_text(json.dumps(_finite(results), indent=1, default=str) + "\n")
    (out / "report.md").write_text(markdown(results))


# ------------------------------------------------------------------------------------------------------ plots
def plots(results: dict, out: Path) -> tuple[list[str], str]:
    """PNG plots (matplotlib, Agg): speedup vs size per op, memory vs tokens for linear cross-entropy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return [], f"Plots skipped: matplotlib is not importable ({e})."
    written = []
    for op, suite in results["suites"].items():
        phase = "step" if op == "model" else "fwd+bwd"
        rows = [r for r in suite["rows"] if r["phase"] == phase and r["speedup_eager"] is not None]
        if rows:
            path = Path(out) / f"speedup_{op}.png"
            _line_plot(
                plt,
                rows,
                "speedup_eager",
                path,
                f"{op} {phase}: speedup vs torch eager (higher is faster)",
                "speedup vs torch eager (x)",
                _xlabel(op),
                baseline=1.0,
            )
            written.append(str(path))
    lce = results["suites"].get("linear_cross_entropy")
    if lce:
        rows = [r for r in lce["rows"] if r["phase"] == "fwd+bwd" and r["peak_bytes"]]
        if rows:
            path = Path(out) / "memory_linear_cross_entropy.png"
            _line_plot(
                plt,
                rows,
                "peak_bytes",
                path,
                "linear_cross_entropy fwd+bwd: peak memory vs tokens",
                "peak memory (MiB)",
                "tokens",
                scale=1 / 2**20,
            )
            written.append(str(path))
    return written, ""


def _xlabel(op: str) -> str:
    return {
        "softmax": "elements (M x N)",
        "cross_entropy": "logits (M x V)",
        "linear_cross_entropy": "tokens",
        "attention": "sequence length",
        "model": "tokens per step",
    }.get(op, "size")


def _line_plot(plt, rows, key, path, title, ylabel, xlabel, baseline=None, scale=1.0):
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for peer in dict.fromkeys(r["peer"] for r in rows):
        pts = sorted((r["size"], r[key] * scale) for r in rows if r["peer"] == peer)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=peer)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2 if baseline is not None else 10)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
