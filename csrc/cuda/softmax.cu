// Softmax forward and backward over the rows of an (rows, cols) matrix, fp32 math for every dtype.
//
// Two shapes of kernel (see README.md):
// - cols <= kWarpMaxCols: one warp per row, the whole row held in registers, so x is read once and y
//   written once; warp shuffles do the reductions.
// - longer rows: one block per row; a first pass keeps an online (max, sum of exp) pair per thread and
//   merges them across the block, a second pass writes y from the values parked in shared memory (rows up
//   to 12288 columns) or from a second read of the row (mostly served by L2).
// Loads and stores are 16 bytes wide when the launcher has checked the alignment, scalar otherwise.
#include <algorithm>

#include "common.cuh"
#include "softmax_params.h"

namespace gptfast::cuda {
namespace {

constexpr int kWarpMaxCols = 2048;
constexpr int kWarpRowsPerBlock = 4;
constexpr int kBlockThreads = 512;
constexpr int64_t kCacheBytes = 48 * 1024;

__device__ __forceinline__ int64_t ceil_div_device(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 1. The scaled score of column c, or -inf where the causal mask or the end of the row removes it.
__device__ __forceinline__ float score(float x, int64_t c, int64_t cols, int64_t row, const SoftmaxParams& p) {
  const bool gone = c >= cols || (p.causal_rows > 0 && c > row % p.causal_rows);
  return gone ? -INFINITY : x * p.scale;
}

// A row whose every score is -inf has max -inf: subtract 0 instead, so exp gives 0 and the row is zeros.
__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

// 1 / sum exp(s - max). Only a fully masked row sums to 0 (it gives zeros). A NaN or +inf score must make
// the whole row NaN, as in torch: fmaxf drops NaN (so a clamp of the sum would turn it into a huge finite
// scale), and the online pair keeps a finite sum when the max is +inf, so both cases are caught here.
__device__ __forceinline__ float inv_sum(float sum, float max) {
  if (max == INFINITY) return NAN;
  return sum == 0.0f ? 0.0f : 1.0f / sum;
}

template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(kWarpRowsPerBlock * kWarpSize)
softmax_fwd_warp_kernel(const SoftmaxParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * kWarpRowsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarpSize; row < p.rows;
       row += stride) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    T* y = static_cast<T*>(p.out) + row * p.out_row_stride;
    // 1. Scores into registers; lane owns columns (it * 32 + lane) * VEC + e.
    float v[ITERS][VEC];
    float m = -INFINITY;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * kWarpSize + lane) * VEC;
      load_vec<T, VEC>(x, c, p.cols, v[it], 0.0f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[it][e] = score(v[it][e], c + e, p.cols, row, p);
        m = fmaxf(m, v[it][e]);
      }
    }
    // 2. y = exp(s - max) / sum exp(s - max).
    m = warp_max(m);
    const float row_max = m;
    m = safe_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[it][e] = __expf(v[it][e] - m);
        sum += v[it][e];
      }
    }
    const float inv = inv_sum(warp_sum(sum), row_max);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[it][e] *= inv;
      store_vec<T, VEC>(y, (int64_t(it) * kWarpSize + lane) * VEC, p.cols, v[it]);
    }
  }
}

template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(kWarpRowsPerBlock * kWarpSize)
softmax_bwd_warp_kernel(const SoftmaxParams p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * kWarpRowsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarpSize; row < p.rows;
       row += stride) {
    const T* y = static_cast<const T*>(p.y) + row * p.y_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    T* dx = static_cast<T*>(p.out) + row * p.out_row_stride;
    // 1. dot = sum_j dy_j * y_j (padding reads as 0).
    float yv[ITERS][VEC], gv[ITERS][VEC];
    float dot = 0.0f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * kWarpSize + lane) * VEC;
      load_vec<T, VEC>(y, c, p.cols, yv[it], 0.0f);
      load_vec<T, VEC>(dy, c, p.cols, gv[it], 0.0f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot += yv[it][e] * gv[it][e];
    }
    dot = warp_sum(dot);
    // 2. dx_j = scale * y_j * (dy_j - dot).
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) gv[it][e] = p.scale * yv[it][e] * (gv[it][e] - dot);
      store_vec<T, VEC>(dx, (int64_t(it) * kWarpSize + lane) * VEC, p.cols, gv[it]);
    }
  }
}

// CACHE: the first pass also parks each thread's values in shared memory (at slots only that thread
// touches, so no barrier is needed), and the second pass reads them back instead of re-reading global memory.
// Slot (k, e) of thread t, for its k-th vector and element e, is (k * VEC + e) * blockDim.x + t: consecutive
// threads hit consecutive banks.
__device__ __forceinline__ int cache_slot(int k, int e, int vec) { return (k * vec + e) * blockDim.x + threadIdx.x; }

template <typename T, int VEC, bool CACHE>
__global__ void __launch_bounds__(kBlockThreads) softmax_fwd_block_kernel(const SoftmaxParams p) {
  __shared__ float scratch[2 * kWarpSize];
  extern __shared__ float cache[];
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    T* y = static_cast<T*>(p.out) + row * p.out_row_stride;
    // 1. Online (max, sum exp) per thread, merged over the block.
    float m = -INFINITY, s = 0.0f;
    int k = 0;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.cols; c += int64_t(blockDim.x) * VEC, ++k) {
      float v[VEC];
      load_vec<T, VEC>(x, c, p.cols, v, 0.0f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float sv = score(v[e], c + e, p.cols, row, p);
        online_add(m, s, sv);
        if constexpr (CACHE) cache[cache_slot(k, e, VEC)] = sv;
      }
    }
    block_online_merge(m, s, scratch);
    const float inv = inv_sum(s, m);
    m = safe_max(m);
    // 2. y = exp(s - max) / sum, from the cache or a second read of the row (mostly from L2).
    k = 0;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.cols; c += int64_t(blockDim.x) * VEC, ++k) {
      float v[VEC];
      if constexpr (CACHE) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = cache[cache_slot(k, e, VEC)];
      } else {
        load_vec<T, VEC>(x, c, p.cols, v, 0.0f);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = score(v[e], c + e, p.cols, row, p);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = __expf(v[e] - m) * inv;
      store_vec<T, VEC>(y, c, p.cols, v);
    }
  }
}

template <typename T, int VEC, bool CACHE>
__global__ void __launch_bounds__(kBlockThreads) softmax_bwd_block_kernel(const SoftmaxParams p) {
  __shared__ float scratch[kWarpSize];
  extern __shared__ float cache[];  // CACHE: y at slot i, dy at slot i + slots
  const int slots = int(ceil_div_device(p.cols, int64_t(blockDim.x) * VEC)) * VEC * blockDim.x;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* y = static_cast<const T*>(p.y) + row * p.y_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    T* dx = static_cast<T*>(p.out) + row * p.out_row_stride;
    // 1. dot = sum_j dy_j * y_j over the block.
    float dot = 0.0f;
    int k = 0;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.cols; c += int64_t(blockDim.x) * VEC, ++k) {
      float yv[VEC], gv[VEC];
      load_vec<T, VEC>(y, c, p.cols, yv, 0.0f);
      load_vec<T, VEC>(dy, c, p.cols, gv, 0.0f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dot += yv[e] * gv[e];
        if constexpr (CACHE) {
          cache[cache_slot(k, e, VEC)] = yv[e];
          cache[slots + cache_slot(k, e, VEC)] = gv[e];
        }
      }
    }
    dot = block_sum(dot, scratch);
    // 2. dx_j = scale * y_j * (dy_j - dot).
    k = 0;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.cols; c += int64_t(blockDim.x) * VEC, ++k) {
      float yv[VEC], gv[VEC];
      if constexpr (CACHE) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          yv[e] = cache[cache_slot(k, e, VEC)];
          gv[e] = cache[slots + cache_slot(k, e, VEC)];
        }
      } else {
        load_vec<T, VEC>(y, c, p.cols, yv, 0.0f);
        load_vec<T, VEC>(dy, c, p.cols, gv, 0.0f);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) gv[e] = p.scale * yv[e] * (gv[e] - dot);
      store_vec<T, VEC>(dx, c, p.cols, gv);
    }
  }
}

// Picks the smallest ITERS (a power of two) whose 32 * ITERS * VEC columns cover the row.
template <typename T, int VEC, int ITERS, bool FWD>
void launch_warp(const SoftmaxParams& p, cudaStream_t stream) {
  if constexpr (ITERS * kWarpSize * VEC < kWarpMaxCols) {
    if (p.cols > int64_t(ITERS) * kWarpSize * VEC) return launch_warp<T, VEC, ITERS * 2, FWD>(p, stream);
  }
  const int64_t blocks = std::min(ceil_div(p.rows, kWarpRowsPerBlock), kMaxBlocks);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpRowsPerBlock * kWarpSize);
  if constexpr (FWD) {
    softmax_fwd_warp_kernel<T, VEC, ITERS><<<grid, block, 0, stream>>>(p);
  } else {
    softmax_bwd_warp_kernel<T, VEC, ITERS><<<grid, block, 0, stream>>>(p);
  }
}

// Long rows are cached in shared memory when the cache fits the 48 KB that needs no opt-in: up to 12288
// columns forward (one float each), 6144 backward (y and dy).
template <typename T, int VEC, bool FWD>
void launch_shape(const SoftmaxParams& p, cudaStream_t stream) {
  if (p.cols <= kWarpMaxCols) return launch_warp<T, VEC, 1, FWD>(p, stream);
  const dim3 grid(static_cast<unsigned>(std::min(p.rows, kMaxBlocks))), block(kBlockThreads);
  const int64_t slots = ceil_div(p.cols, int64_t(kBlockThreads) * VEC) * VEC * kBlockThreads;
  const int64_t cache_bytes = slots * int64_t(sizeof(float)) * (FWD ? 1 : 2);
  const bool cache = cache_bytes <= kCacheBytes;
  if constexpr (FWD) {
    if (cache) {
      softmax_fwd_block_kernel<T, VEC, true><<<grid, block, cache_bytes, stream>>>(p);
    } else {
      softmax_fwd_block_kernel<T, VEC, false><<<grid, block, 0, stream>>>(p);
    }
  } else {
    if (cache) {
      softmax_bwd_block_kernel<T, VEC, true><<<grid, block, cache_bytes, stream>>>(p);
    } else {
      softmax_bwd_block_kernel<T, VEC, false><<<grid, block, 0, stream>>>(p);
    }
  }
}

// 16-byte accesses need every row start 16-byte aligned: aligned base pointers and row strides that are a
// multiple of the vector width.
template <typename T, bool FWD>
cudaError_t launch(const SoftmaxParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  constexpr int V = kVec16<T>;
  const bool vec = FWD ? aligned16(p.x) && aligned16(p.out) && p.x_row_stride % V == 0 && p.out_row_stride % V == 0
                       : aligned16(p.y) && aligned16(p.dy) && aligned16(p.out) && p.y_row_stride % V == 0 &&
                             p.dy_row_stride % V == 0 && p.out_row_stride % V == 0;
  if (vec) {
    launch_shape<T, V, FWD>(p, stream);
  } else {
    launch_shape<T, 1, FWD>(p, stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t softmax_fwd_launch(const SoftmaxParams& params, cudaStream_t stream) {
  return GPTFAST_DTYPE_SWITCH(params.dtype, T, [&] { return launch<T, true>(params, stream); });
}

cudaError_t softmax_bwd_launch(const SoftmaxParams& params, cudaStream_t stream) {
  return GPTFAST_DTYPE_SWITCH(params.dtype, T, [&] { return launch<T, false>(params, stream); });
}

}  // namespace gptfast::cuda
