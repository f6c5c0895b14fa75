// Torch binding of the CUDA softmax kernels: checks, output allocation, the current stream, the launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "binding_utils.h"
#include "softmax_params.h"

namespace gptfast::cuda {
namespace {

constexpr const char* kFwd = "softmax_fwd (cuda)";
constexpr const char* kBwd = "softmax_bwd (cuda)";

// Rows longer than a warp holds and short enough for a block's registers run, by default, a block per row
// with the row in registers: one read and one write, but a 32k-column row fills a 1024-thread block's
// registers, so an SM holds one row at a time. The online block kernel parks the row in shared memory
// instead (three 16-bit rows of that length an SM) at the cost of a second pass over it. Which wins depends on
// the row length and the GPU, so the first call of each bucket (device, dtype, direction, 16-byte or scalar
// path, causal, and the powers of two at or above the columns and the rows) times both and keeps the faster
// (binding_utils.h). GPTFAST_CUDA_SOFTMAX_KERNEL=0 or 1 forces one:
// 0, the kernel the row length picks; 1, the online block kernel at any length (the tests of both).
const char* kernel_name(int i) { return i == 0 ? "registers" : "online"; }

void choose_kernel(SoftmaxParams& p, bool forward, int device, cudaStream_t stream) {
  const char* op = forward ? kFwd : kBwd;
  const std::string what = "a kernel index (0: by row length, 1: the online block kernel)";
  if (const std::optional<int> forced = forced_choice("GPTFAST_CUDA_SOFTMAX_KERNEL", 2, op, what)) {
    p.kernel = *forced;
    return;
  }
  if (p.rows == 0 || softmax_kernel_choices(p, forward) == 1 || !autotune_enabled()) return;
  static PickCache<7> picks;
  const PickCache<7>::Key key{device, static_cast<int64_t>(p.dtype), forward, softmax_vectorised(p, forward),
                              p.causal_rows > 0, pow2_bucket(p.cols), pow2_bucket(p.rows)};
  SoftmaxParams t = p;
  const std::optional<int> pick = timed_pick(
      picks, key, 2, stream, op,
      [&](int i) {
        t.kernel = i;
        check_launch(forward ? softmax_fwd_launch(t, stream) : softmax_bwd_launch(t, stream), op);
      },
      [](int) { return false; },
      [&] {
        return std::string(dtype_name(p.dtype)) + (key[3] ? "" : " scalar") + " cols<=" + std::to_string(key[5]) +
               (p.causal_rows > 0 ? " causal" : "") + " rows<=" + std::to_string(key[6]);
      },
      [](int i) { return std::string(kernel_name(i)); });
  p.kernel = pick.value_or(0);
}

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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  choose_kernel(p, true, x.get_device(), stream);
  check_launch(softmax_fwd_launch(p, stream), kFwd);
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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  choose_kernel(p, false, y.get_device(), stream);
  check_launch(softmax_bwd_launch(p, stream), kBwd);
  return dx;
}

}  // namespace
}  // namespace gptfast::cuda

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("softmax_fwd", &gptfast::cuda::softmax_fwd);
  m.impl("softmax_bwd", &gptfast::cuda::softmax_bwd);
}
