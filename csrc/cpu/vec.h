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

// exp(x) for fp32 in 1 ulp over (-87, 88.7), inlined: about twice as fast as Sleef's exp (an out-of-line call
// that also handles denormal results) and as fast as ATen's exp_u20 (3 ulp, and +inf for NaN). Every kernel
// here exponentiates per element, and the cross-entropy forward and the softmax forward are bound by it.
// Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2 is exact), exp(r) as a degree-7
// polynomial, 2^n put into the exponent bits (as 2^(n-1) * 2, so n = 128 still reaches FLT_MAX). Results
// below 2^-125.5 (x < -86.99, where only denormals are left) come out 0, -inf gives 0, +inf gives +inf and NaN
// stays NaN (the min/max clamp propagates it). fp64 keeps Sleef's exp (float64 gradcheck).
inline Vectorized<float> exp_poly(const Vectorized<float>& x_in) {
  using Vec = Vectorized<float>;
  using IVec = Vectorized<int32_t>;
  const Vec x = at::vec::minimum(at::vec::maximum(x_in, Vec(-87.33654475f)), Vec(89.f));
  const Vec n = (x * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + Vec(1.f));
  const IVec two_n_minus_1 = (at::vec::convert_to_int_of_same_size(n) + IVec(126)) << IVec(23);
  return p * at::vec::cast<float>(two_n_minus_1) * Vec(2.f);
}

template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& v) {
  if constexpr (std::is_same_v<A, float>) {
    return exp_poly(v);
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
