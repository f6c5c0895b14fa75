// The small fp32 tile products the attention kernel fuses with its softmax: C (+)= A @ B, all row-major.
//
// Why not at::matmul on the tiles: a 64 x 64 x 64 product is ~0.5 MFLOP, and each at::matmul call costs a few
// microseconds of dispatch and allocation (plus an output tensor), so the calls would cost as much as the math
// and would leave the softmax unfused. This register-blocked loop (4 rows x 2 vectors of accumulators, B's
// rows streamed from L1) reaches a good fraction of FMA peak on tiles this size and keeps P in a stack buffer.
#pragma once
#include "vec.h"

namespace gptfast::cpu {

namespace detail {

// R rows x NV vectors of C; the last vector holds `last` lanes (a tail when last < W).
template <int R, int NV>
inline void gemm_tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
                      int64_t last, bool accumulate) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  auto lanes = [&](int v) { return v == NV - 1 ? last : W; };
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? Vec::loadu(C + r * ldc + v * W, lanes(v)) : Vec(0.f);
    }
  }
  const bool full = last == W;
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = full ? Vec::loadu(b + v * W) : Vec::loadu(b + v * W, lanes(v));
    for (int r = 0; r < R; ++r) {
      const Vec a(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v].store(C + r * ldc + v * W, lanes(v));
  }
}

template <int R>
inline void gemm_rows(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t N,
                      int64_t K, bool accumulate) {
  constexpr int64_t W = Vectorized<float>::size();
  for (int64_t c = 0; c < N; c += 2 * W) {
    const int64_t cols = std::min(2 * W, N - c);
    if (cols > W) {
      gemm_tile<R, 2>(A, lda, B + c, ldb, C + c, ldc, K, cols - W, accumulate);
    } else {
      gemm_tile<R, 1>(A, lda, B + c, ldb, C + c, ldc, K, cols, accumulate);
    }
  }
}

}  // namespace detail

// C[M, N] = A[M, K] @ B[K, N] (or += when accumulate), leading dimensions lda, ldb, ldc.
inline void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N,
                 int64_t K, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) detail::gemm_rows<4>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, N, K, accumulate);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 3: detail::gemm_rows<3>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 2: detail::gemm_rows<2>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 1: detail::gemm_rows<1>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    default: break;
  }
}

}  // namespace gptfast::cpu
