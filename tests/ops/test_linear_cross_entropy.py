"""ops.linear_cross_entropy on every backend that runs here, against F.cross_entropy on the full logits.

Expected values: F.cross_entropy(hidden @ weight.T + bias) (+ z_loss * lse^2) in higher precision (fp64
for fp32 inputs, fp32 for half inputs); the same in the input dtype sets the error budget (design.md's rule).
Both autograd paths of the public op are checked for the loss and all three gradients: fp32 with reduction
'mean'/'sum' (gradients computed during the forward), and 'none' or fp16/bf16 (the backward recomputes the
logits: by token chunks, or where takes_vocab_slices says so a slice of the vocab at a time).
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptfast import backends, ops
from gptfast.testing import assert_close, reference_dtype

from backends_under_test import cases, ids

CASES = cases("linear_cross_entropy")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_interpreted_bf16(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 wrongly; bf16 Triton runs in the GPU tests")


def torch_linear_cross_entropy(
    hidden,
    weight,
    target,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    chunk_size=None,
):
    """The unfused spec: full logits, F.cross_entropy, plus z_loss * lse^2 on non-ignored rows."""
    logits = F.linear(hidden, weight, bias).reshape(-1, weight.shape[0])
    t = target.reshape(-1).long()
    rows = F.cross_entropy(
        logits, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid = t != ignore_index
    if z_loss:
        rows = rows + torch.where(valid, z_loss * torch.logsumexp(logits, -1) ** 2, 0.0)
    if reduction == "none":
        return rows.reshape(target.shape)
    return rows.sum() if reduction == "sum" else rows.sum() / valid.sum()


def check_against_torch(hidden, weight, target, bias, backend, **options):
    hp = reference_dtype(hidden.dtype)
    out_shape = target.shape if options.get("reduction") == "none" else ()
    upstream = torch.rand(out_shape, device=hidden.device) + 0.5
    names = ["hidden", "weight"] + (["bias"] if bias is not None else [])

    def run(fn, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias) if t is not None]
        h, w, *b = inputs
        out = fn(h, w, target, b[0] if b else None)
        grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype))
        return out, grads

    out, grads = run(
        lambda h, w, t, b: ops.linear_cross_entropy(h, w, t, b, backend=backend, **options), hidden.dtype
    )
    opts = {k: v for k, v in options.items() if k != "chunk_size"}
    ref, ref_grads = run(lambda h, w, t, b: torch_linear_cross_entropy(h, w, t, b, **opts), hp)
    same, same_grads = run(lambda h, w, t, b: torch_linear_cross_entropy(h, w, t, b, **opts), hidden.dtype)
    assert out.dtype == hidden.dtype and out.shape == ref.shape
    assert_close(out, ref, same, "linear_cross_entropy loss")
    for name, g, rg, sg in zip(names, grads, ref_grads, same_grads):
        assert g.dtype == hidden.dtype
        assert_close(g, rg, sg, f"d{name}")


def _inputs(rows_shape, H, V, device, dtype, bias=True, ignore_rows=(), target_dtype=torch.int64):
    hidden = torch.randn(*rows_shape, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    t = torch.randint(0, V, rows_shape, device=device, dtype=target_dtype)
    for r in ignore_rows:
        t.view(-1)[r] = -100
    return hidden, weight, t, b


# (rows shape, H, V, bias, options, ignored rows, why)
SETTINGS = [
    ((13,), 16, 37, True, {"chunk_size": 5}, (4,), "chunk size that does not divide N, bias, mean"),
    ((13,), 16, 37, False, {"chunk_size": 5, "reduction": "none"}, (), "recompute path, no bias"),
    (
        (2, 5),
        8,
        50,
        True,
        {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3},
        (0, 9),
        "(B, T, H) input, default chunk size, every option",
    ),
    (
        (9,),
        24,
        33,
        True,
        {"chunk_size": 4, "reduction": "none", "label_smoothing": 0.2, "z_loss": 1e-2},
        (3,),
        "recompute path with every option",
    ),
    ((1,), 8, 1, False, {}, (), "one token, one class"),
    ((6,), 12, 40, True, {"chunk_size": 100}, (), "one chunk larger than N"),
    # fp16/bf16 over several chunks: the Triton backward takes dW by vocab slices of max(256, 8 * 700 // 40)
    # columns, so 256, 256 and a partial 188, each target's slice different from its chunk
    (
        (40,),
        16,
        700,
        True,
        {"chunk_size": 8, "label_smoothing": 0.1, "z_loss": 1e-3},
        (3, 17),
        "vocab slices, mean, every option",
    ),
    ((40,), 16, 700, False, {"chunk_size": 8, "reduction": "none"}, (5,), "vocab slices, per-row dloss"),
    # more tokens than classes: slices would hold more than the (V, H) fp32 dW accumulator, so half inputs
    # sum dW over the 8 chunks in fp32 (64 * (2 * 16 + 20) >= 20 * (2 * 16 + 8): takes_vocab_slices)
    ((64,), 16, 20, True, {"chunk_size": 8, "z_loss": 1e-3}, (9,), "more tokens than classes, mean"),
]


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,H,V,bias,options,ignore_rows,why", SETTINGS, ids=[s[-1] for s in SETTINGS])
def test_matches_torch(backend, device, dtype, rows, H, V, bias, options, ignore_rows, why):
    _skip_interpreted_bf16(backend, device, dtype)
    hidden, weight, t, b = _inputs(rows, H, V, device, dtype, bias, ignore_rows)
    check_against_torch(hidden, weight, t, b, backend, **options)


@pytest.mark.parametrize(
    "dtype,rows,V,slices",
    [(torch.float16, 40, 700, [0, 256, 512]), (torch.float32, 40, 700, []), (torch.float16, 64, 20, [])],
    ids=str,
)
def test_triton_half_backward_goes_by_vocab_slices(monkeypatch, dtype, rows, V, slices):
    # The point of the slices is that no (V, H) fp32 dW accumulator exists: fp16/bf16 inputs of several chunks
    # and fewer tokens than about V must reach the vocab pass, even with reduction 'mean' (the public op's
    # recompute path). fp32 inputs sum dW over token chunks in the gradient itself, and so do half inputs of
    # more tokens than classes. Records the windows the backward kernel is launched on.
    if not any(b == "triton" for b, _ in CASES):
        pytest.skip("no triton backend here")
    from gptfast.kernels import linear_cross_entropy as lce

    device = next(d for b, d in CASES if b == "triton")
    starts = []
    launch = lce.cross_entropy_backward

    def recording(*args, col_start=0, **kwargs):
        if kwargs.get("vocab") is not None:
            starts.append(col_start)
        return launch(*args, col_start=col_start, **kwargs)

    monkeypatch.setattr(lce, "cross_entropy_backward", recording)
    hidden, weight, t, b = _inputs((rows,), 16, V, device, dtype, True)
    check_against_torch(hidden, weight, t, b, "triton", chunk_size=8)
    assert starts == slices


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_int32_targets(backend, device, reduction):
    # int32 targets on both paths
    hidden, weight, t, b = _inputs((10,), 8, 21, device, torch.float32, True, (2,), torch.int32)
    check_against_torch(hidden, weight, t, b, backend, reduction=reduction, chunk_size=3)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_no_grad_forward_equals_grad_forward(backend, device):
    # the loss must not depend on which path computed it
    hidden, weight, t, b = _inputs((11,), 8, 30, device, torch.float32, True, (5,))
    with torch.no_grad():
        plain = ops.linear_cross_entropy(hidden, weight, t, b, chunk_size=4, backend=backend)
    graded = ops.linear_cross_entropy(hidden.requires_grad_(), weight, t, b, chunk_size=4, backend=backend)
    torch.testing.assert_close(graded.detach(), plain)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_all_rows_ignored(backend, device):
    # as torch: 'mean' is NaN, 'sum' is 0 with zero gradients
    hidden, weight, t, b = _inputs((5,), 8, 12, device, torch.float32, True, range(5))
    hidden.requires_grad_()
    assert ops.linear_cross_entropy(hidden, weight, t, b, backend=backend).isnan()
    total = ops.linear_cross_entropy(hidden, weight, t, b, reduction="sum", backend=backend)
    (g,) = torch.autograd.grad(total, hidden)
    assert total.item() == 0.0 and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_empty_batch(backend, device):
    # zero tokens: 'sum' is 0, 'none' is empty, gradients are zeros of the right shapes
    hidden, weight, t, b = _inputs((0,), 8, 12, device, torch.float32, True)
    inputs = [x.requires_grad_() for x in (hidden, weight, b)]
    assert ops.linear_cross_entropy(*inputs[:2], t, inputs[2], reduction="none", backend=backend).shape == (
        0,
    )
    total = ops.linear_cross_entropy(*inputs[:2], t, inputs[2], reduction="sum", backend=backend)
    total.backward()
    assert total.item() == 0.0 and hidden.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_float64_inputs(backend, device):
    # fp64 stays fp64 (options exactly representable in fp32, which the Triton kernels receive)
    hidden, weight, t, b = _inputs((7,), 6, 19, device, torch.float64, True, (2,))
    check_against_torch(hidden, weight, t, b, backend, chunk_size=3, label_smoothing=0.25, z_loss=0.125)
    check_against_torch(hidden, weight, t, b, backend, chunk_size=3, reduction="none")


def test_reference_gradcheck_float64():
    hidden, weight, t, b = _inputs((5,), 4, 7, "cpu", torch.float64, True, (1,))
    inputs = tuple(x.requires_grad_() for x in (hidden, weight, b))
    for options in ({"reduction": "sum", "label_smoothing": 0.2, "z_loss": 0.1}, {"reduction": "none"}, {}):
        assert torch.autograd.gradcheck(
            lambda h, w, bb: ops.linear_cross_entropy(
                h, w, t, bb, chunk_size=2, backend="reference", **options
            ),
            inputs,
        )


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, device, reduction):
    hidden, weight, t, b = _inputs((2, 5), 8, 23, device, torch.float32, True, (3,))

    def fn(h, w, bb):
        return ops.linear_cross_entropy(
            h, w, t, bb, reduction=reduction, chunk_size=3, z_loss=1e-3, backend=backend
        ).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_in = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    comp_in = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    out_e, out_c = fn(*eager_in), compiled(*comp_in)
    out_e.backward()
    out_c.backward()
    torch.testing.assert_close(out_c, out_e)
    for a, e in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, e.grad)


# ----------------------------------------------------------------------------------------- peak memory
_PEAK_SCRIPT = r"""
import sys, torch
from torch.profiler import ProfilerActivity, profile
from gptfast import ops
from gptfast.ops.linear_cross_entropy import OP  # noqa: F401  (registers the op before profiling)

def peak_bytes(fn):
    # The CPU allocator's own record: every allocation and free, in order; the peak of the running total.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    total = top = 0
    for _, n in events:
        total += n
        top = max(top, total)
    return top

torch.manual_seed(0)
N, H, V = 1024, 32, 4096
hidden = torch.randn(N, H, requires_grad=True)
weight = (torch.randn(V, H) / 8).requires_grad_()
target = torch.randint(0, V, (N,))
backend = sys.argv[1]

def fused():
    ops.linear_cross_entropy(hidden, weight, target, chunk_size=64, backend=backend).backward()

def unfused():
    torch.nn.functional.cross_entropy(hidden @ weight.T, target).backward()

fused(); unfused()  # warm up: registration and first-call allocations are not the op's
print(peak_bytes(fused), peak_bytes(unfused))
"""


# Triton's peak memory is a GPU matter (test_triton_peak_memory_gpu); the interpreter would take minutes.
CPU_NATIVE = [c for c in CASES if c[1] == "cpu" and c[0] != "triton"]


@pytest.mark.parametrize("backend,device", CPU_NATIVE, ids=ids(CPU_NATIVE))
def test_chunked_peak_memory_far_below_unfused(backend, device):
    # N=1024 tokens, V=4096: the unfused logits are 16 MiB (fp32) and torch keeps several such (N, V) tensors
    # alive; chunk_size=64 keeps 1 MiB of logits at a time (plus the backend's per-chunk temporaries).
    # Measured by the CPU allocator through the profiler, in a fresh process, over forward+backward; the
    # weight gradient (0.5 MiB) is in both.
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, backend], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fused, unfused = map(int, proc.stdout.split()[-2:])
    logits_bytes = 1024 * 4096 * 4
    assert unfused >= 2 * logits_bytes, f"the unfused baseline should hold >= 2 logits tensors, got {unfused}"
    # issue 3's GPU target for this op is <= 25% of unfused torch; the CPU paths must meet it too
    assert fused <= 0.25 * unfused, (
        f"chunked peak {fused / 2**20:.1f} MiB vs unfused {unfused / 2**20:.1f} MiB"
    )


# --------------------------------------------------------------------------------------- triton paths
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_bf16_gpu(reduction):
    hidden, weight, t, b = _inputs((1000,), 256, 32000, "cuda", torch.bfloat16, True, (7, 500))
    check_against_torch(
        hidden, weight, t, b, "triton", reduction=reduction, chunk_size=300, label_smoothing=0.1
    )


@pytest.mark.gpu
@pytest.mark.parametrize("H,V", [(1024, 32000), (4096, 128256)])
def test_triton_peak_memory_gpu(H, V):
    # 8192 tokens, bf16, forward+backward, the gradients included; issue 3's target is <= 25% of unfused
    # torch at H 4096, V 128256 (the second case). At H 1024, V 32000 the unfused step holds several (N, V)
    # tensors (about 2 GiB) and the op (default 1024-row chunks, so the backward by vocab slices) a 62.5 MiB
    # logits buffer, dW (62.5 MiB) and dhidden's fp32 accumulator (32 MiB): about 10%, by count. At the
    # target shape, by count: 1.35 GiB against the 5.87 GiB unfused torch peaked at on an H200 (23%).
    hidden, weight, t, _ = _inputs((8192,), H, V, "cuda", torch.bfloat16, False)
    hidden.requires_grad_()
    weight.requires_grad_()

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def fused():
        ops.linear_cross_entropy(hidden, weight, t, backend="triton").backward()

    def unfused():
        F.cross_entropy(hidden @ weight.T, t).backward()

    fused()
    unfused()
    hidden.grad = weight.grad = None
    f = peak(fused)
    hidden.grad = weight.grad = None
    u = peak(unfused)
    print(f"linear_cross_entropy peak: triton {f / 2**20:.0f} MiB, unfused {u / 2**20:.0f} MiB ({f / u:.1%})")
    assert f <= 0.25 * u


# ---------------------------------------------------------------------------------------------- errors
def test_argument_errors():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match="hidden must have dtype"):
        ops.linear_cross_entropy(h.long(), w, t)
    with pytest.raises(TypeError, match="target must have dtype"):
        ops.linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match=r"weight must be \(V, 8\)"):
        ops.linear_cross_entropy(h, torch.randn(10, 7), t)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        ops.linear_cross_entropy(h, w, t, torch.randn(9))
    with pytest.raises(TypeError, match="weight must have the same dtype as hidden"):
        ops.linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        ops.linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.linear_cross_entropy(h, w, t, reduction="max")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ops.linear_cross_entropy(h, w, t, label_smoothing=2.0)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            ops.linear_cross_entropy(h, w, t, chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size must be a positive int or None, got float"):
        ops.linear_cross_entropy(h, w, t, chunk_size=2.5)


def test_out_of_range_target_raises_on_cpu_reference():
    h, w = torch.randn(3, 4), torch.randn(6, 4)
    with pytest.raises(IndexError, match=r"target values must be in \[0, 6\)"):
        ops.linear_cross_entropy(h, w, torch.tensor([0, 6, 1]), backend="reference")


def test_unknown_backend_lists_names():
    with pytest.raises(ValueError, match="known backends: reference, triton, cuda, cpu"):
        ops.linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), backend="nope")


def test_backend_that_cannot_run_names_reason():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(
        RuntimeError, match="gptfast backend 'cuda' cannot run linear_cross_entropy: .+"
    ) as info:
        ops.linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), backend="cuda")
    assert isinstance(info.value, backends.BackendUnavailable)
