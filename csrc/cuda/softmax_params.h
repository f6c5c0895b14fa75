// The plain arguments of the CUDA softmax kernels (filled by softmax_binding.cpp, read by softmax.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace gptfast::cuda {

// Forward: out = softmax(scale * x) per row of an (rows, cols) matrix. Backward: out = dx =
// scale * y * (dy - rowsum(dy * y)). causal_rows = L > 0 masks column j of row r when j > r % L.
// All matrices have unit column stride; row strides are in elements. Every pointer has type `dtype`.
struct SoftmaxParams {
  const void* x = nullptr;   // forward input
  const void* y = nullptr;   // backward: the forward's output
  const void* dy = nullptr;  // backward: gradient of y
  void* out = nullptr;       // forward: y; backward: dx
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t x_row_stride = 0;
  int64_t y_row_stride = 0;
  int64_t dy_row_stride = 0;
  int64_t out_row_stride = 0;
  float scale = 1.0f;
  int64_t causal_rows = 0;
  DType dtype = DType::kFloat32;
  // 0: the kernel the row length picks (softmax.cu); 1: the online block-per-row kernel at any length.
  int kernel = 0;
};

// 2 where the default is the in-register block kernel (rows longer than a warp holds and short enough for
// a block's registers), so that the online kernel is a real alternative: the binding times the two. Else 1
// (the online kernel still runs any shape when forced).
int softmax_kernel_choices(const SoftmaxParams& params, bool forward);
// Whether the launch takes the 16-byte path (aligned pointers and row strides) rather than the scalar one.
bool softmax_vectorised(const SoftmaxParams& params, bool forward);

cudaError_t softmax_fwd_launch(const SoftmaxParams& params, cudaStream_t stream);
cudaError_t softmax_bwd_launch(const SoftmaxParams& params, cudaStream_t stream);

}  // namespace gptfast::cuda
