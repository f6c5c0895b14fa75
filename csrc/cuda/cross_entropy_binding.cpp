// Torch binding of the CUDA cross-entropy kernels: checks, output allocation, the current stream, the launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "binding_utils.h"
#include "cross_entropy_params.h"

namespace gptfast::cuda {
namespace {

constexpr const char* kFwd = "cross_entropy_fwd (cuda)";
constexpr const char* kBwd = "cross_entropy_bwd (cuda)";

void check_target(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  check_same_device(logits, target, op, "target");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must have shape (",
              logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must be int64 or int32, got ", target.scalar_type());
}

// logits (M, V), target (M,) -> (loss (M,) fp32, lse (M,) fp32).
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                     int64_t ignore_index, double label_smoothing, double z_loss) {
  check_cuda(logits, kFwd, "logits");
  check_dim(logits, 2, kFwd, "logits");
  check_target(logits, target, kFwd);
  CrossEntropyParams p;
  p.dtype = dtype_of(logits, kFwd, "logits");
  const at::Tensor x = logits.contiguous(), t = target.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({x.size(0)}, f32), lse = at::empty({x.size(0)}, f32);
  c10::cuda::CUDAGuard guard(logits.device());
  p.logits = x.data_ptr();
  p.logits_row_stride = x.stride(0);
  p.target = t.data_ptr();
  p.target_int32 = t.scalar_type() == at::kInt;
  p.loss = loss.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.ignore_index = ignore_index;
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss = static_cast<float>(z_loss);
  check_launch(cross_entropy_fwd_launch(p, at::cuda::getCurrentCUDAStream().stream()), kFwd);
  return {loss, lse};
}

// dloss (M,), logits (M, V), target (M,), lse (M,) -> dlogits (M, V) in logits' dtype.
at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss) {
  check_cuda(logits, kBwd, "logits");
  check_dim(logits, 2, kBwd, "logits");
  check_target(logits, target, kBwd);
  check_same_device(logits, dloss, kBwd, "dloss");
  check_same_device(logits, lse, kBwd, "lse");
  TORCH_CHECK(dloss.numel() == logits.size(0) && lse.numel() == logits.size(0), kBwd,
              ": dloss and lse must have ", logits.size(0), " elements, got ", dloss.numel(), " and ", lse.numel());
  CrossEntropyParams p;
  p.dtype = dtype_of(logits, kBwd, "logits");
  const at::Tensor x = logits.contiguous(), t = target.contiguous();
  const at::Tensor dl = dloss.to(at::kFloat).contiguous(), l = lse.to(at::kFloat).contiguous();
  at::Tensor dlogits = at::empty(x.sizes(), x.options());
  c10::cuda::CUDAGuard guard(logits.device());
  p.logits = x.data_ptr();
  p.logits_row_stride = x.stride(0);
  p.target = t.data_ptr();
  p.target_int32 = t.scalar_type() == at::kInt;
  p.dloss = dl.data_ptr<float>();
  p.lse_in = l.data_ptr<float>();
  p.dlogits = dlogits.data_ptr();
  p.dlogits_row_stride = dlogits.stride(0);
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.ignore_index = ignore_index;
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss = static_cast<float>(z_loss);
  check_launch(cross_entropy_bwd_launch(p, at::cuda::getCurrentCUDAStream().stream()), kBwd);
  return dlogits;
}

}  // namespace
}  // namespace gptfast::cuda

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("cross_entropy_fwd", &gptfast::cuda::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &gptfast::cuda::cross_entropy_bwd);
}
