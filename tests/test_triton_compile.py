"""Every Triton kernel in gptfast.kernels compiles for the H200 (sm_90a), over the configs the launchers pick.

The interpreter accepts programs the GPU compiler rejects (a tl.dot with K < 16, a layout the backend cannot
lower); triton.compile with a GPUTarget runs the real compiler on this CPU. Each kernels module lists its
cases in COMPILE_CASES: dicts with name, fn (the @triton.jit function), signature (arg -> "*fp16" / "i32" /
"fp32" / "constexpr"), constexprs, num_warps and num_stages, and optionally attrs (triton.compile's
specialisation attributes, e.g. {(0,): [["tt.divisibility", 16]]} for a 16-byte-aligned first argument).

The compiler cannot run in a process where TRITON_INTERPRET=1 (tl's own @jit helpers, such as tl.max's combine
function, are interpreter objects there), so one subprocess without it compiles every case and reports back.
"""

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import gptfast.kernels  # noqa: E402

_COMPILE_ALL = r"""
import importlib, json, pkgutil, sys
import triton
from triton.backends.compiler import GPUTarget
import gptfast.kernels

target = GPUTarget("cuda", 90, 32)
results = {}
for info in pkgutil.iter_modules(gptfast.kernels.__path__):
    module = importlib.import_module(f"gptfast.kernels.{info.name}")
    for case in getattr(module, "COMPILE_CASES", ()):
        key = f"{info.name}:{case['name']}"
        try:
            src = triton.compiler.ASTSource(
                case["fn"], case["signature"], case["constexprs"], case.get("attrs")
            )
            out = triton.compile(src, target=target,
                                 options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]})
            results[key] = {"ok": bool(out.asm.get("cubin")), "error": None}
        except Exception as e:  # reported per case by the test
            results[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
json.dump(results, sys.stdout)
"""


def _modules():
    return [
        importlib.import_module(f"gptfast.kernels.{m.name}")
        for m in pkgutil.iter_modules(gptfast.kernels.__path__)
    ]


def _case_ids():
    return [
        f"{m.__name__.rsplit('.', 1)[-1]}:{c['name']}"
        for m in _modules()
        for c in getattr(m, "COMPILE_CASES", ())
    ]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_ALL], capture_output=True, text=True, env=env, timeout=1200
    )
    assert proc.returncode == 0, f"the compile subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def test_every_kernel_module_lists_compile_cases():
    # A kernels module without COMPILE_CASES would silently skip the sm_90a check (a module that only reuses
    # another's kernels says so with an empty list).
    missing = [
        m.__name__
        for m in _modules()
        if not m.__name__.rsplit(".", 1)[-1].startswith("_")
        and not isinstance(getattr(m, "COMPILE_CASES", None), list)
    ]
    assert not missing, f"kernels modules without COMPILE_CASES: {missing}"


def test_compile_case_names_are_unique():
    ids = _case_ids()
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case_id", _case_ids())
def test_compiles_for_sm90a(compiled, case_id):
    result = compiled[case_id]
    assert result["ok"], f"{case_id} does not compile for sm_90a: {result['error']}"
