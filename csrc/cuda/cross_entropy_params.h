// The plain arguments of the CUDA cross-entropy kernels (filled by cross_entropy_binding.cpp and
// linear_cross_entropy_binding.cpp, read by cross_entropy.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace gptfast::cuda {

// Per row r of logits (rows, cols), with t = target[r], lse = logsumexp(logits[r]), eps = label_smoothing:
//   forward:  loss[r] = (1 - eps) (lse - x_t) + eps (lse - mean_j x_j) + z_loss lse^2, and lse[r];
//             a row whose target is ignore_index gets loss 0.
//   backward: dlogits[r, j] = dloss[r] (p_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == t]),
//             p_j = exp(x_j - lse); ignored rows get 0. dlogits may alias logits (in place).
// A target outside [0, cols) that is not ignore_index gives a NaN loss and a NaN gradient row.
// The backward may see one vocab slice: with vocab > 0 its (rows, cols) logits are the columns
// [col_offset, col_offset + cols) of a `vocab`-class row, and V = vocab in the formulas above (eps / V, the
// target's range), the target's column shifted by col_offset (linear_cross_entropy's vocab pass).
// loss, lse, lse_in and dloss are fp32, or fp64 when dtype is kFloat64 (then all the math is fp64).
struct CrossEntropyParams {
  const void* logits = nullptr;  // (rows, cols) of `dtype`, unit column stride
  int64_t logits_row_stride = 0;
  const void* target = nullptr;  // (rows,) int64, or int32 when target_int32
  bool target_int32 = false;
  void* loss = nullptr;           // forward output (rows,)
  void* lse = nullptr;            // forward output (rows,)
  const void* lse_in = nullptr;   // backward input (rows,)
  const void* dloss = nullptr;    // backward input (rows,); nullptr means 1 for every row
  void* dlogits = nullptr;         // backward output (rows, cols) of `dtype`
  int64_t dlogits_row_stride = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t col_offset = 0;  // backward: the first column's index in the vocab
  int64_t vocab = 0;       // backward: the row's classes, 0 meaning cols
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  DType dtype = DType::kFloat32;
};

cudaError_t cross_entropy_fwd_launch(const CrossEntropyParams& params, cudaStream_t stream);
cudaError_t cross_entropy_bwd_launch(const CrossEntropyParams& params, cudaStream_t stream);

}  // namespace gptfast::cuda
