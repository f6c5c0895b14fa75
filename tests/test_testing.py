"""design.md's tolerance rule (gptfast.testing.closeness), which every kernel test and the bench rely on."""

import math

import pytest
import torch

from gptfast import testing


def _direct(out, ref, torch_out):
    """The rule written out on whole tensors, for the finite case: (error, bound)."""
    o, r, t = out.double(), ref.double(), torch_out.double()
    err = (o - r).abs().max().item()
    half_ulp = torch.finfo(out.dtype).eps * 2.0 ** (math.frexp(r.abs().max().item())[1] - 2)
    rounding = max((r.to(out.dtype).double() - r).abs().max().item(), half_ulp)
    return err, 2 * max((t - r).abs().max().item(), rounding) + testing.FLOOR[out.dtype]


def test_within_twice_torchs_error_passes_and_beyond_fails():
    ref = torch.randn(1000, dtype=torch.float64)
    torch_out = (ref + 1e-3 * torch.randn(1000, dtype=torch.float64)).float()
    torch_err = (torch_out.double() - ref).abs().max().item()
    close = ref.float().clone()
    close[7] = ref[7] + 1.9 * torch_err
    far = ref.float().clone()
    far[7] = ref[7] + 2.1 * torch_err
    assert testing.closeness(close, ref, torch_out)
    c = testing.closeness(far, ref, torch_out)
    assert not c and c.error == pytest.approx(2.1 * torch_err, rel=1e-5)


def test_nan_and_inf_must_sit_where_the_reference_has_them():
    ref = torch.tensor([1.0, float("nan"), float("-inf")], dtype=torch.float64)
    good = torch.tensor([1.0, float("nan"), float("-inf")])
    assert testing.closeness(good, ref, good)
    for bad in (
        [float("nan"), float("nan"), float("-inf")],
        [1.0, 0.0, float("-inf")],
        [1.0, float("nan"), float("inf")],
    ):
        assert not testing.closeness(torch.tensor(bad), ref, good)


@pytest.mark.parametrize("where", [0, 4095, 9999])  # first chunk, a chunk boundary, the last partial chunk
def test_chunked_comparison_equals_the_whole_tensor_rule(monkeypatch, where):
    # Chunks of 4096 over 10,000 elements: three chunks, the last one partial; the worst error sits in each.
    monkeypatch.setattr(testing, "CHUNK", 4096)
    ref = torch.randn(100, 100, dtype=torch.float32)
    torch_out = (ref + 1e-3 * torch.randn(100, 100)).half()
    out = ref.half().clone()
    out.view(-1)[where] += 0.05
    c = testing.closeness(out, ref, torch_out)
    err, bound = _direct(out, ref, torch_out)
    assert c.error == pytest.approx(err) and c.bound == pytest.approx(bound) and c.ok == (err <= bound)
    assert not c.ok


def test_shape_mismatch_fails():
    assert not testing.closeness(torch.zeros(3), torch.zeros(4, dtype=torch.float64), torch.zeros(4))


def test_comparison_memory_is_bounded_by_the_chunk_not_the_tensor():
    # 2^24 fp32 elements (64 MiB each): whole-tensor float64 temporaries would take ~850 MiB; the chunked
    # comparison stays within a few chunks' worth (2^22 float64 = 32 MiB each) whatever the tensor's size.
    from gptfast.bench import memory

    ref = torch.randn(1 << 24)
    out, torch_out = ref + 1e-4, ref + 1e-3
    peak = memory.peak_bytes(lambda: testing.closeness(out, ref, torch_out), "cpu")
    assert peak <= 10 * testing.CHUNK * 8
