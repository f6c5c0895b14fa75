// The small fp32 tile products the attention kernel fuses with its softmax: C (+)= A @ B, all row-major.
//
// Why not at::matmul on the tiles: a 64 x 64 x 64 product is ~0.5 MFLOP, and each at::matmul call costs a few
// microseconds of dispatch and allocation (plus an output tensor), so the calls would cost as much as the math
// and would leave the softmax unfused. This register-blocked loop (6 rows x 2 vectors of accumulators, B's
// rows streamed from L1) reaches a good fraction of FMA peak on tiles this size and keeps P in a stack buffer.
#pragma once
#include "vec.h"

namespace gptfast::cpu {

namespace detail {

// R rows x NV full vectors of C, kept in registers across the whole K loop.
template <int R, int NV>
inline void gemm_tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
                      bool accumulate) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Vec::loadu(C + r * ldc + v * W) : Vec(0.f);
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + k * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const Vec a(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v].store(C + r * ldc + v * W);
  }
}

// One row, `n` < W columns: the ragged edge of a tile (masked loads and stores).
inline void gemm_tail(const float* A, const float* B, int64_t ldb, float* C, int64_t K, int64_t n, bool accumulate) {
  using Vec = Vectorized<float>;
  Vec acc = accumulate ? Vec::loadu(C, n) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(Vec(A[k]), Vec::loadu(B + k * ldb, n), acc);
  acc.store(C, n);
}

template <int R>
inline void gemm_rows(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t N,
                      int64_t K, bool accumulate) {
  constexpr int64_t W = Vectorized<float>::size();
  int64_t c = 0;
  for (; c + 2 * W <= N; c += 2 * W) gemm_tile<R, 2>(A, lda, B + c, ldb, C + c, ldc, K, accumulate);
  for (; c + W <= N; c += W) gemm_tile<R, 1>(A, lda, B + c, ldb, C + c, ldc, K, accumulate);
  if (c < N) {
    for (int r = 0; r < R; ++r) gemm_tail(A + r * lda, B + c, ldb, C + r * ldc + c, K, N - c, accumulate);
  }
}

}  // namespace detail

// C[M, N] = A[M, K] @ B[K, N] (or += when accumulate), leading dimensions lda, ldb, ldc. Rows go 6 at a time:
// 6 x 2 vectors = 12 accumulators + 2 B vectors + 1 broadcast fit AVX2's 16 registers, and each k step does
// 12 FMAs for 8 loads.
inline void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N,
                 int64_t K, bool accumulate) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) detail::gemm_rows<6>(A + i * lda, lda, B, ldb, C + i * ldc, ldc, N, K, accumulate);
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: detail::gemm_rows<5>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 4: detail::gemm_rows<4>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 3: detail::gemm_rows<3>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 2: detail::gemm_rows<2>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 1: detail::gemm_rows<1>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    default: break;
  }
}

}  // namespace gptfast::cpu
