// Softmax forward and backward over the rows of an (rows, cols) matrix, fp32 math for every dtype.
//
// Three shapes of kernel (see README.md):
// - cols <= kWarpMaxCols: one warp per row, the whole row held in registers, so x is read once and y
//   written once; warp shuffles do the reductions.
// - up to 32768 columns (16384 for an fp32 backward): one block of up to 1024 threads (512 backward) per
//   row, the row still in registers; block reductions through shared memory.
// - longer rows: one block per row; a first pass keeps an online (max, sum of exp) pair per thread and
//   merges them across the block, a second pass writes y from the row parked in shared memory in its
//   dtype (up to 128 KB, opted in) or from a second read of the row (mostly served by L2).
// SoftmaxParams::kernel = 1 runs the third at any length: the binding times it against the second, which
// holds one 32k-column row per SM (its 1024 threads fill the registers), where the third parks a 16-bit row
// of that length in 64 KB of shared memory, so three blocks fit.
// Loads and stores are 16 bytes wide when the launcher has checked the alignment, scalar otherwise.
#include <algorithm>

#include "common.cuh"
#include "softmax_params.h"

namespace gptfast::cuda {
namespace {

constexpr int kWarpMaxCols = 2048;
constexpr int kWarpRowsPerBlock = 4;
// Threads of a block-per-row kernel holding its row in registers: 1024 forward (<= 32 fp32 scores each fit
// the 64 registers a full block allows), 512 backward (y and dy, up to 64 elements each).
template <bool FWD>
constexpr int kRowMaxThreads = FWD ? 1024 : 512;
constexpr int kBlockThreads = 512;
constexpr int64_t kCacheBytes = 128 * 1024;

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

// Rows held in registers. WARP_ROWS: a warp per row, four rows per 128-thread block (rows up to
// kWarpMaxCols). Else the whole block per row, up to kRowMaxThreads threads (rows up to kRowMaxCols): the
// row is still read once and written once, with ITERS independent 16-byte loads per thread in flight.
template <bool WARP_ROWS>
__device__ __forceinline__ float row_max(float x, float* scratch) {
  if constexpr (WARP_ROWS) return warp_max(x);
  else return block_max(x, scratch);
}

template <bool WARP_ROWS>
__device__ __forceinline__ float row_sum(float x, float* scratch) {
  if constexpr (WARP_ROWS) return warp_sum(x);
  else return block_sum(x, scratch);
}

// The thread's position in its row's group, the group's size, and the first row and row step of the thread.
struct RowSlot {
  int lane, threads;
  int64_t row, stride;
};

template <bool WARP_ROWS>
__device__ __forceinline__ RowSlot row_slot() {
  if constexpr (WARP_ROWS) {
    return {static_cast<int>(threadIdx.x % kWarpSize), kWarpSize,
            int64_t(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarpSize, int64_t(gridDim.x) * kWarpRowsPerBlock};
  } else {
    return {static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), int64_t(blockIdx.x), int64_t(gridDim.x)};
  }
}

template <typename T, int VEC, int ITERS, bool WARP_ROWS>
__global__ void __launch_bounds__(WARP_ROWS ? kWarpRowsPerBlock * kWarpSize : kRowMaxThreads<true>)
softmax_fwd_rows_kernel(const SoftmaxParams p) {
  __shared__ float scratch[kWarpSize];
  const RowSlot slot = row_slot<WARP_ROWS>();
  for (int64_t row = slot.row; row < p.rows; row += slot.stride) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    T* y = static_cast<T*>(p.out) + row * p.out_row_stride;
    // 1. Scores into registers; the thread owns columns (it * threads + lane) * VEC + e.
    float v[ITERS][VEC];
    float m = -INFINITY;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * slot.threads + slot.lane) * VEC;
      load_vec<T, VEC>(x, c, p.cols, v[it], 0.0f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[it][e] = score(v[it][e], c + e, p.cols, row, p);
        m = fmaxf(m, v[it][e]);
      }
    }
    // 2. y = exp(s - max) / sum exp(s - max).
    m = row_max<WARP_ROWS>(m, scratch);
    const float row_max_value = m;
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
    const float inv = inv_sum(row_sum<WARP_ROWS>(sum, scratch), row_max_value);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[it][e] *= inv;
      store_vec<T, VEC>(y, (int64_t(it) * slot.threads + slot.lane) * VEC, p.cols, v[it]);
    }
  }
}

// y and dy stay in registers in their own dtype (half the registers of fp32 for fp16/bf16), converted
// where used.
template <typename T, int VEC, int ITERS, bool WARP_ROWS>
__global__ void __launch_bounds__(WARP_ROWS ? kWarpRowsPerBlock * kWarpSize : kRowMaxThreads<false>)
softmax_bwd_rows_kernel(const SoftmaxParams p) {
  __shared__ float scratch[kWarpSize];
  const RowSlot slot = row_slot<WARP_ROWS>();
  for (int64_t row = slot.row; row < p.rows; row += slot.stride) {
    const T* y = static_cast<const T*>(p.y) + row * p.y_row_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    T* dx = static_cast<T*>(p.out) + row * p.out_row_stride;
    // 1. dot = sum_j dy_j * y_j (padding reads as 0).
    Vec<T, VEC> yv[ITERS], gv[ITERS];
    float dot = 0.0f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * slot.threads + slot.lane) * VEC;
      yv[it] = load_raw<T, VEC>(y, c, p.cols);
      gv[it] = load_raw<T, VEC>(dy, c, p.cols);
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if constexpr (VEC == 1) {
        dot += to_float(yv[it].v[0]) * to_float(gv[it].v[0]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; e += 2) {
          const float2 a = raw_pair(yv[it], e), b = raw_pair(gv[it], e);
          dot += a.x * b.x + a.y * b.y;
        }
      }
    }
    dot = row_sum<WARP_ROWS>(dot, scratch);
    // 2. dx_j = scale * y_j * (dy_j - dot).
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      float out[VEC];
      if constexpr (VEC == 1) {
        out[0] = p.scale * to_float(yv[it].v[0]) * (to_float(gv[it].v[0]) - dot);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; e += 2) {
          const float2 a = raw_pair(yv[it], e), b = raw_pair(gv[it], e);
          out[e] = p.scale * a.x * (b.x - dot);
          out[e + 1] = p.scale * a.y * (b.y - dot);
        }
      }
      store_vec<T, VEC>(dx, (int64_t(it) * slot.threads + slot.lane) * VEC, p.cols, out);
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
  extern __shared__ __align__(128) unsigned char smem[];
  T* cache = reinterpret_cast<T*>(smem);  // CACHE: the row as read, in its dtype
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    T* y = static_cast<T*>(p.out) + row * p.out_row_stride;
    // 1. Online (max, sum exp) per thread, one rescale per vector, merged over the block.
    float m = -INFINITY, s = 0.0f;
    int k = 0;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.cols; c += int64_t(blockDim.x) * VEC, ++k) {
      float v[VEC];
      load_vec<T, VEC>(x, c, p.cols, v, 0.0f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if constexpr (CACHE) cache[cache_slot(k, e, VEC)] = from_float<T>(v[e]);  // exact: v came from a T
        v[e] = score(v[e], c + e, p.cols, row, p);
      }
      online_add_vec(m, s, v);
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
        for (int e = 0; e < VEC; ++e) v[e] = to_float(cache[cache_slot(k, e, VEC)]);
      } else {
        load_vec<T, VEC>(x, c, p.cols, v, 0.0f);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[e] = __expf(score(v[e], c + e, p.cols, row, p) - m) * inv;
      store_vec<T, VEC>(y, c, p.cols, v);
    }
  }
}

template <typename T, int VEC, bool CACHE>
__global__ void __launch_bounds__(kBlockThreads) softmax_bwd_block_kernel(const SoftmaxParams p) {
  __shared__ float scratch[kWarpSize];
  extern __shared__ __align__(128) unsigned char smem[];
  T* cache = reinterpret_cast<T*>(smem);  // CACHE: y at slot i, dy at slot i + slots, in their dtype
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
          cache[cache_slot(k, e, VEC)] = from_float<T>(yv[e]);
          cache[slots + cache_slot(k, e, VEC)] = from_float<T>(gv[e]);
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
          yv[e] = to_float(cache[cache_slot(k, e, VEC)]);
          gv[e] = to_float(cache[slots + cache_slot(k, e, VEC)]);
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
cudaError_t launch_warp(const SoftmaxParams& p, cudaStream_t stream) {
  if constexpr (ITERS * kWarpSize * VEC < kWarpMaxCols) {
    if (p.cols > int64_t(ITERS) * kWarpSize * VEC) return launch_warp<T, VEC, ITERS * 2, FWD>(p, stream);
  }
  const int64_t blocks = std::min(ceil_div(p.rows, kWarpRowsPerBlock), kMaxBlocks);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpRowsPerBlock * kWarpSize);
  if constexpr (FWD) {
    softmax_fwd_rows_kernel<T, VEC, ITERS, true><<<grid, block, 0, stream>>>(p);
  } else {
    softmax_bwd_rows_kernel<T, VEC, ITERS, true><<<grid, block, 0, stream>>>(p);
  }
  return cudaSuccess;
}

// Vectors per thread a block-per-row kernel may hold: <= 32 fp32 scores forward, <= 64 bytes of each of y
// and dy backward (more spills: ptxas unpacks fp16/bf16 pairs); never more than 8 (the scalar path).
template <typename T, int VEC, bool FWD>
constexpr int kRowMaxIters = std::min(8, FWD ? 32 / VEC : 64 / (VEC * static_cast<int>(sizeof(T))));

// 32768 columns forward (8192 on the scalar path); backward 16384 for fp16/bf16, 8192 for fp32 (4096 on
// the scalar path).
template <typename T, int VEC, bool FWD>
constexpr int64_t kRowMaxCols = int64_t(kRowMaxThreads<FWD>) * VEC * kRowMaxIters<T, VEC, FWD>;

// The smallest ITERS (a power of two) with which kRowMaxThreads threads cover the row, and then the fewest
// threads (a power of two, at least 128) that do.
template <typename T, int VEC, int ITERS, bool FWD>
cudaError_t launch_rows(const SoftmaxParams& p, cudaStream_t stream) {
  if constexpr (ITERS < kRowMaxIters<T, VEC, FWD>) {
    if (p.cols > int64_t(kRowMaxThreads<FWD>) * VEC * ITERS) return launch_rows<T, VEC, ITERS * 2, FWD>(p, stream);
  }
  int threads = 128;
  while (int64_t(threads) * VEC * ITERS < p.cols) threads *= 2;
  const dim3 grid(static_cast<unsigned>(std::min(p.rows, kMaxBlocks))), block(threads);
  if constexpr (FWD) {
    softmax_fwd_rows_kernel<T, VEC, ITERS, false><<<grid, block, 0, stream>>>(p);
  } else {
    softmax_bwd_rows_kernel<T, VEC, ITERS, false><<<grid, block, 0, stream>>>(p);
  }
  return cudaSuccess;
}

// Shared memory a cached block kernel may use: kCacheBytes, or less where the device's opt-in limit is lower.
inline int64_t cache_limit() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return 48 * 1024;
  }
  return std::min<int64_t>(kCacheBytes, optin - 1024);  // the static reduction scratch needs a little
}

template <typename Kernel>
cudaError_t launch_block(Kernel kernel, int64_t rows, int64_t smem_bytes, cudaStream_t stream, const SoftmaxParams& p) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(std::min(rows, kMaxBlocks))), block(kBlockThreads);
  kernel<<<grid, block, smem_bytes, stream>>>(p);
  return cudaSuccess;
}

// Rows longer than a block's registers hold (and any row under p.kernel = 1) go to the online block kernel,
// cached in shared memory in their dtype when that fits cache_limit() (65536 fp16/bf16 columns forward,
// 32768 backward for y and dy), else read twice.
template <typename T, int VEC, bool FWD>
cudaError_t launch_shape(const SoftmaxParams& p, cudaStream_t stream) {
  if (p.kernel == 0 && p.cols <= kWarpMaxCols) return launch_warp<T, VEC, 1, FWD>(p, stream);
  if (p.kernel == 0 && p.cols <= kRowMaxCols<T, VEC, FWD>) return launch_rows<T, VEC, 1, FWD>(p, stream);
  const int64_t slots = ceil_div(p.cols, int64_t(kBlockThreads) * VEC) * VEC * kBlockThreads;
  const int64_t cache_bytes = slots * int64_t(sizeof(T)) * (FWD ? 1 : 2);
  const bool cache = cache_bytes <= cache_limit();
  if constexpr (FWD) {
    return cache ? launch_block(softmax_fwd_block_kernel<T, VEC, true>, p.rows, cache_bytes, stream, p)
                 : launch_block(softmax_fwd_block_kernel<T, VEC, false>, p.rows, 0, stream, p);
  } else {
    return cache ? launch_block(softmax_bwd_block_kernel<T, VEC, true>, p.rows, cache_bytes, stream, p)
                 : launch_block(softmax_bwd_block_kernel<T, VEC, false>, p.rows, 0, stream, p);
  }
}

// 16-byte accesses need every row start 16-byte aligned: aligned base pointers and row strides that are a
// multiple of the vector width.
template <typename T, bool FWD>
bool vectorised(const SoftmaxParams& p) {
  constexpr int V = kVec16<T>;
  return FWD ? aligned16(p.x) && aligned16(p.out) && p.x_row_stride % V == 0 && p.out_row_stride % V == 0
             : aligned16(p.y) && aligned16(p.dy) && aligned16(p.out) && p.y_row_stride % V == 0 &&
                   p.dy_row_stride % V == 0 && p.out_row_stride % V == 0;
}

template <typename T, bool FWD>
cudaError_t launch(const SoftmaxParams& p, cudaStream_t stream) {
  if (p.kernel != 0 && p.kernel != 1) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  const cudaError_t err =
      vectorised<T, FWD>(p) ? launch_shape<T, kVec16<T>, FWD>(p, stream) : launch_shape<T, 1, FWD>(p, stream);
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename T, bool FWD>
int kernel_choices(const SoftmaxParams& p) {
  const int64_t in_registers =
      vectorised<T, FWD>(p) ? kRowMaxCols<T, kVec16<T>, FWD> : kRowMaxCols<T, 1, FWD>;
  return p.cols > kWarpMaxCols && p.cols <= in_registers ? 2 : 1;
}

}  // namespace

bool softmax_vectorised(const SoftmaxParams& params, bool forward) {
  return GPTFAST_DTYPE_SWITCH(params.dtype, T, [&] {
    return forward ? vectorised<T, true>(params) : vectorised<T, false>(params);
  });
}

int softmax_kernel_choices(const SoftmaxParams& params, bool forward) {
  return GPTFAST_DTYPE_SWITCH(params.dtype, T, [&] {
    return forward ? kernel_choices<T, true>(params) : kernel_choices<T, false>(params);
  });
}

cudaError_t softmax_fwd_launch(const SoftmaxParams& params, cudaStream_t stream) {
  return GPTFAST_DTYPE_SWITCH(params.dtype, T, [&] { return launch<T, true>(params, stream); });
}

cudaError_t softmax_bwd_launch(const SoftmaxParams& params, cudaStream_t stream) {
  return GPTFAST_DTYPE_SWITCH(params.dtype, T, [&] { return launch<T, false>(params, stream); });
}

}  // namespace gptfast::cuda
