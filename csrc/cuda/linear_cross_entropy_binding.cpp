// linear_cross_entropy on the cuda backend: cross_entropy(hidden @ weight.T + bias, target) chunk_size rows
// at a time. cuBLAS (at::mm / at::addmm) does each chunk's matmuls; the cross-entropy kernels of
// cross_entropy.cu read the chunk's logits once for the loss and then overwrite them in place with the
// gradient, so one chunk of logits is the only (chunk_size, V) buffer ever live.
//
// Precision of each step:
// - fp16/bf16 inputs: the three matmuls take their operands in the input dtype, on tensor cores with fp32
//   accumulation (cuBLAS through ATen's out_dtype overloads mm.dtype / addmm.dtype_out, torch >= 2.8); no
//   fp32 copy of the weight or of a hidden chunk is made (except for fp16 under allow_fp16_accumulation,
//   which cuBLAS refuses with an fp32 result: that case takes the fp32 path below; see check_inputs).
//   1. logits = h_chunk @ W^T, written by cuBLAS in fp32 (at::mm(.., at::kFloat)); the bias is converted to
//      fp32 once per call and added to the fp32 logits (add_: mm.dtype then add_ costs the same passes
//      over the logits as addmm.dtype, whose fp32-bias form not every torch >= 2.8 accepts).
//   2. loss, lse and dlogits from those fp32 logits (in place, fp32 math).
//   3. dlogits rounded once to the input dtype (one elementwise pass), then dhidden rows = dlogits @ W
//      written by cuBLAS straight into dhidden (fp32 accumulation, one rounding), and
//      dweight += dlogits^T @ h_chunk accumulated by cuBLAS into an fp32 (V, H) buffer across chunks
//      (addmm.dtype_out with that buffer as self and out; see accumulate() for torch builds that refuse an
//      fp32 self). dbias sums the fp32 dlogits in fp32.
//   This is what torch's unfused fp16/bf16 path does for the matmuls (input-dtype operands, fp32
//   accumulation), while the logits, loss, lse and the dweight/dbias accumulators stay fp32 where torch's
//   are in the input dtype: besides the final casts of the gradients to the input dtype, the one rounding
//   is that of dlogits, which torch's path has too, so the error stays within torch's own (design.md's
//   tolerance rule).
// - fp32 inputs: fp32 matmuls (as the reference), fp32 accumulators. fp64 inputs: all fp64. The chunk
//   logits, the CE kernels and the accumulators are the same for every input dtype (fp32, or fp64).
// - The backward of fp16/bf16 inputs over several chunks takes the gradients by vocab slices instead (as the
//   Triton backend, kernels/linear_cross_entropy.py): per slice s of the vocab, all M rows,
//     logits_s = h @ W_s^T (fp32), dlogits_s in place from the saved lse (the kernel told the slice's column
//     offset and the whole vocab), rounded once to the input dtype; dW_s = dlogits_s^T @ h in one GEMM over
//     every row, written into dweight's rows; db_s = colsum(dlogits_s); dh += dlogits_s @ W_s (fp32).
//   So no (V, H) fp32 accumulator exists (twice the gradient's bytes): the peak is the gradients, the (M, H)
//   fp32 dh accumulator and one slice of about chunk_size * V logits. Taken where that holds less
//   (takes_vocab_slices); the public op sends such inputs down its recompute path.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "binding_utils.h"
#include "cross_entropy_params.h"

namespace gptfast::cuda {
namespace {

constexpr const char* kFwd = "linear_cross_entropy_fwd (cuda)";
constexpr const char* kBwd = "linear_cross_entropy_bwd (cuda)";

struct Inputs {
  at::ScalarType math;     // logits, loss/lse and accumulators: fp32, or fp64 for fp64 inputs
  at::ScalarType operand;  // the matmuls' operand type: hidden's dtype (see check_inputs)
  bool low;                // operand is fp16/bf16 (operand != math)
  at::Tensor hidden;       // (M, H) contiguous, input dtype
  at::Tensor weight;       // (V, H) contiguous, operand type
  at::Tensor bias;         // (V,) math type, undefined without bias
  at::Tensor target;       // (M,) contiguous
};

Inputs check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                    const std::optional<at::Tensor>& bias, int64_t chunk_size, const char* op) {
  check_cuda(hidden, op, "hidden");
  check_dim(hidden, 2, op, "hidden");
  check_dim(weight, 2, op, "weight");
  check_same_device(hidden, weight, op, "weight");
  check_same_device(hidden, target, op, "target");
  dtype_of(hidden, op, "hidden", /*allow_double=*/true);
  TORCH_CHECK(weight.size(1) == hidden.size(1), op, ": weight must be (V, ", hidden.size(1), "), got ",
              weight.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0), op, ": target must have shape (",
              hidden.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must be int64 or int32, got ", target.scalar_type());
  TORCH_CHECK(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  const at::ScalarType math = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Operands in hidden's dtype. Exception: fp16 under torch.backends.cuda.matmul.allow_fp16_accumulation,
  // where cuBLAS refuses fp16 operands with an fp32 result; those take the fp32 path (fp32 copies of the
  // weight and of each hidden chunk, fp32 GEMMs), as every fp16/bf16 input did before.
  at::ScalarType operand = hidden.scalar_type();
  if (operand == at::kHalf && at::globalContext().allowFP16AccumulationCuBLAS()) operand = math;
  // The weight's conversion is a no-op for the public op (which requires weight.dtype == hidden.dtype),
  // except on that fp16 fallback.
  Inputs in{math, operand, operand != math, hidden.contiguous(), weight.to(operand).contiguous(), at::Tensor(),
            target.contiguous()};
  if (bias.has_value() && bias->defined()) {
    check_same_device(hidden, *bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    in.bias = bias->to(math).contiguous();
  }
  return in;
}

// Logits (math type) of a chunk of hidden rows: h_chunk @ weight^T + bias.
at::Tensor chunk_logits(const Inputs& in, const at::Tensor& h_chunk) {
  if (!in.low) {
    return in.bias.defined() ? at::addmm(in.bias, h_chunk, in.weight.t()) : at::mm(h_chunk, in.weight.t());
  }
  at::Tensor logits = at::mm(h_chunk, in.weight.t(), at::kFloat);  // fp16/bf16 operands, fp32 result
  if (in.bias.defined()) logits.add_(in.bias);
  return logits;
}

CrossEntropyParams chunk_params(const Inputs& in, const at::Tensor& logits, int64_t start, int64_t ignore_index,
                                double label_smoothing, double z_loss) {
  CrossEntropyParams p;
  p.dtype = in.math == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  p.logits = logits.data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.dlogits = logits.data_ptr();  // in place: each element is read, then overwritten by its gradient
  p.dlogits_row_stride = logits.stride(0);
  p.target = advance(in.target, start);
  p.target_int32 = in.target.scalar_type() == at::kInt;
  p.rows = logits.size(0);
  p.cols = logits.size(1);
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  return p;
}

// Whether this torch's addmm.dtype_out takes an fp32 `self` with fp16/bf16 mat1/mat2, which is what
// accumulating into the fp32 dweight in place needs. The overload's CUDA kernel as added in torch 2.8
// refuses it ("self and mat2 must have the same dtype"); pytorch#167931 (Nov 2025) lets self be in
// out_dtype, and torch 2.11 takes it (kernels/linear_cross_entropy.py, the Triton backend, relies on it
// there). Probed rather than gated on a version, once per process, with empty tensors: the dtype checks
// run, no kernel is launched and nothing is synchronised (safe under CUDA graph capture).
bool addmm_takes_fp32_self(const at::Tensor& acc, const at::Tensor& mat) {
  static const bool ok = [&] {
    at::Tensor out = at::empty({0, 0}, acc.options());
    const at::Tensor m = at::empty({0, 0}, mat.options());
    try {
      at::addmm_out(out, out, m, m, at::kFloat);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return ok;
}

// With dlogits (math type) of a chunk in hand: dhidden rows = dlogits @ W, dweight += dlogits^T h,
// dbias += colsum(dlogits). dweight and dbias are math-type accumulators.
void accumulate(const Inputs& in, const at::Tensor& dlogits, const at::Tensor& h_chunk, int64_t start,
                at::Tensor& dhidden, at::Tensor& dweight, at::Tensor& dbias) {
  if (in.bias.defined()) dbias.add_(dlogits.sum(0));
  at::Tensor rows = dhidden.narrow(0, start, dlogits.size(0));
  if (!in.low) {
    rows.copy_(at::mm(dlogits, in.weight));
    dweight.addmm_(dlogits.t(), h_chunk);
    return;
  }
  const at::Tensor dl = dlogits.to(in.operand);  // the one rounding of dlogits
  at::mm_out(rows, dl, in.weight);  // cuBLAS accumulates in fp32 and rounds once into dhidden's rows
  if (addmm_takes_fp32_self(dweight, dl)) {
    at::addmm_out(dweight, dweight, dl.t(), h_chunk, at::kFloat);  // cuBLAS beta = 1 into the fp32 buffer
  } else {
    // Older torch: no in-place fp32 accumulate for fp16/bf16 operands, so this allocates a fresh (V, H)
    // fp32 product per chunk and adds it (same precision, more memory traffic and a transient V x H x 4 B).
    dweight.add_(at::mm(dl.t(), h_chunk, at::kFloat));
  }
}

// Columns per vocab slice: (M, slice) logits about the size of the (chunk_size, V) ones of the token pass,
// at least 256 columns so that the slice's GEMMs stay wide. The same as slice_columns in
// gptfast/ops/linear_cross_entropy.py.
int64_t slice_columns(int64_t rows, int64_t vocab, int64_t chunk_size) {
  const int64_t even = chunk_size * vocab / std::max<int64_t>(rows, 1);
  return std::max<int64_t>(1, std::min(vocab, std::max<int64_t>(256, even)));
}

// Whether the backward goes by vocab slices: fp16/bf16 operands over several chunks, where the slices hold
// less than the token chunks' (V, H) fp32 accumulator. The same rule as takes_vocab_slices in
// gptfast/ops/linear_cross_entropy.py. (fp16 under allow_fp16_accumulation has fp32 operands here, so it
// sums over token chunks.)
bool takes_vocab_slices(const Inputs& in, int64_t chunk_size) {
  const int64_t M = in.hidden.size(0), H = in.hidden.size(1), V = in.weight.size(0);
  if (!in.low || M <= chunk_size) return false;
  return M * (2 * H + slice_columns(M, V, chunk_size)) < V * (2 * H + chunk_size);
}

// The backward by vocab slices (see the header): fp16/bf16 operands (in.low), several chunks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_by_vocab_slices(
    const Inputs& in, const at::Tensor& dloss, const at::Tensor& lse, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double z_loss,
    int64_t chunk_size, cudaStream_t stream) {
  const int64_t M = in.hidden.size(0), V = in.weight.size(0);
  const auto acc = in.hidden.options().dtype(in.math);
  at::Tensor dhidden = at::zeros(in.hidden.sizes(), acc), dweight = at::empty_like(in.weight);
  at::Tensor dbias = in.bias.defined() ? at::empty(in.bias.sizes(), acc) : at::empty({0}, acc);
  const int64_t step = slice_columns(M, V, chunk_size);
  for (int64_t v0 = 0; v0 < V; v0 += step) {
    const int64_t n = std::min(step, V - v0);
    const at::Tensor w_s = in.weight.narrow(0, v0, n);
    // 4. This slice's logits (fp32, all rows), 5. overwritten with dlogits, 6. the matmuls.
    at::Tensor logits = at::mm(in.hidden, w_s.t(), at::kFloat);
    if (in.bias.defined()) logits.add_(in.bias.narrow(0, v0, n));
    CrossEntropyParams p = chunk_params(in, logits, 0, ignore_index, label_smoothing, z_loss);
    p.col_offset = v0;
    p.vocab = V;
    p.lse_in = lse.data_ptr();
    p.dloss = dloss.data_ptr();
    check_launch(cross_entropy_bwd_launch(p, stream), kBwd);
    if (in.bias.defined()) dbias.narrow(0, v0, n).copy_(logits.sum(0));
    const at::Tensor dl = logits.to(in.operand);  // the one rounding of dlogits
    at::Tensor rows = dweight.narrow(0, v0, n);
    at::mm_out(rows, dl.t(), in.hidden);  // one GEMM over all M rows, fp32 inside, one rounding
    if (addmm_takes_fp32_self(dhidden, dl)) {
      at::addmm_out(dhidden, dhidden, dl, w_s, at::kFloat);
    } else {
      dhidden.add_(at::mm(dl, w_s, at::kFloat));
    }
  }
  const at::Tensor dbias_out = in.bias.defined() ? dbias.to(bias->scalar_type()) : dbias;
  return {dhidden.to(in.hidden.scalar_type()), dweight.to(weight.scalar_type()), dbias_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double z_loss,
    int64_t chunk_size, bool with_grad) {
  const Inputs in = check_inputs(hidden, weight, target, bias, chunk_size, kFwd);
  c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t M = in.hidden.size(0);
  const auto acc = in.hidden.options().dtype(in.math);
  at::Tensor loss = at::empty({M}, acc), lse = at::empty({M}, acc);
  at::Tensor dhidden, dweight, dbias = at::empty({0}, acc);
  if (with_grad) {
    dhidden = at::empty_like(in.hidden);
    dweight = at::zeros(in.weight.sizes(), acc);
    if (in.bias.defined()) dbias = at::zeros(in.bias.sizes(), acc);
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  for (int64_t start = 0; start < M; start += chunk_size) {
    const int64_t n = std::min(chunk_size, M - start);
    // 1. This chunk's logits (math type).
    const at::Tensor h_chunk = in.hidden.narrow(0, start, n).to(in.operand);  // a view, except on the fp16 fallback
    at::Tensor logits = chunk_logits(in, h_chunk);
    // 2. loss and lse rows from one read of the logits.
    CrossEntropyParams p = chunk_params(in, logits, start, ignore_index, label_smoothing, z_loss);
    p.loss = const_cast<void*>(advance(loss, start));
    p.lse = const_cast<void*>(advance(lse, start));
    check_launch(cross_entropy_fwd_launch(p, stream), kFwd);
    if (!with_grad) continue;
    // 3. The gradient of loss.sum(): dlogits over the logits in place (dloss = 1), then the matmuls.
    p.lse_in = advance(lse, start);
    p.dloss = nullptr;
    check_launch(cross_entropy_bwd_launch(p, stream), kFwd);
    accumulate(in, logits, h_chunk, start, dhidden, dweight, dbias);
  }
  if (!with_grad) return {loss, lse, at::empty({0}, acc), at::empty({0}, acc), at::empty({0}, acc)};
  const at::Tensor dbias_out = in.bias.defined() ? dbias.to(bias->scalar_type()) : dbias;
  return {loss, lse, dhidden, dweight.to(weight.scalar_type()), dbias_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd(
    const at::Tensor& dloss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
    double z_loss, int64_t chunk_size) {
  const Inputs in = check_inputs(hidden, weight, target, bias, chunk_size, kBwd);
  check_same_device(hidden, dloss, kBwd, "dloss");
  check_same_device(hidden, lse, kBwd, "lse");
  const int64_t M = in.hidden.size(0);
  TORCH_CHECK(dloss.numel() == M && lse.numel() == M, kBwd, ": dloss and lse must have ", M,
              " elements, got ", dloss.numel(), " and ", lse.numel());
  c10::cuda::CUDAGuard guard(hidden.device());
  const auto acc = in.hidden.options().dtype(in.math);
  const at::Tensor dl = dloss.to(in.math).contiguous(), l = lse.to(in.math).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  if (takes_vocab_slices(in, chunk_size)) {
    return backward_by_vocab_slices(in, dl, l, weight, bias, ignore_index, label_smoothing, z_loss, chunk_size,
                                    stream);
  }
  at::Tensor dhidden = at::empty_like(in.hidden), dweight = at::zeros(in.weight.sizes(), acc);
  at::Tensor dbias = in.bias.defined() ? at::zeros(in.bias.sizes(), acc) : at::empty({0}, acc);
  for (int64_t start = 0; start < M; start += chunk_size) {
    const int64_t n = std::min(chunk_size, M - start);
    // 1. Recompute this chunk's logits, 2. overwrite them with dlogits, 3. the matmuls.
    const at::Tensor h_chunk = in.hidden.narrow(0, start, n).to(in.operand);
    at::Tensor logits = chunk_logits(in, h_chunk);
    CrossEntropyParams p = chunk_params(in, logits, start, ignore_index, label_smoothing, z_loss);
    p.lse_in = advance(l, start);
    p.dloss = advance(dl, start);
    check_launch(cross_entropy_bwd_launch(p, stream), kBwd);
    accumulate(in, logits, h_chunk, start, dhidden, dweight, dbias);
  }
  const at::Tensor dbias_out = in.bias.defined() ? dbias.to(bias->scalar_type()) : dbias;
  return {dhidden, dweight.to(weight.scalar_type()), dbias_out};
}

}  // namespace
}  // namespace gptfast::cuda

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &gptfast::cuda::linear_cross_entropy_fwd);
  m.impl("linear_cross_entropy_bwd", &gptfast::cuda::linear_cross_entropy_bwd);
}
