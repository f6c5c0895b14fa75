// linear_cross_entropy on the cuda backend: cross_entropy(hidden @ weight.T + bias, target) chunk_size rows
// at a time. cuBLAS (at::mm / at::addmm) does each chunk's matmuls; the cross-entropy kernels of
// cross_entropy.cu read the chunk's logits once for the loss and then overwrite them in place with the
// gradient, so one chunk of logits is the only (chunk_size, V) buffer ever live.
//
// The chunk math runs in fp32 (fp64 for fp64 inputs), as the reference's does: hidden chunks and the weight
// are read in that type (the weight converted once per call for fp16/bf16; a no-op for fp32), and dweight /
// dbias accumulate in it across chunks before the one final cast. This favours matching the reference over
// matmul speed.
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
  at::ScalarType math;  // fp32, or fp64 for fp64 inputs
  at::Tensor hidden;    // (M, H) contiguous, input dtype
  at::Tensor weight;    // (V, H) contiguous, math type
  at::Tensor bias;      // (V,) math type, undefined without bias
  at::Tensor target;    // (M,) contiguous
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
  Inputs in{math, hidden.contiguous(), weight.to(math).contiguous(), at::Tensor(), target.contiguous()};
  if (bias.has_value() && bias->defined()) {
    check_same_device(hidden, *bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    in.bias = bias->to(math).contiguous();
  }
  return in;
}

// Logits (math type) of rows [start, start + n): hidden[start:start+n] @ weight^T + bias.
at::Tensor chunk_logits(const Inputs& in, const at::Tensor& h_chunk) {
  return in.bias.defined() ? at::addmm(in.bias, h_chunk, in.weight.t()) : at::mm(h_chunk, in.weight.t());
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

// With dlogits of a chunk in hand: dhidden rows = dlogits @ W, dweight += dlogits^T h, dbias += colsum.
void accumulate(const Inputs& in, const at::Tensor& dlogits, const at::Tensor& h_chunk, int64_t start,
                at::Tensor& dhidden, at::Tensor& dweight, at::Tensor& dbias) {
  dhidden.narrow(0, start, dlogits.size(0)).copy_(at::mm(dlogits, in.weight));
  dweight.addmm_(dlogits.t(), h_chunk);
  if (in.bias.defined()) dbias.add_(dlogits.sum(0));
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
    // 1. This chunk's fp32 logits.
    const at::Tensor h_chunk = in.hidden.narrow(0, start, n).to(in.math);
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
  at::Tensor dhidden = at::empty_like(in.hidden), dweight = at::zeros(in.weight.sizes(), acc);
  at::Tensor dbias = in.bias.defined() ? at::zeros(in.bias.sizes(), acc) : at::empty({0}, acc);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  for (int64_t start = 0; start < M; start += chunk_size) {
    const int64_t n = std::min(chunk_size, M - start);
    // 1. Recompute this chunk's logits, 2. overwrite them with dlogits, 3. the matmuls.
    const at::Tensor h_chunk = in.hidden.narrow(0, start, n).to(in.math);
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
