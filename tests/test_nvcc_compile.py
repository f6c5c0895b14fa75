"""Every csrc/cuda/*.cu kernel file compiles with nvcc for sm_80 and sm_90a, with the flags the extension build
uses, and its ptxas register / shared-memory / spill report lands in build/ptxas/<file>-<arch>.txt.

The kernel files include no torch header, so this runs on CPU machines with only nvcc installed. The torch
bindings (csrc/cuda/*_binding.cpp) need a CUDA build of torch and are compiled by the GPU build only.
"""
import concurrent.futures
import functools
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
REPORT_DIR = os.path.join(ROOT, "build", "ptxas")
SOURCES = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
ARCHS = {"sm_80": "-gencode=arch=compute_80,code=sm_80", "sm_90a": "-gencode=arch=compute_90a,code=sm_90a"}
TIMEOUT_S = 900
# torch's BuildExtension adds these to every nvcc call (COMMON_NVCC_FLAGS): half/bf16 code must compile
# without implicit conversions or operators. The rest mirrors setup.py's nvcc flags and torch's C++20.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-std=c++20",
]
SETUP_NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else None


def _compile(source: str, arch: str) -> subprocess.CompletedProcess:
    out_dir = os.path.join(ROOT, "build", "nvcc")
    os.makedirs(out_dir, exist_ok=True)
    cmd = [
        _nvcc(), "-c", os.path.join(CUDA_DIR, source), "-o", os.path.join(out_dir, f"{source}-{arch}.o"),
        ARCHS[arch], "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc"),
        *SETUP_NVCC_FLAGS, *TORCH_NVCC_FLAGS,
    ]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, "", f"nvcc timed out after {TIMEOUT_S}s\n{e.stderr or ''}")


@functools.cache
def _results() -> dict:
    """All (file, arch) compiles, two nvcc processes at a time (these machines have 2 cores)."""
    jobs = [(s, a) for s in SOURCES for a in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {job: pool.submit(_compile, *job) for job in jobs}
        results = {job: f.result() for job, f in futures.items()}
    os.makedirs(REPORT_DIR, exist_ok=True)
    for (source, arch), res in results.items():
        with open(os.path.join(REPORT_DIR, f"{source}-{arch}.txt"), "w") as f:
            f.write(" ".join(res.args) + f"\nexit status {res.returncode}\n\n{res.stdout}{res.stderr}")
    with open(os.path.join(REPORT_DIR, "summary.txt"), "w") as f:
        for (source, arch), res in results.items():
            f.write(f"== {source} {arch}\n{_summary(res.stderr)}\n")
    return results


def _summary(ptxas: str) -> str:
    """One line per kernel: demangled-ish name, registers, shared memory, spills."""
    lines, name = [], None
    for line in ptxas.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
        elif name and ("spill" in line or "Used" in line):
            lines.append(f"{name}: {line.strip()}")
    return "\n".join(lines)


pytestmark = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def test_there_are_kernel_files():
    # Guards the parametrisation below against an empty glob passing vacuously.
    assert {"softmax.cu", "cross_entropy.cu", "attention.cu"} <= set(SOURCES)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_compiles(source, arch):
    res = _results()[(source, arch)]
    assert res.returncode == 0, f"nvcc failed for {source} ({arch}):\n{res.stderr[-4000:]}"
    ours = [l for l in res.stderr.splitlines() if "warning" in l.lower() and "csrc/cuda" in l]
    assert not ours, f"nvcc warnings in {source} ({arch}):\n" + "\n".join(ours)
    assert "Used" in res.stderr, f"no ptxas report for {source} ({arch}): was -Xptxas -v dropped?"


@pytest.mark.parametrize("source", SOURCES)
def test_kernel_files_include_no_torch(source):
    # The CPU torch wheel lacks parts of c10/cuda: a torch header here would break the check above on CI
    # and mix the dispatcher into kernel code that should only see pointers and sizes.
    text = open(os.path.join(CUDA_DIR, source)).read()
    includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', text)
    assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")], includes
