"""Builds gptfast._C: the C++ CPU kernels always, the CUDA kernels too when a CUDA build of torch and nvcc exist.

GPTFAST_SKIP_EXT=1 installs the pure-Python package (reference and Triton backends only).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cap_max_jobs():
    # Each nvcc/c++ job over torch headers takes ~1.5 GB; more jobs than that swap a small machine to death.
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gb // 1.5))))


def _x86_64():
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def _extensions():
    if os.environ.get("GPTFAST_SKIP_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    _cap_max_jobs()
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    # at::vec::Vectorized picks its SIMD width from CPU_CAPABILITY at compile time; without it the kernels get
    # the scalar-array fallback. Every x86-64 host this project targets (CI, the dev machines, the GPU host)
    # has AVX2 + FMA, so the extension is compiled for exactly that (torch's own AVX2 kernel flags) and
    # gptfast/ops/extension.py refuses the "cpu" backend on a CPU without AVX2 (cpuinfo, through
    # torch.cpu._is_avx2_supported()), so no kernel runs an illegal instruction. Sleef's exp is resolved from
    # libtorch_cpu. Other architectures build the portable fallback.
    cxx = ["-O3", "-fopenmp"]
    if _x86_64():
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    # No -std here: torch picks it (C++20 for extensions since 2.10). The ptxas register/spill report is
    # produced by tests/test_nvcc_compile.py, not on every build (it would flood the build log).
    # --threads=2 compiles the two arch targets of a file side by side.
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "--threads=2"]
    define_macros = []
    use_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("GPTFAST_NO_CUDA") != "1"
    )
    if use_cuda:
        # A100 (sm_80) and H100/H200 (sm_90a: the arch-specific target that Hopper-only instructions need).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
        define_macros.append(("GPTFAST_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="gptfast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if use_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
