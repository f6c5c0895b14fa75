// Vector helpers shared by the CPU kernels: load/store any input dtype as vectors of its math type (fp32 for
// fp32/fp16/bf16, fp64 for fp64), plus the few reductions the kernels need. at::vec::Vectorized picks its
// width from CPU_CAPABILITY (setup.py compiles these files for AVX2), so no intrinsics appear here.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace gptfast::cpu {

using at::vec::Vectorized;

// fp32 math for fp16/bf16/fp32, fp64 math for fp64 (so float64 gradcheck sees fp64 kernels).
template <typename T>
using acc_t = at::opmath_type<T>;
template <typename T>
using AVec = Vectorized<acc_t<T>>;

template <typename A>
constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// AVec<T>::size() consecutive elements of p, converted to the math type.
template <typename T>
inline AVec<T> load_vec(const T* p) {
  if constexpr (c10::is_reduced_floating_point_v<T>) {
    Vectorized<float> out;
    at::vec::load_to_float<T>(p, out);
    return out;
  } else {
    return AVec<T>::loadu(p);
  }
}

// Stores AVec<T>::size() elements to p in T.
template <typename T>
inline void store_vec(T* p, const AVec<T>& v) {
  if constexpr (c10::is_reduced_floating_point_v<T>) {
    at::vec::convert_from_float<T>(v, v).store(p, Vectorized<float>::size());
  } else {
    v.store(p);
  }
}

// exp to 1 ulp (Sleef, resolved from libtorch_cpu): softmax and attention keep torch's own accuracy.
template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& v) {
  return v.exp();
}

// ATen's polynomial exp (about 1e-6 relative, no table lookups), about twice as fast as Sleef's. Used only for
// cross-entropy's gradient, an exp per element of a 50k-wide row, where torch's own fp32 error (it
// exponentiates a rounded log-softmax) is larger. The LSE keeps the exact exp. fp64 keeps the exact exp.
template <typename A>
inline Vectorized<A> vexp_fast(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

template <typename A>
inline A hmax(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return a + b; }, v);
}

// exp(x - m) that treats m = -inf (nothing seen yet, or a fully masked row) as 0 instead of producing NaN.
template <typename A>
inline A safe_base(A m) {
  return m == neg_inf<A>() ? A(0) : m;
}

}  // namespace gptfast::cpu
