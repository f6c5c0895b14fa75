"""Backend names, availability and the selection order: argument > use() > GPTFAST_BACKEND > automatic."""
import pytest
import torch

import gptfast
from gptfast import backends, ops
from gptfast.ops import _library


def test_reference_is_always_available():
    assert "reference" in backends.available()
    assert "reference" in backends.available("cpu", "attention")


def test_available_lists_only_known_names_in_order():
    names = backends.available()
    assert set(names) <= set(backends.NAMES)
    assert names == [n for n in backends.NAMES if n in names]


def test_unknown_name_lists_the_known_ones():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="known backends: reference, triton, cuda, cpu"):
        ops.softmax(x, backend="fast")
    with pytest.raises(ValueError, match="unknown gptfast backend 'fast'"):
        with backends.use("fast"):
            pass


def test_named_backend_that_cannot_run_raises_with_reason_and_fix():
    x = torch.randn(2, 3)
    # CUDA kernels never run on CPU tensors, whether or not the extension has them.
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run softmax: .*") as info:
        ops.softmax(x, backend="cuda")
    assert isinstance(info.value, backends.BackendUnavailable)


def test_env_var_is_read_at_call_time(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("GPTFAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda'"):
        ops.softmax(x)
    monkeypatch.setenv("GPTFAST_BACKEND", "reference")
    torch.testing.assert_close(ops.softmax(x), torch.softmax(x, -1))
    monkeypatch.setenv("GPTFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        ops.softmax(x)


def test_use_beats_env_and_argument_beats_use(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("GPTFAST_BACKEND", "cuda")
    with backends.use("reference"):
        ops.softmax(x)  # use() overrides the env var
        with backends.use("cuda"):
            ops.softmax(x, backend="reference")  # the argument overrides use()
            with pytest.raises(RuntimeError):
                ops.softmax(x)
    assert backends.requested() == "cuda"


def test_use_restores_on_exit_and_on_error():
    with pytest.raises(KeyError):
        with backends.use("reference"):
            raise KeyError
    assert backends.requested() is None


def test_automatic_choice_prefers_the_extension_on_cpu():
    expected = "cpu" if backends.why_not("cpu", "softmax", torch.device("cpu")) is None else "reference"
    assert _library.resolve("softmax", torch.device("cpu")) == expected


def test_automatic_choice_skips_a_backend_that_refuses_the_arguments(monkeypatch):
    from gptfast.ops import extension

    monkeypatch.setattr(backends, "_has_dispatch_kernel", lambda op, key: True)
    monkeypatch.setattr(backends, "_extension_error", lambda: None)
    monkeypatch.setattr(extension, "unsupported_cpu", lambda op, **f: "no dropout" if f.get("dropout") else None)
    assert backends.select("attention", torch.device("cpu"), dropout=True) == "reference"
    assert backends.select("attention", torch.device("cpu"), dropout=False) == "cpu"
    with pytest.raises(RuntimeError, match="no dropout"):
        backends.select("attention", torch.device("cpu"), "cpu", dropout=True)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backends.why_not("triton", "softmax", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason


def test_deterministic_flag_is_scoped():
    assert not backends.is_deterministic()
    with backends.deterministic(True):
        assert backends.is_deterministic()
    assert not backends.is_deterministic()


def test_autotuning_is_off_when_deterministic(monkeypatch):
    # An autotuner's pick can differ between processes, and with it the rounding: deterministic runs use the
    # default configs (the Triton launchers read this at call time).
    monkeypatch.setenv("GPTFAST_AUTOTUNE", "1")
    assert backends.autotune_enabled()
    with backends.deterministic(True):
        assert not backends.autotune_enabled()
    assert backends.autotune_enabled()
    monkeypatch.setenv("GPTFAST_AUTOTUNE", "0")
    assert not backends.autotune_enabled()


def test_package_exports_the_design_api():
    for name in ("softmax", "cross_entropy", "linear_cross_entropy", "scaled_dot_product_attention"):
        assert callable(getattr(gptfast.ops, name))
    assert callable(gptfast.backends.available) and callable(gptfast.backends.use)


def test_opaque_triton_ops_launch_kernels_directly(monkeypatch):
    # An opaque (TRACEABLE = False) triton pair on a GPU is a custom_op that torch never traces into, so its
    # wrap_triton launches must run as plain kernel calls, as a triton_op's do when eager: left on, each would
    # take torch's traced-kernel path (about 1 ms of dispatch) and add to a side table that only grows.
    from torch._library.triton import is_wrap_triton_enabled

    seen = []

    def impl(x: torch.Tensor) -> torch.Tensor:
        seen.append(is_wrap_triton_enabled())
        return x.clone()

    monkeypatch.setattr(backends, "interpreting", lambda: False)
    op = _library._python_op("gptfast_test::opaque_launches", impl, "(Tensor x) -> Tensor", "triton", False)
    op(torch.ones(2))
    assert seen == [False]
    assert is_wrap_triton_enabled()  # and only inside the op
