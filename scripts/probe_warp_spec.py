"""Runs each warp-specialised Triton attention forward config once and checks it, before anything relies on it.

Triton's Hopper warp-specialising pass is newer than the rest of its compiler: a config it splits could fail to
build, give wrong numbers, or deadlock on its barriers. scripts/gpu_check.sh runs this under a time limit
before the test suite and the bench; when it fails or hangs, the later steps run with
GPTFAST_TRITON_WARP_SPEC=0, so one bad config costs the probe's minute, not the device run. Exit status 0: every
config matched torch SDPA in fp32 within the bf16 tolerance; 1: one did not (each is named).

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


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The interpreter computes bf16 wrongly, and is slow: fp16 and short sequences there.
    dtype, L = (torch.bfloat16, 1000) if device == "cuda" else (torch.float16, 70)
    fwd, _ = _library.pair("attention", "triton")
    failed = 0
    for D in (64, 128, 256):
        configs = [c for c in kernels.candidates("fwd", dtype, D) if kernels._warp_specialized(c)]
        q, k, v = (torch.randn(2, 4, L, D, device=device, dtype=dtype) for _ in range(3))
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        same = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # The tolerance rule: twice torch's own error in this dtype, plus a floor for a lucky torch.
        bound = 2 * (same.float() - want).abs().max().item() + 1e-3
        for config in configs:
            kernels.FORCED["fwd"] = config
            try:
                out, _ = fwd(q, k, v, None, 0.0, True, D**-0.5, torch.zeros(2, dtype=torch.int64))
                err = (out.float() - want).abs().max().item()
            except Exception as e:
                err, note = float("nan"), f"{type(e).__name__}: {str(e).strip().splitlines()[:1]}"
            else:
                note = f"max error {err:.3g}, bound {bound:.3g}"
            ok = err <= bound
            failed += not ok
            print(f"warp-specialised forward D={D} {config}: {'ok' if ok else 'FAILED'} ({note})", flush=True)
            kernels.FORCED.pop("fwd")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
