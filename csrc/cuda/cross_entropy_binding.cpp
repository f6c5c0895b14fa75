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
constexpr const char* kBwdInplace = "cross_entropy_bwd_inplace (cuda)";

void check_target(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  check_same_device(logits, target, op, "target");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must have shape (",
              logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must be int64 or int32, got ", target.scalar_type());
}

// loss, lse and the kernels' math: fp64 for fp64 logits, fp32 otherwise.
at::ScalarType math_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// logits (M, V), target (M,) -> (loss (M,), lse (M,)) in math_type.
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                     int64_t ignore_index, double label_smoothing, double z_loss) {
  check_cuda(logits, kFwd, "logits");
  check_dim(logits, 2, kFwd, "logits");
  check_target(logits, target, kFwd);
  CrossEntropyParams p;
  p.dtype = dtype_of(logits, kFwd, "logits", /*allow_double=*/true);
  const at::Tensor x = logits.contiguous(), t = target.contiguous();
  const auto acc = x.options().dtype(math_type(x));
  at::Tensor loss = at::empty({x.size(0)}, acc), lse = at::empty({x.size(0)}, acc);
  c10::cuda::CUDAGuard guard(logits.device());
  p.logits = x.data_ptr();
  p.logits_row_stride = x.stride(0);
  p.target = t.data_ptr();
  p.target_int32 = t.scalar_type() == at::kInt;
  p.loss = loss.data_ptr();
  p.lse = lse.data_ptr();
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  check_launch(cross_entropy_fwd_launch(p, at::cuda::getCurrentCUDAStream().stream()), kFwd);
  return {loss, lse};
}

// dlogits of the contiguous (M, V) logits into `out`, which may be the logits themselves: each thread reads
// its elements before it overwrites them.
void launch_grad(const at::Tensor& dloss, const at::Tensor& x, const at::Tensor& target, const at::Tensor& lse,
                 int64_t ignore_index, double label_smoothing, double z_loss, at::Tensor& out, const char* op) {
  check_target(x, target, op);
  check_same_device(x, dloss, op, "dloss");
  check_same_device(x, lse, op, "lse");
  TORCH_CHECK(dloss.numel() == x.size(0) && lse.numel() == x.size(0), op, ": dloss and lse must have ",
              x.size(0), " elements, got ", dloss.numel(), " and ", lse.numel());
  CrossEntropyParams p;
  p.dtype = dtype_of(x, op, "logits", /*allow_double=*/true);
  const at::Tensor t = target.contiguous();
  const at::Tensor dl = dloss.to(math_type(x)).contiguous(), l = lse.to(math_type(x)).contiguous();
  c10::cuda::CUDAGuard guard(x.device());
  p.logits = x.data_ptr();
  p.logits_row_stride = x.stride(0);
  p.target = t.data_ptr();
  p.target_int32 = t.scalar_type() == at::kInt;
  p.dloss = dl.data_ptr();
  p.lse_in = l.data_ptr();
  p.dlogits = out.data_ptr();
  p.dlogits_row_stride = out.stride(0);
  p.rows = x.size(0);
  p.cols = x.size(1);
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  check_launch(cross_entropy_bwd_launch(p, at::cuda::getCurrentCUDAStream().stream()), op);
}

// dloss (M,), logits (M, V), target (M,), lse (M,) -> dlogits (M, V) in logits' dtype.
at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss) {
  check_cuda(logits, kBwd, "logits");
  check_dim(logits, 2, kBwd, "logits");
  const at::Tensor x = logits.contiguous();
  at::Tensor dlogits = at::empty(x.sizes(), x.options());
  launch_grad(dloss, x, target, lse, ignore_index, label_smoothing, z_loss, dlogits, kBwd);
  return dlogits;
}

// The same dlogits written over the (contiguous) logits: ops.cross_entropy(..., inplace_backward=True).
void cross_entropy_bwd_inplace(const at::Tensor& dloss, at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss) {
  check_cuda(logits, kBwdInplace, "logits");
  check_dim(logits, 2, kBwdInplace, "logits");
  TORCH_CHECK(logits.is_contiguous(), kBwdInplace, ": logits must be contiguous, got strides ", logits.strides());
  launch_grad(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss, logits, kBwdInplace);
}

}  // namespace
}  // namespace gptfast::cuda

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("cross_entropy_fwd", &gptfast::cuda::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &gptfast::cuda::cross_entropy_bwd);
  m.impl("cross_entropy_bwd_inplace", &gptfast::cuda::cross_entropy_bwd_inplace);
}
