"""Runs each warp-specialised Triton attention forward config once and checks it, before anything relies on it.

Triton's Hopper warp-specialising pass is newer than the rest of its compiler: a config it splits could fail to
build, give wrong numbers, or deadlock on its barriers. scripts/gpu_check.sh runs this under a one-minute limit
before the test suite and the bench; when it fails or hangs, the later steps run with
GPTFAST_TRITON_WARP_SPEC=0, so one bad config costs the probe's minute, not the device run. Exit status 0: every
config ran warp-specialised and matched torch SDPA in fp32 within the tolerance rule; 1: one did not (each is
named).

    python scripts/probe_warp_spec.py      on a GPU; on a CPU the interpreter runs it (TRITON_INTERPRET=1)
"""

import os
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, so before the import

from gptfast.kernels import attention as kernels
from gptfast.ops import _library

# (head dim, kv heads, causal) for 4 query heads: causal calls have as many keys as queries; the non-causal
# GQA one has 37 fewer, so its tail block holds keys past S that only the copy engine's zero fill masks.
CASES = ((64, 4, True), (128, 4, True), (128, 2, False), (256, 4, True))


def _recording_warp_spec(launches: list):
    """kernels._tuned wrapped to note, per launch, whether the warp-specialised candidates were allowed."""
    tuned = kernels._tuned

    def record(kind, q, meta, tma=False, ws=False):
        launches.append(ws)
        return tuned(kind, q, meta, tma, ws)

    return record


def main() -> int:
    if not kernels._WS_STATE["ok"]:
        print("this triton has no tl.range(warp_specialize=...): no warp-specialised config to probe")
        return 0
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The interpreter computes bf16 wrongly, and is slow: fp16 and short sequences there.
    dtype, L = (torch.bfloat16, 1000) if device == "cuda" else (torch.float16, 70)
    fwd, _ = _library.pair("attention", "triton")
    launches: list = []
    kernels._tuned = _recording_warp_spec(launches)
    failed = 0
    for D, Hk, causal in CASES:
        configs = [c for c in kernels.candidates("fwd", dtype, D) if kernels._warp_specialized(c)]
        S = L if causal else L - 37
        q = torch.randn(2, 4, L, D, device=device, dtype=dtype)
        k, v = (torch.randn(2, Hk, S, D, device=device, dtype=dtype) for _ in range(2))
        kw = dict(is_causal=causal, enable_gqa=Hk != 4)
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
        same = F.scaled_dot_product_attention(q, k, v, **kw)
        # The tolerance rule: twice torch's own error in this dtype, plus a floor for a lucky torch.
        bound = 2 * (same.float() - want).abs().max().item() + 1e-3
        for config in configs:
            kernels.FORCED["fwd"] = config
            launches.clear()
            try:
                out, _ = fwd(q, k, v, None, 0.0, causal, D**-0.5, torch.zeros(2, dtype=torch.int64))
                err = (out.float() - want).abs().max().item()
            except Exception as e:  # noqa: BLE001  (every failure is reported, then the exit status says it)
                lines = str(e).strip().splitlines()
                err, note = float("nan"), f"{type(e).__name__}: {lines[0] if lines else ''}"
            else:
                note = f"max error {err:.3g}, bound {bound:.3g}"
                if launches != [True]:
                    err, note = float("nan"), f"ran without warp specialisation ({note})"
            ok = err <= bound
            failed += not ok
            what = f"D={D} Hk={Hk} L={L} S={S} causal={causal} {config}"
            print(f"warp-specialised forward {what}: {'ok' if ok else 'FAILED'} ({note})", flush=True)
            kernels.FORCED.pop("fwd")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
