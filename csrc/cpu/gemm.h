// The small fp32 tile products the attention kernel fuses with its softmax: C (+)= A @ B or A^T @ B, all
// row-major.
//
// Why not at::matmul on the tiles: a 64 x 64 x 64 product is ~0.5 MFLOP, and each at::matmul call costs a few
// microseconds of dispatch and allocation (plus an output tensor), so the calls would cost as much as the math
// and would leave the softmax unfused. This register-blocked loop (6 rows x 2 vectors of accumulators, B's
// rows streamed from L1) reaches a good fraction of FMA peak on tiles this size and keeps P in a stack buffer.
// ATen's own building block, at::native::cpublas::brgemm (fp32 through oneDNN), was measured on the 2-core
// machine and is no faster: 6 GFLOP/s at 64 x 64 x 64 and 66 at 128 x 64 x 64 against ~105 for this loop; it
// only pulls ahead on 256 x 512 x 64 tiles (105 against 28), which would hold a 512 KB score tile per task.
#pragma once
#include "vec.h"

namespace gptfast::cpu {

namespace detail {

// Element (r, k) of the left operand: A row-major, or (TA) A^T read out of A stored row-major.
template <bool TA>
inline float a_at(const float* A, int64_t lda, int64_t r, int64_t k) {
  return TA ? A[k * lda + r] : A[r * lda + k];
}

// R rows x NV full vectors of C, kept in registers across the whole K loop.
template <bool TA, int R, int NV>
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
      const Vec a(a_at<TA>(A, lda, r, k));
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v].store(C + r * ldc + v * W);
  }
}

// One row r, `n` < W columns: the ragged edge of a tile (masked loads and stores).
template <bool TA>
inline void gemm_tail(const float* A, int64_t lda, int64_t r, const float* B, int64_t ldb, float* C, int64_t K,
                      int64_t n, bool accumulate) {
  using Vec = Vectorized<float>;
  Vec acc = accumulate ? Vec::loadu(C, n) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(Vec(a_at<TA>(A, lda, r, k)), Vec::loadu(B + k * ldb, n), acc);
  acc.store(C, n);
}

template <bool TA, int R>
inline void gemm_rows(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t N,
                      int64_t K, bool accumulate) {
  constexpr int64_t W = Vectorized<float>::size();
  int64_t c = 0;
  for (; c + 2 * W <= N; c += 2 * W) gemm_tile<TA, R, 2>(A, lda, B + c, ldb, C + c, ldc, K, accumulate);
  for (; c + W <= N; c += W) gemm_tile<TA, R, 1>(A, lda, B + c, ldb, C + c, ldc, K, accumulate);
  if (c < N) {
    for (int r = 0; r < R; ++r) gemm_tail<TA>(A, lda, r, B + c, ldb, C + r * ldc + c, K, N - c, accumulate);
  }
}

template <bool TA>
inline void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N,
                 int64_t K, bool accumulate) {
  // Row block i of the left operand starts at row i of A, or at column i of the stored A for A^T.
  const auto a_rows = [&](int64_t i) { return TA ? A + i : A + i * lda; };
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) gemm_rows<TA, 6>(a_rows(i), lda, B, ldb, C + i * ldc, ldc, N, K, accumulate);
  const float* a = a_rows(i);
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: gemm_rows<TA, 5>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 4: gemm_rows<TA, 4>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 3: gemm_rows<TA, 3>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 2: gemm_rows<TA, 2>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    case 1: gemm_rows<TA, 1>(a, lda, B, ldb, c, ldc, N, K, accumulate); break;
    default: break;
  }
}

}  // namespace detail

// C[M, N] = A[M, K] @ B[K, N] (or += when accumulate), leading dimensions lda, ldb, ldc. Rows go 6 at a time:
// 6 x 2 vectors = 12 accumulators + 2 B vectors + 1 broadcast fit AVX2's 16 registers, and each k step does
// 12 FMAs for 8 loads.
inline void gemm(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t N,
                 int64_t K, bool accumulate) {
  detail::gemm<false>(A, lda, B, ldb, C, ldc, M, N, K, accumulate);
}

// C[M, N] = A^T @ B (or +=) where A is stored row-major as [K, M] with leading dimension lda: the attention
// backward's P^T dO and dS^T Q straight from the P and dS tiles, without a transposed copy. The 6 values of A
// that one k step broadcasts are then adjacent in memory.
inline void gemm_at(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M,
                    int64_t N, int64_t K, bool accumulate) {
  detail::gemm<true>(A, lda, B, ldb, C, ldc, M, N, K, accumulate);
}

}  // namespace gptfast::cpu
