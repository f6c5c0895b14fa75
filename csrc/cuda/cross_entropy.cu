// Cross-entropy forward and backward over the rows of (rows, cols) logits: fp32 math for fp32/fp16/bf16
// logits, fp64 math (and fp64 loss/lse) for fp64 logits.
//
// Forward: one block per row reads the row once, keeping per thread an online (max, sum of exp) pair
// (rescaled once per 16-byte vector) and the plain sum of the logits (for label smoothing); the block merges them and thread 0 reads the target
// logit and writes loss and lse. Backward: a 2-D grid (rows x column chunks) writes
// dlogits = dloss * (p (1 + 2 z lse) - eps / V - (1 - eps) [j == t]) in one pass; it reads each logit
// once and may overwrite it (linear_cross_entropy runs it in place on each chunk's logits).
// Row offsets are 64-bit: rows * cols passes 2^31 for a 128k vocabulary at 16k tokens.
#include <algorithm>

#include "common.cuh"
#include "cross_entropy_params.h"

namespace gptfast::cuda {
namespace {

constexpr int kMaxThreads = 512;           // threads_for() never asks for more; lets ptxas use 128 registers
constexpr int kBwdColChunksPerThread = 4;  // vectors per thread per backward block: enough work per block

__device__ __forceinline__ int64_t read_target(const CrossEntropyParams& p, int64_t row) {
  return p.target_int32 ? int64_t(static_cast<const int32_t*>(p.target)[row])
                        : static_cast<const int64_t*>(p.target)[row];
}

__device__ __forceinline__ bool out_of_range(int64_t t, int64_t cols) { return t < 0 || t >= cols; }

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) cross_entropy_fwd_kernel(const CrossEntropyParams p) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc scratch[2 * kWarpSize];
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    // 1. One read of the row: online (max, sum exp) and sum of logits per thread, one rescale per full
    //    vector; unrolled so that several loads are in flight per thread.
    Acc m = -INFINITY, s = 0, total = 0;
#pragma unroll 4
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.cols; c += int64_t(blockDim.x) * VEC) {
      Acc v[VEC];
      load_vec<T, VEC>(x, c, p.cols, v, Acc(0));
      if (c + VEC <= p.cols) {
        online_add_vec(m, s, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) total += v[e];
      } else {
        for (int e = 0; e < VEC && c + e < p.cols; ++e) {
          online_add(m, s, v[e]);
          total += v[e];
        }
      }
    }
    // 2. Merge over the block.
    block_online_merge(m, s, scratch);
    total = block_sum(total, scratch);
    // 3. lse = m + log(s) and the loss, in double on one thread per row: the combination then adds no
    //    rounding of its own (and --use_fast_math cannot swap in an approximate log).
    if (threadIdx.x == 0) {
      const double lse = static_cast<double>(m) + log(static_cast<double>(s));
      const int64_t t = read_target(p, row);
      double loss = 0.0;
      if (t != p.ignore_index) {
        if (out_of_range(t, p.cols)) {
          loss = NAN;  // the documented contract: a bad target poisons its row instead of a finite loss
        } else {
          loss = lse - convert_in<double>(x[t]);
          if (p.label_smoothing != 0.0) {
            loss = (1.0 - p.label_smoothing) * loss +
                   p.label_smoothing * (lse - static_cast<double>(total) / static_cast<double>(p.cols));
          }
          if (p.z_loss != 0.0) loss += p.z_loss * lse * lse;
        }
      }
      static_cast<Acc*>(p.loss)[row] = static_cast<Acc>(loss);
      static_cast<Acc*>(p.lse)[row] = static_cast<Acc>(lse);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads) cross_entropy_bwd_kernel(const CrossEntropyParams p) {
  using Acc = typename AccOf<T>::type;
  const int64_t col_step = int64_t(gridDim.y) * blockDim.x * VEC;
  const int64_t col_start = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const int64_t vocab = p.vocab > 0 ? p.vocab : p.cols;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* g = static_cast<T*>(p.dlogits) + row * p.dlogits_row_stride;
    const int64_t t = read_target(p, row);
    // 1. Row constants: ignored rows get 0, bad targets NaN, the rest
    //    g_j = coef * exp(x_j - lse) - smooth - hit [j == t].
    const Acc dl = p.dloss ? static_cast<const Acc*>(p.dloss)[row] : Acc(1);
    const Acc lse = static_cast<const Acc*>(p.lse_in)[row];
    const Acc eps = static_cast<Acc>(p.label_smoothing), z = static_cast<Acc>(p.z_loss);
    const bool ignored = t == p.ignore_index;
    const Acc poison = !ignored && out_of_range(t, vocab) ? Acc(NAN) : Acc(0);
    const Acc coef = ignored ? Acc(0) : dl * (Acc(1) + Acc(2) * z * lse);
    const Acc smooth = ignored ? Acc(0) : dl * eps / static_cast<Acc>(vocab);
    const int64_t t_col = t - p.col_offset;  // the target's column in this slice, when it is in it
    const Acc hit = ignored ? Acc(0) : dl * (Acc(1) - eps);
    // 2. One pass over the row's columns (this block's share of them), unrolled so that a thread's loads of
    //    its kBwdColChunksPerThread vectors are in flight together.
#pragma unroll 4
    for (int64_t c = col_start; c < p.cols; c += col_step) {
      Acc v[VEC];
      load_vec<T, VEC>(x, c, p.cols, v, Acc(0));
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const Acc prob = ignored ? Acc(0) : acc_exp(v[e] - lse);
        v[e] = coef * prob - smooth - (c + e == t_col ? hit : Acc(0)) + poison;
      }
      store_vec<T, VEC>(g, c, p.cols, v);
    }
  }
}

int threads_for(int64_t cols) { return cols >= 8192 ? 512 : cols >= 1024 ? 256 : 128; }

template <typename T>
cudaError_t launch_fwd(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  constexpr int V = kVec16<T>;
  const dim3 grid(static_cast<unsigned>(std::min(p.rows, kMaxBlocks))), block(threads_for(p.cols));
  if (aligned16(p.logits) && p.logits_row_stride % V == 0) {
    cross_entropy_fwd_kernel<T, V><<<grid, block, 0, stream>>>(p);
  } else {
    cross_entropy_fwd_kernel<T, 1><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  constexpr int V = kVec16<T>;
  const bool vec = aligned16(p.logits) && aligned16(p.dlogits) && p.logits_row_stride % V == 0 &&
                   p.dlogits_row_stride % V == 0;
  const int threads = threads_for(p.cols);
  const int64_t per_block = int64_t(threads) * (vec ? V : 1) * kBwdColChunksPerThread;
  const int64_t col_blocks = std::min<int64_t>(ceil_div(p.cols, per_block), 65535);
  const dim3 grid(static_cast<unsigned>(std::min(p.rows, kMaxBlocks)), static_cast<unsigned>(col_blocks));
  if (vec) {
    cross_entropy_bwd_kernel<T, V><<<grid, threads, 0, stream>>>(p);
  } else {
    cross_entropy_bwd_kernel<T, 1><<<grid, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_fwd_launch(const CrossEntropyParams& params, cudaStream_t stream) {
  return GPTFAST_DTYPE_WITH_DOUBLE_SWITCH(params.dtype, T, [&] { return launch_fwd<T>(params, stream); });
}

cudaError_t cross_entropy_bwd_launch(const CrossEntropyParams& params, cudaStream_t stream) {
  return GPTFAST_DTYPE_WITH_DOUBLE_SWITCH(params.dtype, T, [&] { return launch_bwd<T>(params, stream); });
}

}  // namespace gptfast::cuda
