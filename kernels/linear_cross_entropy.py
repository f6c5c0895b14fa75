"""Triton linear cross-entropy: cross_entropy(hidden @ weight.T + bias, target) one chunk of tokens at a time.

The logits exist chunk_size rows at a time, in one reused (chunk_size, V) buffer of hidden's dtype, so peak
extra memory is O(chunk_size * V) plus the fp32 gradient accumulators. Per chunk c of rows:
  1. logits_c = h_c @ W^T (+ b)                     torch matmul (addmm when there is a bias), into the buffer
  2. the fused cross-entropy kernel reads logits_c once for loss/lse and, when gradients are wanted,
     overwrites the buffer with
       dlogits_c = dloss * (softmax(logits_c) (1 + 2 z lse) - (1 - eps) onehot - eps / V)
  3. dh_c = dlogits_c @ W                           written straight into dhidden's rows
     dW  += dlogits_c^T @ h_c                       fp32 accumulator for half inputs (addmm, out_dtype)
     db  += colsum(dlogits_c)                       fp32
With with_grad the forward does steps 1-3 with dloss = 1 (gradients of loss.sum(); the public op scales them);
the backward recomputes step 1 for the incoming per-row dloss. dweight/dbias are returned in the input dtype.

Cost of the fp32 dW accumulator (half inputs): 4 bytes per weight element, plus the final cast to the
weight's dtype, and each chunk's dW update reads and writes it. On an H200 (torch 2.11) one update for a
256-row chunk at V=128256, H=4096 took 1.6 ms in fp32 against 0.83 ms for a bf16 accumulator and 0.39 ms for
the chunk's logits matmul: the update is bound by the accumulator's traffic, so chunks of >= 1024 rows keep it
near the GEMM time.
"""

import torch

from gptfast.ops import _checks

from .cross_entropy import cross_entropy_backward, cross_entropy_forward


# Registered as an opaque custom op, not a triton_op: the chunk loop is torch GEMMs around the fused CE kernel,
# so inductor gains nothing from seeing inside, and on torch 2.11 tracing decomposes addmm(out_dtype=...) wrongly
# (the dtype lands in beta: "unsupported operand type(s) for *: 'torch.dtype' and 'FakeTensor'", seen on an H200).
TRACEABLE = False


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------- chunk helpers
def _logits(
    h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Step 1: out[c, V] = h_c @ W^T (+ b), in hidden's dtype, with no temporary."""
    if bias is None:
        return torch.mm(h_c, weight.t(), out=out)
    return torch.addmm(bias, h_c, weight.t(), out=out)


def _accumulate(
    dlogits: torch.Tensor,
    h_c: torch.Tensor,
    weight: torch.Tensor,
    dh_c: torch.Tensor,
    dweight: torch.Tensor,
    dbias: torch.Tensor | None,
) -> None:
    """Step 3: dh_c = dlogits @ W; dweight += dlogits^T h_c; dbias += colsum(dlogits)."""
    torch.mm(dlogits, weight, out=dh_c)
    if dweight.dtype == dlogits.dtype:
        dweight.addmm_(dlogits.t(), h_c)
    elif dlogits.is_cuda and _MIXED_ADDMM["ok"]:
        # half inputs: cuBLAS multiplies the half operands and adds into the fp32 accumulator (no fp32 copy of
        # dlogits). Some torch releases require self to have the operands' dtype; they fall back once, below.
        try:
            torch.addmm(dweight, dlogits.t(), h_c, out_dtype=dweight.dtype, out=dweight)
        except RuntimeError:
            _MIXED_ADDMM["ok"] = False
            _accumulate_upcast(dlogits, h_c, dweight)
    else:
        _accumulate_upcast(dlogits, h_c, dweight)
    if dbias is not None:
        dbias += dlogits.sum(dim=0, dtype=dbias.dtype)


_MIXED_ADDMM = {"ok": True}  # whether addmm(fp32 self, half mat1, half mat2, out_dtype=fp32) runs here


def _accumulate_upcast(dlogits: torch.Tensor, h_c: torch.Tensor, dweight: torch.Tensor) -> None:
    """dweight (fp32) += dlogits^T h_c through fp32 copies of the chunk's operands: the CPU path (no
    mixed-dtype addmm there) and the fallback on CUDA; costs a (chunk, V) fp32 temporary and an fp32 GEMM."""
    dweight.addmm_(dlogits.t().to(dweight.dtype), h_c.to(dweight.dtype))


def _grad_buffers(hidden, weight, bias):
    acc = _acc(hidden.dtype)
    dbias = torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if bias is not None else None
    return torch.empty_like(hidden), torch.zeros(weight.shape, dtype=acc, device=hidden.device), dbias


def _finish(hidden, weight, bias, dhidden, dweight, dbias):
    acc = _acc(hidden.dtype)
    db = dbias.to(bias.dtype) if bias is not None else hidden.new_empty(0, dtype=acc)
    return dhidden, dweight.to(weight.dtype), db


def _chunks(rows: int, chunk_size: int):
    for start in range(0, rows, chunk_size):
        yield start, min(start + chunk_size, rows)


# ---------------------------------------------------------------------------------------------- the pair
def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden[M, H], weight[V, H], target[M], bias[V]?
    -> (loss[M], lse[M], dhidden[M, H], dweight[V, H], dbias[V]).

    loss/lse are fp32 (fp64 for fp64). With with_grad the gradients are those of loss.sum(), computed as each
    chunk's logits are in hand; without it they are empty tensors.
    """
    M, V = hidden.shape[0], weight.shape[0]
    _checks.target_values("linear_cross_entropy", target, V, ignore_index)
    acc = _acc(hidden.dtype)
    loss = hidden.new_empty(M, dtype=acc)
    lse = hidden.new_empty(M, dtype=acc)
    if with_grad:
        dhidden, dweight, dbias = _grad_buffers(hidden, weight, bias)
    buffer = hidden.new_empty(min(chunk_size, M), V)
    target = target.contiguous()
    options = (ignore_index, label_smoothing, z_loss)
    for start, stop in _chunks(M, chunk_size):
        logits = _logits(hidden[start:stop], weight, bias, buffer[: stop - start])
        cross_entropy_forward(
            logits,
            target[start:stop],
            *options,
            grad_in_place=with_grad,
            loss=loss[start:stop],
            lse=lse[start:stop],
        )
        if with_grad:
            _accumulate(logits, hidden[start:stop], weight, dhidden[start:stop], dweight, dbias)
    if not with_grad:
        empty = loss.new_empty(0)
        return loss, lse, empty, empty.clone(), empty.clone()
    return (loss, lse, *_finish(hidden, weight, bias, dhidden, dweight, dbias))


def linear_cross_entropy_bwd(
    dloss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden[M, H], dweight[V, H], dbias[V] or empty) for the upstream dloss[M], recomputing each chunk's
    logits and turning them into dlogits in place from the saved lse[M]."""
    M, V = hidden.shape[0], weight.shape[0]
    dhidden, dweight, dbias = _grad_buffers(hidden, weight, bias)
    buffer = hidden.new_empty(min(chunk_size, M), V)
    dloss, target = dloss.contiguous(), target.contiguous()
    for start, stop in _chunks(M, chunk_size):
        logits = _logits(hidden[start:stop], weight, bias, buffer[: stop - start])
        cross_entropy_backward(
            dloss[start:stop],
            logits,
            target[start:stop],
            lse[start:stop],
            ignore_index,
            label_smoothing,
            z_loss,
            out=logits,
        )
        _accumulate(logits, hidden[start:stop], weight, dhidden[start:stop], dweight, dbias)
    return _finish(hidden, weight, bias, dhidden, dweight, dbias)


# Every kernel this op launches is cross_entropy's; its sm_90a grid lives there.
COMPILE_CASES: list[dict] = []
