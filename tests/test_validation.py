"""Every bad input gets a clear error (issue 7): each public op, on every backend, for each class of bad
input.

An error has torch's type for the mistake (TypeError for a wrong dtype or type, ValueError for a wrong shape,
device or option, IndexError for an index out of range, as torch raises) and a message that names the
argument, what was expected and what was given. Argument checks run before a backend is chosen, so they are
the same for every backend name, cuda included; target values are checked by the backend itself (on CPU
tensors every backend raises; on CUDA they give NaN, see README.md), so those cases run on the backends
available here. Devices: this machine has no GPU, so the second device is "meta".
"""

import re

import pytest
import torch

from gptfast import backends, ops

from backends_under_test import cases

META = torch.device("meta")
NAMES = backends.NAMES  # every backend: the checks run before the backend is chosen


def _raises(call, error, *fragments):
    """call() raises `error` and its message matches every regex in `fragments`."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in the message: {message}"


def _available(op):
    return [b for b, d in cases(op) if d == "cpu"]


pytestmark = pytest.mark.usefixtures("single_thread")

# ---------------------------------------------------------------------------------------------- softmax
x = torch.randn(3, 5)
# (why, call(backend), error, fragments: the argument, what was expected, what was given)
SOFTMAX = [
    (
        "integer x",
        lambda b: ops.softmax(torch.ones(3, dtype=torch.int32), backend=b),
        TypeError,
        ["x must have dtype", "float32", "got int32"],
    ),
    (
        "x not a tensor",
        lambda b: ops.softmax([1.0, 2.0], backend=b),
        TypeError,
        ["x must be a torch.Tensor", "got list"],
    ),
    (
        "dim out of range",
        lambda b: ops.softmax(x, dim=2, backend=b),
        IndexError,
        ["dim must be in", r"\[-2, 1\]", "got 2"],
    ),
    (
        "causal on a 1-d x",
        lambda b: ops.softmax(torch.randn(4), causal=True, backend=b),
        ValueError,
        ["causal=True", ">= 2 dims", r"x.dim\(\)=1"],
    ),
    (
        "causal over dim 0",
        lambda b: ops.softmax(x, dim=0, causal=True, backend=b),
        ValueError,
        ["causal=True", "dim=-1", "dim=0"],
    ),
    (
        "scale a string",
        lambda b: ops.softmax(x, scale="0.5", backend=b),
        TypeError,
        ["scale must be a float", "got str"],
    ),
    (
        "scale NaN",
        lambda b: ops.softmax(x, scale=float("nan"), backend=b),
        ValueError,
        ["scale must be in", "got nan"],
    ),
]


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("why,call,error,fragments", SOFTMAX, ids=[c[0] for c in SOFTMAX])
def test_softmax(backend, why, call, error, fragments):
    _raises(lambda: call(backend), error, r"^softmax: ", *fragments)


# ------------------------------------------------------------------------------------------ cross entropy
t = torch.tensor([0, 1, 2])
CE = [
    (
        "integer logits",
        lambda b: ops.cross_entropy(torch.ones(3, 5, dtype=torch.long), t, backend=b),
        TypeError,
        ["input must have dtype", "float32", "got int64"],
    ),
    (
        "float targets",
        lambda b: ops.cross_entropy(x, t.float(), backend=b),
        TypeError,
        ["target must have dtype", "int64, int32", "got float32"],
    ),
    (
        "logits vs targets",
        lambda b: ops.cross_entropy(x, t[:2], backend=b),
        ValueError,
        [r"target must have shape \(3,\)", "input", r"got \(2,\)"],
    ),
    (
        "(B, T, C) logits vs (B*T,) targets",
        lambda b: ops.cross_entropy(torch.randn(2, 3, 5), torch.zeros(6).long(), backend=b),
        ValueError,
        [r"target must have shape \(2, 3\)", r"got \(6,\)"],
    ),
    (
        "4-d logits",
        lambda b: ops.cross_entropy(torch.randn(1, 1, 3, 5), t, backend=b),
        ValueError,
        ["input must be", r"\(B, T, C\)", r"got shape \(1, 1, 3, 5\)"],
    ),
    (
        "no classes",
        lambda b: ops.cross_entropy(torch.randn(3, 0), t, backend=b),
        ValueError,
        ["input must have at least one class", r"\(3, 0\)"],
    ),
    (
        "targets on another device",
        lambda b: ops.cross_entropy(x, t.to(META), backend=b),
        ValueError,
        ["target must be on the same device as input", r"\(cpu\)", "got meta"],
    ),
    (
        "bad reduction",
        lambda b: ops.cross_entropy(x, t, reduction="avg", backend=b),
        ValueError,
        ["reduction must be one of", "'mean'", "got 'avg'"],
    ),
    (
        "label_smoothing above 1",
        lambda b: ops.cross_entropy(x, t, label_smoothing=1.5, backend=b),
        ValueError,
        ["label_smoothing must be in", r"\[0.0, 1.0\]", "got 1.5"],
    ),
    (
        "negative z_loss",
        lambda b: ops.cross_entropy(x, t, z_loss=-1.0, backend=b),
        ValueError,
        ["z_loss must be in", "got -1.0"],
    ),
    (
        "float ignore_index",
        lambda b: ops.cross_entropy(x, t, ignore_index=1.5, backend=b),
        TypeError,
        ["ignore_index must be an int", "got float"],
    ),
]

# Target values are the backend's to check; on CPU tensors every backend raises IndexError (torch's type).
CE_TARGETS = [
    ("target = C", torch.tensor([0, 5, 1]), -100, "got 5"),
    ("negative target", torch.tensor([0, -1, 1]), -100, "got -1"),
    ("int32 target past C", torch.tensor([7, 0, 1], dtype=torch.int32), -100, "got 7"),
    ("-100 with another ignore_index", torch.tensor([0, -100, 1]), 2, "got -100"),
]


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("why,call,error,fragments", CE, ids=[c[0] for c in CE])
def test_cross_entropy(backend, why, call, error, fragments):
    _raises(lambda: call(backend), error, r"^cross_entropy: ", *fragments)


@pytest.mark.parametrize("backend", _available("cross_entropy"))
@pytest.mark.parametrize("why,target,ignore_index,given", CE_TARGETS, ids=[c[0] for c in CE_TARGETS])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_cross_entropy_target_out_of_range(backend, why, target, ignore_index, given, grad):
    logits = torch.randn(3, 5, requires_grad=grad)
    _raises(
        lambda: ops.cross_entropy(logits, target, ignore_index=ignore_index, backend=backend),
        IndexError,
        r"^cross_entropy: target values must be in \[0, 5\)",
        f"ignore_index={ignore_index}",
        given,
    )


# ----------------------------------------------------------------------------------- linear cross entropy
h, w = torch.randn(3, 4), torch.randn(5, 4)
LCE = [
    (
        "integer hidden",
        lambda b: ops.linear_cross_entropy(h.long(), w, t, backend=b),
        TypeError,
        ["hidden must have dtype", "float32", "got int64"],
    ),
    (
        "hidden and weight dtypes differ",
        lambda b: ops.linear_cross_entropy(h, w.half(), t, backend=b),
        TypeError,
        ["weight must have the same dtype as hidden", "float32", "got torch.float16"],
    ),
    (
        "bias dtype differs",
        lambda b: ops.linear_cross_entropy(h, w, t, torch.randn(5).double(), backend=b),
        TypeError,
        ["bias must have the same dtype as hidden", "got torch.float64"],
    ),
    (
        "float targets",
        lambda b: ops.linear_cross_entropy(h, w, t.float(), backend=b),
        TypeError,
        ["target must have dtype", "got float32"],
    ),
    (
        "hidden vs targets",
        lambda b: ops.linear_cross_entropy(h, w, t[:2], backend=b),
        ValueError,
        [r"target must have shape \(3,\)", "hidden", r"got \(2,\)"],
    ),
    (
        "weight vs hidden",
        lambda b: ops.linear_cross_entropy(h, torch.randn(5, 3), t, backend=b),
        ValueError,
        [r"weight must be \(V, 4\)", "hidden's last dim", r"got \(5, 3\)"],
    ),
    (
        "bias shape",
        lambda b: ops.linear_cross_entropy(h, w, t, torch.randn(4), backend=b),
        ValueError,
        [r"bias must have shape \(5,\)", r"got \(4,\)"],
    ),
    (
        "1-d hidden",
        lambda b: ops.linear_cross_entropy(h[0], w, t[0], backend=b),
        ValueError,
        ["hidden must be", r"\(N, H\)", r"got shape \(4,\)"],
    ),
    (
        "no classes",
        lambda b: ops.linear_cross_entropy(h, w[:0], t, backend=b),
        ValueError,
        ["weight must have at least one row", r"\(0, 4\)"],
    ),
    (
        "weight on another device",
        lambda b: ops.linear_cross_entropy(h, w.to(META), t, backend=b),
        ValueError,
        ["weight must be on the same device as hidden", r"\(cpu\)", "got meta"],
    ),
    (
        "bias on another device",
        lambda b: ops.linear_cross_entropy(h, w, t, torch.randn(5, device=META), backend=b),
        ValueError,
        ["bias must be on the same device as hidden", "got meta"],
    ),
    (
        "targets on another device",
        lambda b: ops.linear_cross_entropy(h, w, t.to(META), backend=b),
        ValueError,
        ["target must be on the same device as hidden", r"\(cpu\)", "got meta"],
    ),
    (
        "chunk_size 0",
        lambda b: ops.linear_cross_entropy(h, w, t, chunk_size=0, backend=b),
        ValueError,
        ["chunk_size must be a positive int", "got 0"],
    ),
    (
        "chunk_size a float",
        lambda b: ops.linear_cross_entropy(h, w, t, chunk_size=1.5, backend=b),
        TypeError,
        ["chunk_size must be a positive int", "got float"],
    ),
    (
        "bad reduction",
        lambda b: ops.linear_cross_entropy(h, w, t, reduction="avg", backend=b),
        ValueError,
        ["reduction must be one of", "got 'avg'"],
    ),
]


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("why,call,error,fragments", LCE, ids=[c[0] for c in LCE])
def test_linear_cross_entropy(backend, why, call, error, fragments):
    _raises(lambda: call(backend), error, r"^linear_cross_entropy: ", *fragments)


@pytest.mark.parametrize("backend", _available("linear_cross_entropy"))
@pytest.mark.parametrize("why,target,ignore_index,given", CE_TARGETS, ids=[c[0] for c in CE_TARGETS])
@pytest.mark.parametrize("reduction", ["mean", "none"])  # the two autograd paths
def test_linear_cross_entropy_target_out_of_range(backend, why, target, ignore_index, given, reduction):
    hidden = torch.randn(3, 4, requires_grad=True)
    _raises(
        lambda: ops.linear_cross_entropy(
            hidden, w, target, ignore_index=ignore_index, reduction=reduction, backend=backend
        ),
        IndexError,
        r"^linear_cross_entropy: target values must be in \[0, 5\)",
        given,
    )


# ---------------------------------------------------------------------------------------------- attention
SDPA = ops.scaled_dot_product_attention
q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
ATTENTION = [
    (
        "integer query",
        lambda b: SDPA(q.long(), k.long(), v.long(), enable_gqa=True, backend=b),
        TypeError,
        ["query must have dtype", "float32", "got int64"],
    ),
    (
        "key dtype differs",
        lambda b: SDPA(q, k.half(), v, enable_gqa=True, backend=b),
        TypeError,
        ["key must have the same dtype as query", "float32", "got torch.float16"],
    ),
    (
        "value dtype differs",
        lambda b: SDPA(q, k, v.bfloat16(), enable_gqa=True, backend=b),
        TypeError,
        ["value must have the same dtype as query", "got torch.bfloat16"],
    ),
    (
        "value on another device",
        lambda b: SDPA(q, k, v.to(META), enable_gqa=True, backend=b),
        ValueError,
        ["value must be on the same device as query", r"\(cpu\)", "got meta"],
    ),
    (
        "mask on another device",
        lambda b: SDPA(
            q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool, device=META), enable_gqa=True, backend=b
        ),
        ValueError,
        ["attn_mask must be on the same device as query", "got meta"],
    ),
    (
        "batch differs",
        lambda b: SDPA(q, k[:1], v[:1], enable_gqa=True, backend=b),
        ValueError,
        [r"key and value batch must equal query's \(2\)", "got 1 and 1"],
    ),
    (
        "head dim differs",
        lambda b: SDPA(q, k[..., :4], v, enable_gqa=True, backend=b),
        ValueError,
        [r"key head dim must equal query's \(8\)", "got 4"],
    ),
    (
        "GQA head count does not divide",
        lambda b: SDPA(q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8), enable_gqa=True, backend=b),
        ValueError,
        [r"query heads \(4\)", r"multiple of them", r"key/value heads \(3\)"],
    ),
    (
        "GQA without enable_gqa",
        lambda b: SDPA(q, k, v, backend=b),
        ValueError,
        [r"query heads \(4\) must equal key/value heads \(2\)", "enable_gqa=True", "got enable_gqa=False"],
    ),
    (
        "key and value lengths differ",
        lambda b: SDPA(q, k, v[:, :, :5], enable_gqa=True, backend=b),
        ValueError,
        ["key and value must have the same heads and length", r"\(2, 2, 6, 8\) and \(2, 2, 5, 8\)"],
    ),
    (
        "2-d query",
        lambda b: SDPA(q[0, 0], k[0, 0], v[0, 0], backend=b),
        ValueError,
        ["query must be", r"\(B, H, L, D\)", r"got shape \(5, 8\)"],
    ),
    (
        "dims differ",
        lambda b: SDPA(q, k[0], v[0], backend=b),
        ValueError,
        ["query, key and value must have the same number of dims", "got 4, 3 and 3"],
    ),
    (
        "mask dtype",
        lambda b: SDPA(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.float64), enable_gqa=True, backend=b),
        TypeError,
        ["attn_mask must be a bool tensor or have query's dtype", "float32", "got torch.float64"],
    ),
    (
        "mask shape",
        lambda b: SDPA(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), enable_gqa=True, backend=b),
        ValueError,
        [r"attn_mask must broadcast to \(B, Hq, L, S\) = \(2, 4, 5, 6\)", r"got \(5, 7\)"],
    ),
    (
        "mask with is_causal",
        lambda b: SDPA(
            q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True, enable_gqa=True, backend=b
        ),
        ValueError,
        ["either attn_mask or is_causal=True, not both"],
    ),
    (
        "mask requiring grad",
        lambda b: SDPA(q, k, v, attn_mask=torch.zeros(5, 6, requires_grad=True), enable_gqa=True, backend=b),
        ValueError,
        ["attn_mask", "not supported", "detach"],
    ),
    (
        "dropout_p 1",
        lambda b: SDPA(q, k, v, dropout_p=1.0, enable_gqa=True, backend=b),
        ValueError,
        ["dropout_p must be in", r"\[0.0, 1.0\)", "got 1.0"],
    ),
    (
        "dropout_p a string",
        lambda b: SDPA(q, k, v, dropout_p="0.1", enable_gqa=True, backend=b),
        TypeError,
        ["dropout_p must be a float", "got str"],
    ),
    (
        "scale a string",
        lambda b: SDPA(q, k, v, scale="0.1", enable_gqa=True, backend=b),
        TypeError,
        ["scale must be a float", "got str"],
    ),
]


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("why,call,error,fragments", ATTENTION, ids=[c[0] for c in ATTENTION])
def test_attention(backend, why, call, error, fragments):
    _raises(lambda: call(backend), error, r"^scaled_dot_product_attention: ", *fragments)


# ----------------------------------------------------------------- argument combinations a backend refuses
# (backend, why, call, fragments): BackendUnavailable (a RuntimeError) naming the backend, the reason, the fix
REFUSALS = [
    (
        "cpu",
        "attention dropout",
        lambda: SDPA(q, k, v, dropout_p=0.1, enable_gqa=True, backend="cpu"),
        ["dropout", r"dropout_p > 0", "backend='reference'"],
    ),
    (
        "cpu",
        "attention in float64",
        lambda: SDPA(q.double(), k.double(), v.double(), enable_gqa=True, backend="cpu"),
        ["float32, float16 or bfloat16", "got float64", "backend='reference'"],
    ),
    (
        "triton",
        "head dim past 256",
        lambda: SDPA(*(torch.randn(1, 1, 2, 300) for _ in range(3)), backend="triton"),
        ["head_dim 300", "1..256", "backend='reference'"],
    ),
    ("cuda", "softmax of CPU tensors", lambda: ops.softmax(x, backend="cuda"), ["cuda tensors", "on cpu"]),
    (
        "cuda",
        "cross_entropy of CPU tensors",
        lambda: ops.cross_entropy(x, t, backend="cuda"),
        ["cuda tensors", "on cpu"],
    ),
    (
        "cuda",
        "linear_cross_entropy of CPU tensors",
        lambda: ops.linear_cross_entropy(h, w, t, backend="cuda"),
        ["cuda tensors", "on cpu"],
    ),
    (
        "cuda",
        "attention of CPU tensors",
        lambda: SDPA(q, k, v, enable_gqa=True, backend="cuda"),
        ["cuda tensors", "on cpu"],
    ),
]


@pytest.mark.parametrize("backend,why,call,fragments", REFUSALS, ids=[f"{c[0]}-{c[1]}" for c in REFUSALS])
def test_backend_refuses_with_reason_and_fix(backend, why, call, fragments):
    if backend not in ("cuda",) and backend not in _available("attention"):
        pytest.skip(f"the {backend} backend does not run here")
    if backend == "cuda" and torch.cuda.is_available():
        pytest.skip("CPU tensors on a machine with CUDA: the point is a machine without it")
    _raises(call, backends.BackendUnavailable, f"^gptfast backend '{backend}' cannot run", *fragments)


@pytest.mark.parametrize("op", ["softmax", "cross_entropy"])
def test_unknown_backend_lists_the_known_ones(op):
    call = (
        (lambda: ops.softmax(x, backend="cpp"))
        if op == "softmax"
        else (lambda: ops.cross_entropy(x, t, backend="cpp"))
    )
    _raises(call, ValueError, "unknown gptfast backend 'cpp'", "reference, triton, cuda, cpu")
