"""Every csrc/cuda/*.cu kernel file compiles with nvcc for sm_80 and sm_90a, with the flags the extension build
uses, and its ptxas register / shared-memory / spill report lands in build/ptxas/<file>-<arch>.txt.

The kernel files include no torch header, so this runs on CPU machines with only nvcc installed. The torch
bindings (csrc/cuda/*_binding.cpp) are linked by the GPU build only; here g++ -fsyntax-only checks them
against the CPU wheel's headers, with stand-ins for the CUDA library headers those include.
"""
import atexit
import concurrent.futures
import functools
import os
import re
import shutil
import subprocess
import tempfile

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


# The CPU torch wheel ships ATen/cuda and c10/cuda headers but not the CUDA libraries' headers they include;
# these stand-ins declare the few names those headers use, so the bindings compile here for a syntax and
# type check. Only the GPU build links them, and a binding error found there costs the lent machine's time.
_CUDA_LIB_STUBS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t; typedef int cusparseStatus_t;",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t; typedef int cublasStatus_t;",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;",
    "cusolver_common.h": "typedef int cusolverStatus_t;",
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}
BINDINGS = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith("_binding.cpp"))


def _compile_binding(binding: str, include: str, cuda_include: str, stubs: str) -> subprocess.CompletedProcess:
    cmd = [
        shutil.which("g++"), "-std=c++20", "-fsyntax-only", "-Wall", "-I", include,
        "-I", os.path.join(include, "torch", "csrc", "api", "include"), "-I", cuda_include, "-I", stubs,
        "-I", CUDA_DIR, "-I", os.path.join(ROOT, "csrc"), "-DTORCH_EXTENSION_NAME=_C", os.path.join(CUDA_DIR, binding),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


@functools.cache
def _binding_results() -> dict:
    """Every binding's syntax check, two g++ processes at a time; or a skip reason (str)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if shutil.which("g++") is None:
        return "g++ not found"
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(_nvcc()))), "include")]
    cuda_include = next((d for d in candidates if os.path.exists(os.path.join(d, "cuda_runtime_api.h"))), None)
    if cuda_include is None:
        return f"no cuda_runtime_api.h in {candidates} (set CUDA_HOME)"
    stubs = tempfile.mkdtemp(prefix="cuda_lib_stubs_")  # per process: xdist workers never share one
    atexit.register(shutil.rmtree, stubs, True)
    for name, text in _CUDA_LIB_STUBS.items():
        os.makedirs(os.path.dirname(os.path.join(stubs, name)), exist_ok=True)
        with open(os.path.join(stubs, name), "w") as f:
            f.write(text + "\n")
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {b: pool.submit(_compile_binding, b, include, cuda_include, stubs) for b in BINDINGS}
        return {b: f.result() for b, f in futures.items()}


@pytest.mark.parametrize("binding", BINDINGS)
def test_bindings_compile_against_the_torch_headers(binding):
    results = _binding_results()
    if isinstance(results, str):
        pytest.skip(results)
    res = results[binding]
    assert res.returncode == 0, f"{binding} does not compile:\n{res.stderr[-4000:]}"
    ours = [l for l in res.stderr.splitlines() if "warning" in l and "csrc/cuda" in l]
    assert not ours, f"warnings in {binding}:\n" + "\n".join(ours)


def test_there_are_bindings():
    assert {"softmax_binding.cpp", "cross_entropy_binding.cpp", "attention_binding.cpp"} <= set(BINDINGS)
