// Device helpers shared by the kernel files: fp32 conversions, 16-byte vectors, warp/block reductions, and
// the switch macros that turn a runtime dtype / head dim into a template argument. CUDA headers only.
//
// torch compiles extensions with __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so every half/bf16 conversion here is an explicit intrinsic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace gptfast::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------ fp32 conversions
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ------------------------------------------------------------------------------------ 16-byte vectors
// VEC elements of T loaded or stored as one instruction; alignas makes a 16-byte Vec a single ld/st.v4.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Elements of T in 16 bytes: 4 for fp32, 8 for fp16/bf16.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Loads VEC elements of `row` from column c as floats; elements at or past `cols` read as `fill`. A whole
// vector is one 16-byte load when the caller has checked the alignment (row start and stride), else scalar.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* row, int64_t c, int64_t cols, float (&out)[VEC], float fill) {
  if (c + VEC <= cols) {
    const Vec<T, VEC> pack = *reinterpret_cast<const Vec<T, VEC>*>(row + c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = to_float(pack.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = c + e < cols ? to_float(row[c + e]) : fill;
  }
}

// Stores VEC floats to `row` from column c, converted to T; elements at or past `cols` are not written.
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* row, int64_t c, int64_t cols, const float (&in)[VEC]) {
  if (c + VEC <= cols) {
    Vec<T, VEC> pack;
#pragma unroll
    for (int e = 0; e < VEC; ++e) pack.v[e] = from_float<T>(in[e]);
    *reinterpret_cast<Vec<T, VEC>*>(row + c) = pack;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (c + e < cols) row[c + e] = from_float<T>(in[e]);
    }
  }
}

// Grid sizes are capped and the row loops stride by the grid, so any row count fits gridDim.x.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------ reductions
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, off));
  return x;
}

// Merges the running (max, sum of exp(x - max)) pair (m2, s2) into (m, s). A -inf max means "no element
// yet" and contributes exp(-inf) = 0, so an all -inf row keeps (m, s) = (-inf, 0) without producing NaN.
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

// Adds x to the running (max, sum) pair.
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x == -INFINITY) return;
  if (x > m) {
    s = s * __expf(m - x) + 1.0f;
    m = x;
  } else {
    s += __expf(x - m);
  }
}

__device__ __forceinline__ void warp_online_merge(float& m, float& s) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(kFullMask, m, off);
    const float s2 = __shfl_xor_sync(kFullMask, s, off);
    online_merge(m, s, m2, s2);
  }
}

// Block-wide reductions for blocks of up to 1024 threads (a multiple of 32). Every thread gets the result.
// `scratch` holds 32 floats (64 for the pair); the leading __syncthreads makes back-to-back calls safe.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(x);
}

__device__ __forceinline__ void block_online_merge(float& m, float& s, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  warp_online_merge(m, s);
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = m;
    scratch[kWarpSize + warp] = s;
  }
  __syncthreads();
  m = lane < warps ? scratch[lane] : -INFINITY;
  s = lane < warps ? scratch[kWarpSize + lane] : 0.0f;
  warp_online_merge(m, s);
}

}  // namespace gptfast::cuda

// ------------------------------------------------------------------------------------ switch macros
// DTYPE_SWITCH(dtype, T, ...) runs the body with T = float / __half / __nv_bfloat16.
#define GPTFAST_DTYPE_SWITCH(DTYPE, T, ...)                         \
  [&] {                                                             \
    switch (DTYPE) {                                                \
      case ::gptfast::cuda::DType::kFloat16: {                      \
        using T = __half;                                           \
        return __VA_ARGS__();                                       \
      }                                                             \
      case ::gptfast::cuda::DType::kBFloat16: {                     \
        using T = __nv_bfloat16;                                    \
        return __VA_ARGS__();                                       \
      }                                                             \
      default: {                                                    \
        using T = float;                                            \
        return __VA_ARGS__();                                       \
      }                                                             \
    }                                                               \
  }()

// HALF_SWITCH: the tensor-core kernels take only fp16 and bf16 (the binding refuses fp32).
#define GPTFAST_HALF_SWITCH(DTYPE, T, ...)                          \
  [&] {                                                             \
    if (DTYPE == ::gptfast::cuda::DType::kBFloat16) {               \
      using T = __nv_bfloat16;                                      \
      return __VA_ARGS__();                                         \
    }                                                               \
    using T = __half;                                               \
    return __VA_ARGS__();                                           \
  }()

// HEADDIM_SWITCH(d, D, ...) runs the body with constexpr D = 64 or 128 (the binding refuses others).
#define GPTFAST_HEADDIM_SWITCH(HEAD_DIM, D, ...)                    \
  [&] {                                                             \
    if (HEAD_DIM == 64) {                                           \
      constexpr int D = 64;                                         \
      return __VA_ARGS__();                                         \
    }                                                               \
    constexpr int D = 128;                                          \
    return __VA_ARGS__();                                           \
  }()
