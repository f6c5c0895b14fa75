"""Registers and spills of the Triton kernels as ptxas builds them for the H200 (sm_90a), on a CPU machine.

The interpreter says nothing about register pressure, and a kernel that spills is slow however well its
config is chosen. This compiles the kernels' compile cases with triton.compile for GPUTarget("cuda", 90, 32),
runs the PTX through `ptxas -v` (the one triton itself runs for sm_90a) and prints one line per case:
registers, spill stores/loads and shared memory. It is how the autotune candidate lists in kernels/*.py were
pruned.

    python scripts/triton_ptxas.py [--all] [--sass] [--filter SUBSTRING ...] [--jobs N]

--all uses each module's ALL_COMPILE_CASES (every autotune candidate) where it has one. --sass adds the
kernel's SASS instruction count and its tensor-core (HGMMA), exponential (MUFU), FP32 (FFMA/FMUL/FADD) and copy
(LDGSTS cp.async, UTMALDG TMA) instructions, read off the cubin with cuobjdump: a static count, not a
timing, but it shows what a change to a kernel's inner loop removed. Run it without TRITON_INTERPRET=1; it
exits non-zero if a case fails to compile.
"""

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SASS_OP = re.compile(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_SASS_KEYS = ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "LDGSTS", "UTMALDG")


def _cases(use_all: bool, sass: bool):
    import gptfast.kernels

    for info in pkgutil.iter_modules(gptfast.kernels.__path__):
        module = importlib.import_module(f"gptfast.kernels.{info.name}")
        cases = getattr(module, "ALL_COMPILE_CASES", None) if use_all else None
        for case in cases or getattr(module, "COMPILE_CASES", ()):
            yield f"{info.name}:{case['name']}", module.__name__, case["name"], use_all, sass


def _ptxas() -> str:
    """The ptxas triton itself runs for sm_90a (it reads the PTX version triton writes; nvcc's may not)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def _sass_counts(cubin: bytes, tmp: str) -> str:
    import triton

    path = os.path.join(tmp, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    ops = [m.group(1).split(".")[0] for m in map(_SASS_OP.match, sass.splitlines()) if m]
    return f"sass {len(ops):>5} " + " ".join(f"{k}={ops.count(k)}" for k in _SASS_KEYS)


def _report(job) -> tuple[str, str]:
    key, module_name, case_name, use_all, sass = job
    import triton
    from triton.backends.compiler import GPUTarget

    module = importlib.import_module(module_name)
    cases = (getattr(module, "ALL_COMPILE_CASES", None) if use_all else None) or module.COMPILE_CASES
    case = next(c for c in cases if c["name"] == case_name)
    try:
        src = triton.compiler.ASTSource(case["fn"], case["signature"], case["constexprs"], case.get("attrs"))
        out = triton.compile(
            src,
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]},
        )
    except Exception as e:  # noqa: BLE001 - reported per case
        return key, f"COMPILE ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(out.asm["ptx"])
        proc = subprocess.run(
            [_ptxas(), "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
    text = proc.stdout + proc.stderr
    regs = _PTXAS_LINE.search(text)
    spills = _SPILL_LINE.search(text)
    if proc.returncode != 0 or not regs:
        return key, f"PTXAS ERROR {text.strip().splitlines()[-1][:200] if text.strip() else proc.returncode}"
    spill = f"spill {spills.group(1)}/{spills.group(2)} B" if spills else "spill ?"
    shared = f"smem {out.metadata.shared // 1024} KB"
    line = f"regs {regs.group(1):>3}  {spill:<16} {shared:<11}"
    if sass:
        with tempfile.TemporaryDirectory() as tmp:
            line += "  " + _sass_counts(out.asm["cubin"], tmp)
    return key, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every autotune candidate (ALL_COMPILE_CASES)")
    parser.add_argument("--sass", action="store_true", help="SASS instruction counts too")
    parser.add_argument("--filter", nargs="*", default=[], help="keep cases whose name has every substring")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the compiler cannot run under the interpreter")
    jobs = [j for j in _cases(args.all, args.sass) if all(s in j[0] for s in args.filter)]
    failed = 0
    with ProcessPoolExecutor(args.jobs) as pool:
        for key, line in pool.map(_report, jobs):
            failed += "ERROR" in line
            print(f"{key:<72} {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
