// Device helpers shared by the kernel files: conversions to the fp32 (fp64 for fp64 data) accumulator type,
// 16-byte vectors, warp/block reductions, and the switch macros that turn a runtime dtype / head dim into a
// template argument. CUDA headers only.
//
// torch compiles extensions with __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so every half/bf16 conversion here is an explicit intrinsic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

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

// Two floats rounded to T (__half or __nv_bfloat16) and packed as one 32-bit MMA operand, lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&r, &h, sizeof r);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &h, sizeof r);
  }
  return r;
}

// The math type of an element type: fp32 for fp32/fp16/bf16, fp64 for fp64 (cross-entropy only).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename Acc, typename T>
__device__ __forceinline__ Acc convert_in(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<Acc>(x);
  } else {
    return static_cast<Acc>(to_float(x));
  }
}

template <typename T, typename Acc>
__device__ __forceinline__ T convert_out(Acc x) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<double>(x);
  } else {
    return from_float<T>(static_cast<float>(x));
  }
}

__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }

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

// Loads VEC elements of `row` from column c into the math type Acc; elements at or past `cols` read as
// `fill`. A whole vector is one 16-byte load when the caller has checked the alignment (row start and
// stride), else scalar.
template <typename T, int VEC, typename Acc>
__device__ __forceinline__ void load_vec(const T* row, int64_t c, int64_t cols, Acc (&out)[VEC], Acc fill) {
  if (c + VEC <= cols) {
    const Vec<T, VEC> pack = *reinterpret_cast<const Vec<T, VEC>*>(row + c);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = convert_in<Acc>(pack.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = c + e < cols ? convert_in<Acc>(row[c + e]) : fill;
  }
}

// Loads VEC raw elements of `row` from column c (zeros at or past `cols`), kept in T to save registers.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_raw(const T* row, int64_t c, int64_t cols) {
  if (c + VEC <= cols) return *reinterpret_cast<const Vec<T, VEC>*>(row + c);
  Vec<T, VEC> out;
#pragma unroll
  for (int e = 0; e < VEC; ++e) out.v[e] = c + e < cols ? row[c + e] : from_float<T>(0.0f);
  return out;
}

// Elements e and e + 1 of a raw vector as fp32 (one paired conversion for fp16/bf16, e even).
template <typename T, int VEC>
__device__ __forceinline__ float2 raw_pair(const Vec<T, VEC>& r, int e) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half22float2(*reinterpret_cast<const __half2*>(&r.v[e]));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r.v[e]));
  } else {
    return make_float2(to_float(r.v[e]), to_float(r.v[e + 1]));
  }
}

// Stores VEC values to `row` from column c, converted to T; elements at or past `cols` are not written.
template <typename T, int VEC, typename Acc>
__device__ __forceinline__ void store_vec(T* row, int64_t c, int64_t cols, const Acc (&in)[VEC]) {
  if (c + VEC <= cols) {
    Vec<T, VEC> pack;
#pragma unroll
    for (int e = 0; e < VEC; ++e) pack.v[e] = convert_out<T>(in[e]);
    *reinterpret_cast<Vec<T, VEC>*>(row + c) = pack;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (c + e < cols) row[c + e] = convert_out<T>(in[e]);
    }
  }
}

// Grid sizes are capped and the row loops stride by the grid, so any row count fits gridDim.x.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------ reductions
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
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
template <typename Acc>
__device__ __forceinline__ void online_merge(Acc& m, Acc& s, Acc m2, Acc s2) {
  const Acc mn = m > m2 ? m : m2;
  if (mn == -INFINITY) return;
  s = s * acc_exp(m - mn) + s2 * acc_exp(m2 - mn);
  m = mn;
}

// Adds x to the running (max, sum) pair.
template <typename Acc>
__device__ __forceinline__ void online_add(Acc& m, Acc& s, Acc x) {
  if (x == -INFINITY) return;
  if (x > m) {
    s = s * acc_exp(m - x) + Acc(1);
    m = x;
  } else {
    s += acc_exp(x - m);
  }
}

// Adds VEC values to the running (max, sum) pair with one rescale for the vector, not a compare and branch
// per element. A NaN makes the sum NaN through its exp, as with online_add; a +inf max takes online_add's
// element by element path, so +inf rows behave exactly as there.
template <typename Acc, int VEC>
__device__ __forceinline__ void online_add_vec(Acc& m, Acc& s, const Acc (&v)[VEC]) {
  Acc vm = v[0];
#pragma unroll
  for (int e = 1; e < VEC; ++e) vm = vm > v[e] ? vm : v[e];
  const Acc mn = m > vm ? m : vm;
  if (mn == -INFINITY) return;
  if (mn == INFINITY) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) online_add(m, s, v[e]);
    return;
  }
  Acc add = 0;
#pragma unroll
  for (int e = 0; e < VEC; ++e) add += acc_exp(v[e] - mn);
  s = s * acc_exp(m - mn) + add;
  m = mn;
}

template <typename Acc>
__device__ __forceinline__ void warp_online_merge(Acc& m, Acc& s) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) {
    const Acc m2 = __shfl_xor_sync(kFullMask, m, off);
    const Acc s2 = __shfl_xor_sync(kFullMask, s, off);
    online_merge(m, s, m2, s2);
  }
}

// Block-wide reductions for blocks of up to 1024 threads (a multiple of 32). Every thread gets the result.
// `scratch` holds 32 floats (64 for the pair); the leading __syncthreads makes back-to-back calls safe.
// warp_reduce is the warp-level reduction (warp_sum, warp_max), identity its neutral element.
template <typename Acc, typename WarpReduce>
__device__ __forceinline__ Acc block_reduce(Acc x, Acc* scratch, Acc identity, WarpReduce warp_reduce) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  x = warp_reduce(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : identity;
  return warp_reduce(x);
}

template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc x, Acc* scratch) {
  return block_reduce(x, scratch, Acc(0), [](Acc v) { return warp_sum(v); });
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
  return block_reduce(x, scratch, -INFINITY, [](float v) { return warp_max(v); });
}

template <typename Acc>
__device__ __forceinline__ void block_online_merge(Acc& m, Acc& s, Acc* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  warp_online_merge(m, s);
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = m;
    scratch[kWarpSize + warp] = s;
  }
  __syncthreads();
  m = lane < warps ? scratch[lane] : Acc(-INFINITY);
  s = lane < warps ? scratch[kWarpSize + lane] : Acc(0);
  warp_online_merge(m, s);
}

}  // namespace gptfast::cuda

// ------------------------------------------------------------------------------------ switch macros
// WITH_DOUBLE_SWITCH(dtype, T, ...): also T = double (the cross-entropy kernels, which math in fp64 then).
#define GPTFAST_DTYPE_WITH_DOUBLE_SWITCH(DTYPE, T, ...)             \
  [&] {                                                             \
    if (DTYPE == ::gptfast::cuda::DType::kFloat64) {                \
      using T = double;                                             \
      return __VA_ARGS__();                                         \
    }                                                               \
    return GPTFAST_DTYPE_SWITCH(DTYPE, T, __VA_ARGS__);             \
  }()

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
      case ::gptfast::cuda::DType::kFloat32:                        \
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

// HEADDIM_SWITCH(d, D, ...) runs the body with constexpr D = 32, 64, 96 or 128 (the binding refuses others).
#define GPTFAST_HEADDIM_SWITCH(HEAD_DIM, D, ...)                    \
  [&] {                                                             \
    if (HEAD_DIM == 32) {                                           \
      constexpr int D = 32;                                         \
      return __VA_ARGS__();                                         \
    }                                                               \
    if (HEAD_DIM == 64) {                                           \
      constexpr int D = 64;                                         \
      return __VA_ARGS__();                                         \
    }                                                               \
    if (HEAD_DIM == 96) {                                           \
      constexpr int D = 96;                                         \
      return __VA_ARGS__();                                         \
    }                                                               \
    constexpr int D = 128;                                          \
    return __VA_ARGS__();                                           \
  }()
