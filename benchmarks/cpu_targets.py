"""Issue 4's CPU targets: the "cpu" backend against torch eager, forward+backward, as ratios from one run.

    python benchmarks/cpu_targets.py            # all four targets (the linear CE memory case takes ~1 min)
    python benchmarks/cpu_targets.py --repeats 9 --skip-lce

Time: torch and gptfast run alternately, `--repeats` times after a warm-up, and each reports its median, so
load from other processes hits both alike. Ratio = torch median / gptfast median (> 1: gptfast faster).
Peak memory: each (case, implementation) runs in a fresh subprocess that builds its inputs, resets the
kernel's resident-set high-water mark (/proc/self/clear_refs), runs forward+backward once and reads VmHWM; the
peak minus the RSS before the step is the extra memory the step needed (pages touched, by the kernel's own
accounting; CPU torch keeps no allocator statistics). Linux only.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

CASES = {
    # name: (target time ratio or None, target memory ratio or None)
    "cross_entropy": (2.0, 0.6),
    "softmax": (1.2, None),
    "attention": (1.0, None),
    "linear_cross_entropy": (None, 0.3),
}


def make(case: str):
    """(inputs, torch_step, gptfast_step): each step runs forward + backward on fresh leaf gradients."""
    from gptfast import ops

    g = torch.Generator().manual_seed(0)
    if case == "cross_entropy":
        x = torch.randn(2048, 50257, generator=g).requires_grad_()
        t = torch.randint(0, 50257, (2048,), generator=g)
        return (x,), lambda: F.cross_entropy(x, t).backward(), lambda: ops.cross_entropy(x, t, backend="cpu").backward()
    if case == "softmax":
        x = torch.randn(4096, 4096, generator=g).requires_grad_()
        dy = torch.randn(4096, 4096, generator=g)
        return (x,), lambda: torch.softmax(x, -1).backward(dy), lambda: ops.softmax(x, backend="cpu").backward(dy)
    if case == "attention":
        q, k, v = (torch.randn(1, 12, 1024, 64, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn(1, 12, 1024, 64, generator=g)
        return (
            (q, k, v),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do),
            lambda: ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu").backward(do),
        )
    if case == "linear_cross_entropy":
        h = (torch.randn(4096, 768, generator=g) * 0.5).requires_grad_()
        w = (torch.randn(50257, 768, generator=g) * 0.02).requires_grad_()
        t = torch.randint(0, 50257, (4096,), generator=g)
        return (
            (h, w),
            lambda: F.cross_entropy(F.linear(h, w), t).backward(),
            lambda: ops.linear_cross_entropy(h, w, t, backend="cpu").backward(),
        )
    raise ValueError(case)


def _clear(leaves):
    for t in leaves:
        t.grad = None


def time_case(case: str, repeats: int) -> tuple[float, float]:
    leaves, torch_step, ours_step = make(case)
    times = {"torch": [], "gptfast": []}
    for i in range(repeats + 1):
        for name, step in (("torch", torch_step), ("gptfast", ours_step)):
            _clear(leaves)
            t0 = time.perf_counter()
            step()
            if i:  # the first round warms up both
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["torch"]), statistics.median(times["gptfast"])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_child(case: str, impl: str) -> None:
    leaves, torch_step, ours_step = make(case)
    step = ours_step if impl == "gptfast" else torch_step
    # ru_maxrss is inherited across fork/exec (the parent's peak would hide the child's), so the child resets
    # its high-water mark to the current RSS (clear_refs "5") and reads VmHWM after the step.
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_mib(case: str, impl: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-child", case, impl], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--skip-lce", action="store_true", help="skip the (slow) linear cross-entropy memory case")
    p.add_argument("--peak-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak_child:
        _peak_child(*args.peak_child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {args.repeats} repeats (median)")
    header = f"{'case':<22}{'torch ms':>10}{'gptfast ms':>12}{'speedup':>9}{'target':>8}" \
             f"{'torch MiB':>11}{'gptfast MiB':>13}{'mem ratio':>11}{'target':>8}  result"
    print(header)
    print("-" * len(header))
    all_ok = True
    for case, (t_target, m_target) in CASES.items():
        if case == "linear_cross_entropy" and args.skip_lce:
            continue
        cells, ok = [], True
        if t_target is not None:
            tt, tg = time_case(case, args.repeats)
            speed = tt / tg
            ok &= speed >= t_target
            cells += [f"{tt * 1e3:10.1f}", f"{tg * 1e3:12.1f}", f"{speed:8.2f}x", f"{t_target:7.1f}x"]
        else:
            cells += [f"{'-':>10}", f"{'-':>12}", f"{'-':>9}", f"{'-':>8}"]
        if m_target is not None:
            mt, mg = peak_mib(case, "torch"), peak_mib(case, "gptfast")
            ratio = mg / mt if mt > 0 else float("nan")
            ok &= ratio <= m_target
            cells += [f"{mt:11.0f}", f"{mg:13.0f}", f"{ratio:10.2f}x", f"{m_target:7.1f}x"]
        else:
            cells += [f"{'-':>11}", f"{'-':>13}", f"{'-':>11}", f"{'-':>8}"]
        all_ok &= ok
        print(f"{case:<22}" + "".join(cells) + ("  PASS" if ok else "  MISS"), flush=True)
    print("all targets met" if all_ok else "some targets missed")


if __name__ == "__main__":
    main()
