"""Indexing past 2^31 elements (issue 7, design.md: 64-bit offsets where products can overflow).

Logits of rows x vocab just over 2^31 elements (16385 x 131072 bf16, 4 GiB): the rows that start before and
at and past element 2^31 are checked against torch run on that row alone, for cross-entropy's loss and
gradient and for softmax. On the CPU this is @pytest.mark.slow (about a minute and 9 GiB on a 2-core machine;
CI's full mode, `make test-slow`, runs it); the GPU suite runs it for triton and cuda, plus attention with
B * H * L * D past 2^31.
"""

import pytest
import torch
import torch.nn.functional as F

from gptfast import backends, ops
from gptfast.testing import assert_close

ROWS, VOCAB = 16385, 131072  # 2^31 + 2^17 elements; row 16384 starts at element 2^31 exactly
CHECKED = [0, 8191, ROWS - 2, ROWS - 1]  # the last two rows start at and past 2^31


def _require(backend, device):
    reason = backends.why_not(backend, "cross_entropy", torch.device(device))
    if reason:
        pytest.skip(f"{backend} cannot run here: {reason}")


def _logits(device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(ROWS, VOCAB, dtype=torch.bfloat16, device=device)
    x.normal_(0.0, 2.0, generator=g)
    t = torch.randint(0, VOCAB, (ROWS,), device=device, generator=g)
    return x, t


def _row_loss_and_grad(row, target, dtype):
    r = row.to(dtype)[None].requires_grad_()
    loss = F.cross_entropy(r, target[None], reduction="sum", label_smoothing=0.1)
    loss.backward()
    return loss.detach(), r.grad[0]


def _check_cross_entropy_and_softmax(backend, device):
    x, t = _logits(device)
    x.requires_grad_()
    loss = ops.cross_entropy(x, t, reduction="none", label_smoothing=0.1, backend=backend)
    (dx,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    x = x.detach()
    for r in CHECKED:
        ref, ref_grad = _row_loss_and_grad(x[r], t[r], torch.float32)
        same, same_grad = _row_loss_and_grad(x[r], t[r], torch.bfloat16)
        assert_close(loss[r].float(), ref, same.float(), f"loss of row {r}")
        assert_close(dx[r], ref_grad, same_grad, f"gradient of row {r}")
    del dx, loss
    y = ops.softmax(x, backend=backend)
    for r in CHECKED:
        assert_close(y[r], torch.softmax(x[r].float(), -1), torch.softmax(x[r], -1), f"softmax of row {r}")


@pytest.mark.slow
def test_cpu_cross_entropy_and_softmax_past_2_31_elements():
    _require("cpu", "cpu")
    _check_cross_entropy_and_softmax("cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_cross_entropy_and_softmax_past_2_31_elements(backend):
    _require(backend, "cuda")
    _check_cross_entropy_and_softmax(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_attention_past_2_31_elements(backend):
    # 33 x 2048 heads of 256 x 128: q, k, v each hold 2^31 + 2^26 elements; the last batch starts past 2^31.
    B, H, L, D = 33, 2048, 256, 128
    if backends.why_not(
        backend, "attention", torch.device("cuda"), head_dim=D, value_dim=D, dtype=torch.bfloat16
    ):
        pytest.skip(f"{backend} cannot run this attention")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = ops.scaled_dot_product_attention(*leaves, is_causal=True, backend=backend)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    for b, h in ((0, 0), (B - 1, H - 1)):
        head = [t.detach()[b : b + 1, h : h + 1] for t in (q, k, v)]
        ref_leaves = [t.float().requires_grad_() for t in head]
        ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=True)
        ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
        same_leaves = [t.clone().requires_grad_() for t in head]
        same = F.scaled_dot_product_attention(*same_leaves, is_causal=True)
        same_grads = torch.autograd.grad(same, same_leaves, torch.ones_like(same))
        assert_close(out[b : b + 1, h : h + 1], ref, same, f"out of head ({b}, {h})")
        for name, got, r, s in zip("qkv", grads, ref_grads, same_grads):
            assert_close(got[b : b + 1, h : h + 1], r, s, f"d{name} of head ({b}, {h})")
