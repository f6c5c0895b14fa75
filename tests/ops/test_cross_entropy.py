"""ops.cross_entropy on every backend that runs here, against torch in higher precision (design.md's rule).

Expected values: F.cross_entropy on the logits upcast (fp64 for fp32 inputs, fp32 for half inputs) plus the
written z_loss term, z_loss * logsumexp(x)^2 on non-ignored rows; torch in the input dtype sets the error
budget.
Outputs and input gradients (for a random upstream gradient) are checked on every backend.
"""

import pytest
import torch
import torch.nn.functional as F

from gptfast import backends, ops
from gptfast.testing import assert_close, reference_dtype

from backends_under_test import assert_compiles_like_eager, cases, ids
from torch_spec import cross_entropy as torch_cross_entropy

CASES = cases("cross_entropy")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_interpreted_bf16(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 wrongly; bf16 Triton runs in the GPU tests")


def check_against_torch(x, target, backend, inplace_backward=False, **options):
    """ops.cross_entropy's value and d/dinput vs torch (upcast) within 2x torch's own same-dtype error.
    inplace_backward=True runs ours on a computed copy of the input (the in-place backward refuses leaves) and
    checks that the gradient it hands back is that copy's own storage."""
    hp = reference_dtype(x.dtype)
    out_shape = target.shape if options.get("reduction") == "none" else ()
    upstream = torch.rand(out_shape, device=x.device) + 0.5

    def run(fn, inp):
        inp = inp.detach().requires_grad_()
        out = fn(inp)
        (grad,) = torch.autograd.grad(out, inp, upstream.to(out.dtype))
        return out, grad

    def ours(t):
        if not inplace_backward:
            return ops.cross_entropy(t, target, backend=backend, **options)
        logits = t.clone()
        before = logits.detach().clone()
        logits.register_hook(lambda g: storages.append((g.data_ptr(), logits.data_ptr())))
        out = ops.cross_entropy(logits, target, backend=backend, inplace_backward=True, **options)
        assert torch.equal(logits.detach(), before), "the forward must leave the logits as they were"
        return out

    storages = []
    out, grad = run(ours, x)
    if inplace_backward:
        [(grad_ptr, logits_ptr)] = storages
        assert grad_ptr == logits_ptr or not x.is_contiguous(), "the gradient must reuse the logits' storage"
    ref, ref_grad = run(lambda t: torch_cross_entropy(t, target, **options), x.to(hp))
    same, same_grad = run(lambda t: torch_cross_entropy(t, target, **options), x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_close(out, ref, same, "cross_entropy loss")
    assert_close(grad, ref_grad, same_grad, "cross_entropy grad")


def _targets(shape, classes, device, ignore_rows=(), dtype=torch.int64, ignore_index=-100):
    t = torch.randint(0, classes, shape, device=device, dtype=dtype)
    flat = t.view(-1)
    for r in ignore_rows:
        flat[r] = ignore_index
    return t


# (input shape, options, rows set to ignore_index, why)
SETTINGS = [
    ((1, 1), {}, (), "one row of one class: loss 0, grad 0"),
    ((5, 37), {}, (), "odd vocab, fewer rows than anything"),
    ((6, 37), {"label_smoothing": 0.1}, (2,), "label smoothing with an ignored row"),
    ((6, 50), {"z_loss": 1e-2, "reduction": "sum"}, (0, 5), "z_loss, sum, ignored first and last rows"),
    (
        (2, 3, 50),
        {"label_smoothing": 0.2, "z_loss": 1e-3, "reduction": "none"},
        (1,),
        "(B, T, C), every option",
    ),
    ((4, 33), {"ignore_index": 7, "reduction": "none"}, (3,), "a non-default ignore_index"),
    ((3, 10000), {"label_smoothing": 0.05}, (), "vocab above the forward block, not a multiple of it"),
    ((37,), {}, (), "a single (C,) vector with a () target"),
]


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,options,ignore_rows,why", SETTINGS, ids=[s[3] for s in SETTINGS])
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["", "inplace_backward"])
def test_matches_torch(backend, device, dtype, shape, options, ignore_rows, why, inplace_backward):
    # inplace_backward: the same values and gradients, handed back in the logits' storage
    # (test_inplace_backward_saves_the_gradient_buffer checks the memory)
    _skip_interpreted_bf16(backend, device, dtype)
    x = 3 * torch.randn(shape, device=device).to(dtype)
    t = _targets(shape[:-1], shape[-1], device, ignore_rows, ignore_index=options.get("ignore_index", -100))
    check_against_torch(x, t, backend, inplace_backward=inplace_backward, **options)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_int32_targets_and_reductions(backend, device, reduction):
    # int32 class indices are read as such by every backend; each reduction of the same rows
    x = torch.randn(7, 29, device=device)
    t = _targets((7,), 29, device, (4,), dtype=torch.int32)
    check_against_torch(x, t, backend, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_input(backend, device, dtype):
    # a transposed (C, N) buffer viewed as (N, C), and a column slice: no layout assumptions
    base = torch.randn(31, 12, device=device).to(dtype)
    t = _targets((12,), 31, device, (3,))
    check_against_torch(base.t(), t, backend, z_loss=1e-3)
    check_against_torch(base.t()[:, ::2], torch.where(t >= 0, t % 16, t), backend, label_smoothing=0.1)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_inplace_backward_non_contiguous_input(backend, device):
    # a transposed buffer: the backward overwrites the op's contiguous copy, never the caller's tensor
    base = torch.randn(31, 12, device=device)
    t = _targets((12,), 31, device, (3,))
    check_against_torch(base.t(), t, backend, inplace_backward=True, z_loss=1e-3)
    # one class: torch calls a (3, 1) column with stride (1, 3) contiguous, so it is written in place
    one = torch.zeros(3, dtype=torch.long, device=device)
    check_against_torch(torch.randn(1, 3, device=device).t(), one, backend, inplace_backward=True)
    check_against_torch(torch.randn(1, 0, device=device).t(), one[:0], backend, inplace_backward=True)
    leaf = base.clone().requires_grad_()
    logits = leaf * 1.0
    view = logits.t()
    ops.cross_entropy(view, t, backend=backend, inplace_backward=True).backward()
    torch.testing.assert_close(logits.detach(), base, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_inplace_backward_overwrites_input_and_guards_other_users(backend, device):
    leaf = torch.randn(5, 23, device=device, requires_grad=True)
    t = _targets((5,), 23, device, (1,))
    # After backward the logits hold their gradient (the documented effect of the flag).
    logits = leaf * 2.0
    loss = ops.cross_entropy(logits, t, reduction="sum", backend=backend, inplace_backward=True)
    loss.backward()
    expected = torch.func.grad(lambda x: F.cross_entropy(x, t, reduction="sum"))(leaf.detach() * 2.0)
    torch.testing.assert_close(logits.detach(), expected)
    # A node that saved the same logits and runs its backward after ours must fail, not read gradients.
    logits = leaf * 2.0
    other = logits.pow(2).sum()
    loss = other + ops.cross_entropy(logits, t, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # A retained graph run backward a second time would read the overwritten logits: autograd refuses.
    logits = leaf * 2.0
    loss = ops.cross_entropy(logits, t, backend=backend, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # No double backward: create_graph=True raises instead of handing on a gradient treated as constant.
    loss = ops.cross_entropy(leaf * 2.0, t, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match=r"inplace_backward=True has no double backward.*create_graph"):
        torch.autograd.grad(loss, leaf, create_graph=True)
    # Without a gradient to compute there is nothing to write: the logits stay as they are.
    with torch.no_grad():
        logits = leaf * 2.0
        ops.cross_entropy(logits, t, backend=backend, inplace_backward=True)
        torch.testing.assert_close(logits, leaf * 2.0, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("hooks", ["saved_tensors_hooks", "checkpoint"])
def test_inplace_backward_stays_out_of_place_under_saved_tensor_hooks(backend, device, hooks):
    # Saved-tensor hooks skip autograd's version check, so an in-place write would reach the pow node, which
    # saved the same logits, unnoticed. Under them the op keeps its gradient out of place: the same result as
    # without the flag, and no error.
    from torch.utils.checkpoint import checkpoint

    hidden = torch.randn(6, 8, device=device, requires_grad=True)
    weight = torch.randn(29, 8, device=device, requires_grad=True)
    t = _targets((6,), 29, device, (2,))

    def loss_of(h, w, inplace):
        logits = h @ w.T
        return logits.pow(2).mean() + ops.cross_entropy(logits, t, backend=backend, inplace_backward=inplace)

    expected = torch.autograd.grad(loss_of(hidden, weight, False), (hidden, weight))
    if hooks == "checkpoint":
        loss = checkpoint(loss_of, hidden, weight, True, use_reentrant=False)
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
            loss = loss_of(hidden, weight, True)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), expected):
        torch.testing.assert_close(got, want)


KERNEL_CASES = [c for c in CASES if c[0] != "reference"]


@pytest.mark.parametrize("backend,device", KERNEL_CASES, ids=ids(KERNEL_CASES))
def test_inplace_backward_saves_the_gradient_buffer(backend, device):
    # An LM head and its loss, forward+backward. The step peaks in the loss's backward: the default holds the
    # logits and their dlogits there, the in-place backward only the logits, until the matmul's backward adds
    # dW and dhidden. So it saves the (M, V) buffer less those two, which head dim 8 keeps small: 1 MiB of
    # fp32 logits at 64 x 4096, 130 KiB of gradients. (The reference, a spec, allocates its dlogits and copies
    # them.) peak_bytes is the CUDA allocator's peak, or on the CPU the profiler's count of allocator events.
    from gptfast.bench.memory import peak_bytes

    if backend == "triton" and device == "cpu":
        pytest.skip(
            "the Triton interpreter frees blocks of earlier launches during later ones, which shifts the CPU "
            "profiler's count by a buffer; the in-place storage is checked on the CPU, the saving on GPUs"
        )
    M, H, V = 64, 8, 4096
    hidden = torch.randn(M, H, device=device, requires_grad=True)
    weight = torch.randn(V, H, device=device, requires_grad=True)
    t = _targets((M,), V, device, (5,))

    def peak(inplace):
        def step():
            loss = ops.cross_entropy(hidden @ weight.T, t, backend=backend, inplace_backward=inplace)
            loss.backward()

        hidden.grad = weight.grad = None  # outside the measured call: freeing them would offset its count
        return peak_bytes(step, device)

    peak(False), peak(True)  # first calls register the ops and warm the allocator
    saved = peak(False) - peak(True)
    expected = 4 * (M * V - V * H - M * H)
    assert saved >= 0.9 * expected, f"the in-place backward saved {saved} bytes, of {expected} expected"


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_inplace_backward_torch_compile_fullgraph(backend, device, compiler):
    # The compiled backward must still run the in-place op (seen by the profiler), with eager's values.
    x = torch.randn(2, 5, 21, device=device)
    t = _targets((2, 5), 21, device, (3,))

    def fn(inp):
        return ops.cross_entropy(inp * 2.0, t, z_loss=1e-3, backend=backend, inplace_backward=True)

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_c = fn(xe), compiled(xc)
    out_e.backward()
    with torch.profiler.profile() as prof:
        out_c.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xc.grad, xe.grad)
    names = {e.name for e in prof.events()}
    assert any("cross_entropy_bwd_inplace" in n for n in names), sorted(names)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_all_rows_ignored(backend, device):
    # as torch: 'mean' divides 0 by 0 (NaN), 'sum' is 0, and no gradient flows into ignored rows
    x = torch.randn(4, 11, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    mean = ops.cross_entropy(x, t, backend=backend, label_smoothing=0.1, z_loss=1e-2)
    assert mean.isnan()
    total = ops.cross_entropy(x, t, reduction="sum", backend=backend, z_loss=1e-2)
    assert total.item() == 0.0
    (g,) = torch.autograd.grad(total, x)
    assert torch.equal(g, torch.zeros_like(g))
    (g,) = torch.autograd.grad(ops.cross_entropy(x, t, backend=backend), x)
    assert torch.equal(g, torch.zeros_like(g))
    check_against_torch(x, t, backend, reduction="sum")


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_empty_batch(backend, device):
    # zero rows: 'sum' is 0, 'none' is empty, the gradient is empty
    x = torch.randn(0, 9, device=device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=device)
    assert ops.cross_entropy(x, t, reduction="none", backend=backend).shape == (0,)
    total = ops.cross_entropy(x, t, reduction="sum", backend=backend)
    total.backward()
    assert total.item() == 0.0 and x.grad.shape == (0, 9)


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_float64_inputs(backend, device):
    # fp64 logits stay fp64 (options exactly representable in fp32, which the Triton kernels receive)
    x = torch.randn(5, 40, dtype=torch.float64, device=device)
    t = _targets((5,), 40, device, (1,))
    check_against_torch(x, t, backend, label_smoothing=0.25, z_loss=0.125)


def test_reference_gradcheck_float64():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 5, 0])
    for options in ({}, {"label_smoothing": 0.3, "z_loss": 0.1, "reduction": "sum"}, {"reduction": "none"}):
        assert torch.autograd.gradcheck(
            lambda a: ops.cross_entropy(a, t, backend="reference", **options), (x,)
        )


@pytest.mark.parametrize("backend,device", CASES, ids=ids(CASES))
def test_torch_compile_fullgraph(backend, device):
    x = torch.randn(2, 5, 21, device=device)
    t = _targets((2, 5), 21, device, (3,))

    def fn(inp):
        return ops.cross_entropy(inp, t, label_smoothing=0.1, z_loss=1e-3, backend=backend)

    assert_compiles_like_eager(fn, x)


# --------------------------------------------------------------------------------------- triton paths
def _triton_kernels():
    devices = [d for b, d in CASES if b == "triton"]
    if not devices:
        pytest.skip("the triton backend cannot run here")
    from gptfast.kernels import cross_entropy as kernels

    return kernels, devices[0]


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_small_blocks_and_in_place_grad(block, dtype):
    # blocks far shorter than the 300-column rows (not a multiple of either) run the online forward over many
    # blocks and the backward over many programs per row; the in-place flag must equal the backward with
    # dloss = 1
    kernels, device = _triton_kernels()
    from gptfast.ops import reference

    x = (3 * torch.randn(6, 300, device=device)).to(dtype)
    t = _targets((6,), 300, device, (2,))
    args = (-100, 0.1, 1e-2)
    loss, lse = kernels.cross_entropy_forward(x, t, *args, block=block)
    ref_loss, ref_lse = reference.cross_entropy_fwd(x.to(reference_dtype(dtype)), t, *args)
    same_loss, same_lse = reference.cross_entropy_fwd(x, t, *args)
    assert_close(loss, ref_loss, same_loss, "loss")
    assert_close(lse, ref_lse, same_lse, "lse")
    dloss = torch.rand(6, device=device)
    g = kernels.cross_entropy_backward(dloss, x, t, lse, *args, block=block)
    assert_close(
        g,
        reference.cross_entropy_bwd(dloss, x.to(reference_dtype(dtype)), t, ref_lse, *args),
        reference.cross_entropy_bwd(dloss, x, t, same_lse, *args),
        "dlogits",
    )
    inplace = x.clone()
    loss2, _ = kernels.cross_entropy_forward(inplace, t, *args, grad_in_place=True, block=block)
    torch.testing.assert_close(loss2, loss)
    ones = torch.ones(6, device=device)
    torch.testing.assert_close(inplace, kernels.cross_entropy_backward(ones, x, t, lse, *args, block=block))
    out = x.clone()
    kernels.cross_entropy_backward(dloss, out, t, lse, *args, out=out, block=block)
    torch.testing.assert_close(out, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_backward_over_vocab_slices(dtype):
    # linear_cross_entropy's weight-gradient pass hands the backward one vocab slice at a time (columns
    # [col_start, col_start + n) of V, held at column 0 of a narrower buffer): the slices must reproduce the
    # full backward's columns. 300 columns in slices of 128, 128 and 44, with a block of 32 so that each slice
    # spans several programs; the targets fall in every slice (and one row is ignored), label smoothing and
    # z_loss make every column's term depend on V rather than on the slice width.
    kernels, device = _triton_kernels()
    x = (3 * torch.randn(8, 300, device=device)).to(dtype)
    t = torch.tensor([5, 130, 299, -100, 200, 0, 256, 127], device=device)
    args = (-100, 0.1, 1e-2)
    _, lse = kernels.cross_entropy_forward(x, t, *args)
    dloss = torch.rand(8, device=device) + 0.5
    full = kernels.cross_entropy_backward(dloss, x, t, lse, *args, block=32)
    for start, stop in ((0, 128), (128, 256), (256, 300)):
        part = x[:, start:stop].contiguous()
        window = dict(col_start=start, vocab=300)
        g = kernels.cross_entropy_backward(dloss, part, t, lse, *args, out=part, block=32, **window)
        torch.testing.assert_close(g, full[:, start:stop], rtol=0, atol=0)
    with pytest.raises(ValueError, match="lie outside V=300"):
        kernels.cross_entropy_backward(dloss, x[:, :64], t, lse, *args, col_start=256, vocab=300)


def test_triton_out_of_range_target_gives_nan():
    # documented: the Triton kernels never read outside the row; a target outside [0, V) that is not
    # ignore_index makes that row's loss and gradient NaN (the other rows are untouched). The launchers are
    # what runs on a GPU; on CPU tensors the pair raises before launching (test_validation.py).
    kernels, device = _triton_kernels()
    x = torch.randn(4, 10, device=device)
    t = torch.tensor([3, 10, -5, -100], device=device)
    loss, lse = kernels.cross_entropy_forward(x, t, -100, 0.0, 0.0)
    assert loss[1].isnan() and loss[2].isnan() and loss[0].isfinite() and loss[3] == 0
    g = kernels.cross_entropy_backward(torch.ones(4, device=device), x, t, lse, -100, 0.0, 0.0)
    assert g[1:3].isnan().all() and g[0].isfinite().all() and (g[3] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("V", [1000, 50257, 128256])
def test_triton_bf16_gpu(V):
    x = 3 * torch.randn(256, V, device="cuda", dtype=torch.bfloat16)
    t = _targets((256,), V, "cuda", (5, 100))
    check_against_torch(x, t, "triton")
    check_against_torch(x, t, "triton", label_smoothing=0.1, z_loss=1e-4, reduction="sum")


@pytest.mark.gpu
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_triton_every_candidate_block_gpu(monkeypatch, autotune):
    # The autotuner may pick any block of _candidates (num_warps only changes how a block is spread over
    # threads): each forward and backward block must be right, and so must the autotuned launch itself. V =
    # 40000 leaves a partial last block at every candidate width.
    monkeypatch.setenv("GPTFAST_AUTOTUNE", autotune)
    kernels, _ = _triton_kernels()
    V = 40000
    x = 3 * torch.randn(300, V, device="cuda", dtype=torch.bfloat16)
    t = _targets((300,), V, "cuda", (7,))
    dloss = torch.rand(300, device="cuda")

    def torch_loss_and_grad(logits):  # torch in logits' dtype: the error yardstick
        logits = logits.detach().requires_grad_()
        loss = F.cross_entropy(logits, t, reduction="none", label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, logits, dloss.to(loss.dtype))
        return loss.float(), grad

    want_loss, want_g = torch_loss_and_grad(x.float())
    same_loss, same_g = torch_loss_and_grad(x)
    want_lse = torch.logsumexp(x.float(), dim=-1)
    fwd = [c["BLOCK"] for c in kernels._candidates(V, kernels.FWD_BLOCK, kernels._FWD_TRIES)]
    bwd = [c["BLOCK"] for c in kernels._candidates(V, kernels.BWD_BLOCK, kernels._BWD_TRIES)]
    for block in [None] + fwd:
        loss, _ = kernels.cross_entropy_forward(x, t, -100, 0.1, 0.0, block=block)
        assert_close(loss, want_loss, same_loss, f"loss, forward block {block}")
    for block in [None] + bwd:
        g = kernels.cross_entropy_backward(dloss, x, t, want_lse, -100, 0.1, 0.0, block=block)
        assert_close(g, want_g, same_g, f"dlogits, backward block {block}")


@pytest.mark.gpu
def test_triton_64bit_offsets_gpu():
    # 16400 x 131072 bf16 = 2^31 + 52 Mi elements: the last rows start past 2^31 and must index correctly
    kernels, _ = _triton_kernels()
    x = torch.randn(16400, 131072, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 131072, (16400,), device="cuda")
    loss, lse = kernels.cross_entropy_fwd(x, t, -100, 0.0, 0.0)
    g = kernels.cross_entropy_bwd(torch.ones(16400, device="cuda"), x, t, lse, -100, 0.0, 0.0)
    tail, tt = x[-3:], t[-3:]
    assert_close(
        loss[-3:],
        F.cross_entropy(tail.float(), tt, reduction="none"),
        F.cross_entropy(tail, tt, reduction="none").float(),
        "loss past 2^31",
    )
    ref = tail.float().detach().requires_grad_()
    same = tail.detach().requires_grad_()
    F.cross_entropy(ref, tt, reduction="sum").backward()
    F.cross_entropy(same, tt, reduction="sum").backward()
    assert_close(g[-3:], ref.grad, same.grad, "dlogits past 2^31")


# ---------------------------------------------------------------------------------------------- errors
def test_argument_errors():
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="input must have dtype"):
        ops.cross_entropy(torch.ones(3, 5, dtype=torch.long), t)
    with pytest.raises(TypeError, match="target must have dtype"):
        ops.cross_entropy(x, t.float())
    with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
        ops.cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.cross_entropy(x, t, reduction="avg")
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            ops.cross_entropy(x, t, label_smoothing=bad)
    with pytest.raises(ValueError, match="z_loss must be in"):
        ops.cross_entropy(x, t, z_loss=-1.0)
    with pytest.raises(TypeError, match="inplace_backward must be a bool, got int"):
        ops.cross_entropy(x, t, inplace_backward=1)
    leaf = x.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"inplace_backward=True .* not a leaf tensor .*got a leaf of shape"):
        ops.cross_entropy(leaf, t, inplace_backward=True)
    with pytest.raises(ValueError, match=r"got a view of shape \(3, 5\) of a leaf of shape \(3, 5\)"):
        ops.cross_entropy(leaf.view(3, 5), t, inplace_backward=True)


def test_out_of_range_target_raises_on_cpu_reference():
    with pytest.raises(IndexError, match=r"target values must be in \[0, 5\) or ignore_index=-100; got 5"):
        ops.cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1]), backend="reference")


def test_unknown_backend_lists_names():
    with pytest.raises(ValueError, match="known backends: reference, triton, cuda, cpu"):
        ops.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="nope")


def test_backend_that_cannot_run_names_reason():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(RuntimeError, match="gptfast backend 'cuda' cannot run cross_entropy: .+") as info:
        ops.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")
    assert isinstance(info.value, backends.BackendUnavailable)


def test_loss_dtype_follows_torch_and_autocast():
    # torch returns the input's dtype, and float32 under autocast (cross_entropy is on autocast's fp32 list);
    # the custom ops sit outside autocast, so they apply the same rule themselves. out_dtype overrides it.
    logits, target = torch.randn(6, 11).bfloat16(), torch.randint(0, 11, (6,))
    hidden, weight = torch.randn(6, 8).bfloat16(), torch.randn(11, 8).bfloat16()
    assert ops.cross_entropy(logits, target).dtype == torch.bfloat16 == F.cross_entropy(logits, target).dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.cross_entropy(logits, target).dtype == torch.float32
        assert ops.cross_entropy(logits, target).dtype == torch.float32
        assert ops.linear_cross_entropy(hidden, weight, target).dtype == torch.float32
    exact = ops.cross_entropy(logits, target, out_dtype=torch.float32)
    assert exact.dtype == torch.float32
    torch.testing.assert_close(exact, F.cross_entropy(logits.float(), target), rtol=1e-6, atol=1e-6)
    assert ops.linear_cross_entropy(hidden, weight, target, out_dtype=torch.float64).dtype == torch.float64
    with pytest.raises(TypeError, match=r"out_dtype must be a floating torch.dtype or None, got torch.int64"):
        ops.cross_entropy(logits, target, out_dtype=torch.int64)
