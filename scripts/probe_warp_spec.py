"""Runs each warp-specialised Triton attention config (forward, dQ, dK/dV) once and checks it, before anything
relies on it.

Triton's Hopper warp-specialising pass is newer than the rest of its compiler: a config it splits could fail to
build, give wrong numbers, or deadlock on its barriers. scripts/gpu_check.sh runs this under a 90-second limit
before the test suite and the bench; when it fails, hangs or runs out of time, the later steps run with
GPTFAST_TRITON_WARP_SPEC=0, so one bad config costs the probe's time, not the device run. It covers every
(head dim, causal) pair the GPU test forces these configs at, one process a pair, in parallel: the compiles,
not the GPU, take the time. Exit status 0: every config ran warp-specialised and its output (forward), dQ or
dK and dV matched torch SDPA's in fp32 within the tolerance rule; 1: one did not (each is named).

    python scripts/probe_warp_spec.py            on a GPU; on a CPU the interpreter runs it (TRITON_INTERPRET=1)
    python scripts/probe_warp_spec.py --case I   one pair only (what each process runs)
"""

import os
import subprocess
import sys
import threading

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, so before the import
# The unforced launches (the forward a backward probe starts from, dK/dV at head dim 256) run their defaults,
# untimed: what the probe compiles is then what the test suite, which also sets this, compiles too.
os.environ["GPTFAST_AUTOTUNE"] = "0"

from gptfast.kernels import attention as kernels
from gptfast.ops import _library

# (head dim, kv heads, causal) for 4 query heads: the (head dim, causal) pairs of the GPU test
# (test_triton_warp_specialized_configs_gpu), with GQA where it has GQA (triton compiles a group of 1 apart):
# the bench's head dims (128 for attention, 64 in the GPT-2 step) causal, 128 non-causal with fewer keys than
# queries (a tail block holding keys past S, which only the copy engine's zero fill masks), and 256.
CASES = ((128, 4, True), (128, 2, False), (64, 4, True), (256, 2, True))
KINDS = ("fwd", "dq", "dkdv")


def _recording_warp_spec(launches: list):
    """kernels._tuned wrapped to note, per launch, the kernel and whether every config it may launch is
    warp-specialised (a forced config falls back to its plain twin where warp specialisation may not run)."""
    tuned = kernels._tuned

    def record(kind, q, meta, tma=False, ws=False):
        fn = tuned(kind, q, meta, tma, ws)
        launches.append((kind, all(c.kwargs["WARP_SPEC"] for c in fn.configs)))
        return fn

    return record


def _ran_warp_specialized(kind: str, launches: list) -> bool:
    """Whether `kind` launched, and warp-specialised every time."""
    runs = [ws for k, ws in launches if k == kind]
    return bool(runs) and all(runs)


def _attend(q, k, v, dout, causal, gqa):
    """torch SDPA's (out, dq, dk, dv) in q's dtype."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _within_bound(got, want, same) -> tuple[bool, str]:
    """design.md's tolerance rule on each (got, want, same) triple: twice torch's own error in the dtype, plus a
    floor for a lucky torch."""
    ok, notes = True, []
    for g, w, t in zip(got, want, same):
        err, bound = (g.float() - w).abs().max().item(), 2 * (t.float() - w).abs().max().item() + 1e-3
        ok = ok and err <= bound
        notes.append(f"max error {err:.3g}, bound {bound:.3g}")
    return ok, "; ".join(notes)


def probe_case(D: int, Hk: int, causal: bool) -> int:
    """Checks every warp-specialised config at this head dim: the forward's one call each, the backward's
    i-th dQ and i-th dK/dV config forced together in one call. Returns how many failed."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The interpreter computes bf16 wrongly, and is slow: fp16 and short sequences there. L % 4 == 0, which the
    # warp-specialised backward configs need (their lse and delta rows come through descriptors).
    dtype, L = (torch.bfloat16, 1000) if device == "cuda" else (torch.float16, 72)
    S = L if causal else L - 37
    fwd, bwd = _library.pair("attention", "triton")
    rng = torch.zeros(2, dtype=torch.int64)
    launches: list = []
    kernels._tuned = _recording_warp_spec(launches)
    q = torch.randn(2, 4, L, D, device=device, dtype=dtype)
    k, v = (torch.randn(2, Hk, S, D, device=device, dtype=dtype) for _ in range(2))
    dout = torch.randn(2, 4, L, D, device=device, dtype=dtype)
    want = _attend(q.float(), k.float(), v.float(), dout.float(), causal, Hk != 4)
    same = _attend(q, k, v, dout, causal, Hk != 4)
    out, lse = fwd(q, k, v, None, 0.0, causal, D**-0.5, rng)
    configs = {
        kind: [c for c in kernels.candidates(kind, dtype, D) if kernels._warp_specialized(c)]
        for kind in KINDS
    }
    calls = [("forward", {"fwd": c}, (0,)) for c in configs["fwd"]]
    for i in range(max(len(configs["dq"]), len(configs["dkdv"]))):
        forced = {
            kind: configs[kind][min(i, len(configs[kind]) - 1)] for kind in ("dq", "dkdv") if configs[kind]
        }
        calls.append(("backward", forced, (1, 2, 3)))
    failed = 0
    for name, forced, picks in calls:
        kernels.FORCED.update(forced)
        launches.clear()
        try:
            if name == "forward":
                got = fwd(q, k, v, None, 0.0, causal, D**-0.5, rng)[:1]
            else:
                got = (None, *bwd(dout, q, k, v, None, out, lse, 0.0, causal, D**-0.5, rng))
            ok, note = _within_bound(
                [got[i] for i in picks], [want[i] for i in picks], [same[i] for i in picks]
            )
            plain = [kind for kind in forced if not _ran_warp_specialized(kind, launches)]
            if plain:
                ok, note = False, f"ran without warp specialisation: {', '.join(plain)} ({note})"
        except Exception as e:  # noqa: BLE001  (every failure is reported, then the exit status says it)
            lines = str(e).strip().splitlines()
            ok, note = False, f"{type(e).__name__}: {lines[0] if lines else ''}"
        finally:
            for kind in forced:
                kernels.FORCED.pop(kind, None)
        failed += not ok
        what = f"D={D} Hk={Hk} L={L} S={S} causal={causal} {forced}"
        print(f"warp-specialised {name} {what}: {'ok' if ok else 'FAILED'} ({note})", flush=True)
    return failed


def main(argv: list[str]) -> int:
    if not kernels._WS_STATE["ok"]:
        print("this triton has no tl.range(warp_specialize=...): no warp-specialised config to probe")
        return 0
    if argv[:1] == ["--case"]:
        return 1 if probe_case(*CASES[int(argv[1])]) else 0
    # Each child's lines are passed on as they come, so a log cut short by the time limit still names the
    # configs that finished; the children are killed before this process exits, whatever ends it (timeout's
    # SIGINT reaches them too, but a child stuck in a kernel or a compiler pass would not act on it).
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--case", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        for i in range(len(CASES))
    ]
    readers = [threading.Thread(target=_relay, args=(proc.stdout,), daemon=True) for proc in procs]
    try:
        for reader in readers:
            reader.start()
        failed = 0
        for i, proc in enumerate(procs):
            if proc.wait() != 0:
                failed += 1
                print(f"probe case {i} {CASES[i]}: exit status {proc.returncode}", flush=True)
        for reader in readers:
            reader.join()
    finally:
        for i, proc in enumerate(procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                print(f"probe case {i} {CASES[i]}: still running when stopped, killed", flush=True)
    return 1 if failed else 0


_PRINT = threading.Lock()


def _relay(stream) -> None:
    for line in stream:
        with _PRINT:
            print(line, end="", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
