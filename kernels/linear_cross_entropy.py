"""Triton linear cross-entropy: cross_entropy(hidden @ weight.T + bias, target) without the full logits.

The logits exist a block at a time, in one reused buffer of hidden's dtype: chunk_size rows of all V
columns, or all M rows of a slice of the vocab of about as many elements (at least 256 columns). Peak
extra memory is that buffer, O(chunk_size * V), and one fp32 accumulator for half inputs of several chunks
(dweight's, or with slices dhidden's), besides the gradients themselves.

Token pass, per chunk c of rows (the forward, and the backward unless it takes vocab slices):
  1. logits_c = h_c @ W^T (+ b)                     torch matmul (addmm with a bias), into the buffer
  2. the fused cross-entropy kernel reads logits_c once for loss and lse and, when gradients are wanted,
     overwrites the buffer with
       dlogits_c = dloss * (softmax(logits_c) (1 + 2 z lse) - (1 - eps) onehot - eps / V)
  3. dh_c = dlogits_c @ W                           written straight into dhidden's rows
     dW  += dlogits_c^T @ h_c,  db += colsum(dlogits_c)

Step 3's dW sum runs over chunks. For fp32/fp64 inputs, and for a single chunk, it sums into the gradient
itself. fp16/bf16 inputs over several chunks must sum in fp32 (design.md): a (V, H) fp32 accumulator costs
twice the gradient (2 GiB at V=128256, H=4096, which with its cast put this op at 53% of unfused torch's
peak on an H200), and summing in bf16 instead rounds once per chunk (3.9x torch's dW error at 8 chunks:
benchmarks/lce_accumulator_precision.py). So where it holds less (fewer tokens than about V:
gptfast.ops.linear_cross_entropy.takes_vocab_slices) their backward takes the gradients by vocab slices,
from the lse the forward saved:

Vocab pass, per slice s of the vocab (all M rows):
  4. logits_s = h @ W_s^T (+ b_s)                   into the same buffer, viewed as (M, |s|)
  5. the backward kernel overwrites it with dlogits_s from the saved lse (its columns offset into V)
  6. dW_s = dlogits_s^T @ h                         one GEMM over all M rows, fp32 inside, rounded once into
                                                    dweight's rows: nothing to accumulate
     db_s = colsum(dlogits_s)                       fp32
     dh  += dlogits_s @ W_s                         into an (M, H) fp32 accumulator
The forward's token pass plus this is four logits-sized matmuls, one more than unfused torch, for a peak of
the gradients, dhidden's accumulator and one buffer. (The public op sends every fp16/bf16 input down its
recompute path, so this backward is what their gradients take; with_grad serves fp32/fp64 inputs.)

With with_grad the forward computes the gradients of loss.sum() (dloss = 1); the public op scales them. The
backward takes an incoming per-row dloss and recomputes the logits. dweight/dbias come in the input dtype.
"""

import torch

from gptfast.ops import _checks
from gptfast.ops.linear_cross_entropy import slice_columns, takes_vocab_slices

from .cross_entropy import cross_entropy_backward, cross_entropy_forward


# Registered as an opaque custom op, not a triton_op: the chunk loop is torch GEMMs around the fused CE
# kernel, so inductor gains nothing from seeing inside, and on torch 2.11 tracing decomposes
# addmm(out_dtype=...) wrongly (the dtype lands in beta: "unsupported operand type(s) for *: 'torch.dtype' and
# 'FakeTensor'", seen on an H200). gptfast.ops._library runs such a pair's launches as plain kernel calls.
TRACEABLE = False


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------- chunk helpers
def _logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Steps 1 and 4: out = h @ weight^T (+ bias), in hidden's dtype, with no temporary."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an accumulator wider than the half operands (fp32 over fp16/bf16), exactly."""
    if a.is_cuda and _MIXED["addmm"]:
        # cuBLAS multiplies the half operands and adds into the fp32 accumulator (beta = 1), with no fp32 copy
        # of either. torch 2.8-2.10 require self to have the operands' dtype; they fall back once, below.
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except torch.OutOfMemoryError:
            raise  # a full device, not a missing overload: the fallbacks below would need more memory
        except (RuntimeError, TypeError):
            _MIXED["addmm"] = False
    if a.is_cuda and _MIXED["mm"]:
        try:  # the product in fp32 from the half operands, as an acc-sized temporary (torch >= 2.8)
            acc += torch.mm(a, b, out_dtype=acc.dtype)
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):
            _MIXED["mm"] = False
    # CPU torch has neither overload: fp32 copies of the operands. (Rounding each product to the half dtype
    # before adding would spare them but cost 1.5-1.65x torch's dhidden error in bf16:
    # benchmarks/lce_accumulator_precision.py.)
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


_MIXED = {"addmm": True, "mm": True}  # which fp32-from-half matmul overloads run here (CUDA)


def _chunks(rows: int, chunk_size: int):
    for start in range(0, rows, chunk_size):
        yield start, min(start + chunk_size, rows)


def _buffer(hidden: torch.Tensor, vocab: int, chunk_size: int, slices: bool) -> torch.Tensor:
    """The flat buffer for (chunk, V) token-pass logits, or with slices for (M, slice) ones."""
    M = hidden.shape[0]
    return hidden.new_empty(M * slice_columns(M, vocab, chunk_size) if slices else min(chunk_size, M) * vocab)


def _as_matrix(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return buffer[: rows * cols].view(rows, cols)


def _vocab_pass(
    dloss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    options: tuple[int, float, float],
    chunk_size: int,
    buffer: torch.Tensor,
    dweight: torch.Tensor,
    dbias: torch.Tensor | None,
    dhidden_acc: torch.Tensor,
) -> None:
    """Steps 4-6 over every vocab slice: dweight[s] (weight's dtype) and dbias[s] (fp32) are written, not
    summed; dhidden_acc (fp32) gets every slice's dlogits_s @ W_s added."""
    M, V = hidden.shape[0], weight.shape[0]
    step = slice_columns(M, V, chunk_size)
    for v0, v1 in _chunks(V, step):
        w_s = weight[v0:v1]
        b_s = bias[v0:v1] if bias is not None else None
        logits = _logits(hidden, w_s, b_s, _as_matrix(buffer, M, v1 - v0))
        cross_entropy_backward(dloss, logits, target, lse, *options, out=logits, col_start=v0, vocab=V)
        torch.mm(logits.t(), hidden, out=dweight[v0:v1])
        if dbias is not None:
            torch.sum(logits, dim=0, dtype=dbias.dtype, out=dbias[v0:v1])
        _add_product(dhidden_acc, logits, w_s)


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
    else:
        _add_product(dweight, dlogits.t(), h_c)
    if dbias is not None:
        dbias += dlogits.sum(dim=0, dtype=dbias.dtype)


def _slices(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> bool:
    return takes_vocab_slices(hidden.shape[0], hidden.shape[1], weight.shape[0], chunk_size, hidden.dtype)


def _weight_grads(hidden, weight, bias, chunk_size, by_slices):
    """dweight and dbias buffers: written slice by slice (dweight in its final dtype), or zeros to sum over
    token chunks, in fp32 when half-precision rows come in several chunks."""
    acc = _acc(hidden.dtype)
    dbias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
    if by_slices:
        return torch.empty_like(weight), dbias
    several_half = hidden.dtype in (torch.float16, torch.bfloat16) and hidden.shape[0] > chunk_size
    dtype = acc if several_half else weight.dtype
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device), dbias


def _finish(hidden, weight, bias, dhidden, dweight, dbias):
    acc = _acc(hidden.dtype)
    db = dbias.to(bias.dtype) if bias is not None else hidden.new_empty(0, dtype=acc)
    return dhidden.to(hidden.dtype), dweight.to(weight.dtype), db


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
        dhidden = torch.empty_like(hidden)
        dweight, dbias = _weight_grads(hidden, weight, bias, chunk_size, by_slices=False)
    buffer = _buffer(hidden, V, chunk_size, slices=False)
    target = target.contiguous()
    options = (ignore_index, label_smoothing, z_loss)
    for start, stop in _chunks(M, chunk_size):
        logits = _logits(hidden[start:stop], weight, bias, _as_matrix(buffer, stop - start, V))
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
    """(dhidden[M, H], dweight[V, H], dbias[V] or empty) for the upstream dloss[M], recomputing the logits
    from the saved lse[M]: by vocab slices where takes_vocab_slices says so, by token chunks otherwise."""
    M, V = hidden.shape[0], weight.shape[0]
    slices = _slices(hidden, weight, chunk_size)
    dweight, dbias = _weight_grads(hidden, weight, bias, chunk_size, slices)
    buffer = _buffer(hidden, V, chunk_size, slices)
    dloss, target, options = dloss.contiguous(), target.contiguous(), (ignore_index, label_smoothing, z_loss)
    if slices:
        dhidden = torch.zeros(hidden.shape, dtype=_acc(hidden.dtype), device=hidden.device)
        grads = (dweight, dbias, dhidden)
        _vocab_pass(dloss, hidden, weight, target, bias, lse, options, chunk_size, buffer, *grads)
        del buffer  # before dhidden's cast, which would otherwise peak beside it
        return _finish(hidden, weight, bias, dhidden, dweight, dbias)
    dhidden = torch.empty_like(hidden)
    for start, stop in _chunks(M, chunk_size):
        logits = _logits(hidden[start:stop], weight, bias, _as_matrix(buffer, stop - start, V))
        cross_entropy_backward(
            dloss[start:stop], logits, target[start:stop], lse[start:stop], *options, out=logits
        )
        _accumulate(logits, hidden[start:stop], weight, dhidden[start:stop], dweight, dbias)
    return _finish(hidden, weight, bias, dhidden, dweight, dbias)


# Every kernel this op launches is cross_entropy's; its sm_90a grid lives there.
COMPILE_CASES: list[dict] = []
