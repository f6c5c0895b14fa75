// Torch binding of the CUDA softmax kernels: checks, output allocation, the current stream, the launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "softmax_params.h"

namespace gptfast::cuda {
namespace {

constexpr const char* kFwd = "softmax_fwd (cuda)";
constexpr const char* kBwd = "softmax_bwd (cuda)";

// x (rows, cols) -> y (rows, cols) = softmax(scale * x) per row, causal when causal_rows > 0.
at::Tensor softmax_fwd(const at::Tensor& x, double scale, int64_t causal_rows) {
  check_cuda(x, kFwd, "x");
  check_dim(x, 2, kFwd, "x");
  TORCH_CHECK(causal_rows >= 0, kFwd, ": causal_rows must be >= 0, got ", causal_rows);
  SoftmaxParams p;
  p.dtype = dtype_of(x, kFwd, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  c10::cuda::CUDAGuard guard(x.device());
  p.x = xc.data_ptr();
  p.out = y.data_ptr();
  p.rows = xc.size(0);
  p.cols = xc.size(1);
  p.x_row_stride = xc.stride(0);
  p.out_row_stride = y.stride(0);
  p.scale = static_cast<float>(scale);
  p.causal_rows = causal_rows;
  check_launch(softmax_fwd_launch(p, at::cuda::getCurrentCUDAStream().stream()), kFwd);
  return y;
}

// dy, y (rows, cols) -> dx = scale * y * (dy - rowsum(dy * y)).
at::Tensor softmax_bwd(const at::Tensor& dy, const at::Tensor& y, double scale, int64_t causal_rows) {
  check_cuda(y, kBwd, "y");
  check_same_device(y, dy, kBwd, "dy");
  check_dim(y, 2, kBwd, "y");
  TORCH_CHECK(dy.sizes() == y.sizes(), kBwd, ": dy must have y's shape ", y.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == y.scalar_type(), kBwd, ": dy must have y's dtype ", y.scalar_type(), ", got ",
              dy.scalar_type());
  SoftmaxParams p;
  p.dtype = dtype_of(y, kBwd, "y");
  const at::Tensor yc = y.contiguous(), dyc = dy.contiguous();
  at::Tensor dx = at::empty(yc.sizes(), yc.options());
  c10::cuda::CUDAGuard guard(y.device());
  p.y = yc.data_ptr();
  p.dy = dyc.data_ptr();
  p.out = dx.data_ptr();
  p.rows = yc.size(0);
  p.cols = yc.size(1);
  p.y_row_stride = yc.stride(0);
  p.dy_row_stride = dyc.stride(0);
  p.out_row_stride = dx.stride(0);
  p.scale = static_cast<float>(scale);
  p.causal_rows = causal_rows;
  check_launch(softmax_bwd_launch(p, at::cuda::getCurrentCUDAStream().stream()), kBwd);
  return dx;
}

}  // namespace
}  // namespace gptfast::cuda

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("softmax_fwd", &gptfast::cuda::softmax_fwd);
  m.impl("softmax_bwd", &gptfast::cuda::softmax_bwd);
}
