// Attention forward (FlashAttention-2 on tensor cores, WMMA) and backward (tiled, fp32 math) for fp16/bf16,
// head dims 64 and 128, GQA, causal (top-left) or not, any sequence lengths. See README.md for the launch
// shapes.
//
// Forward, per block of kBlockM = 64 queries of one (batch, head), 4 warps each owning 16 query rows:
//   for each tile of kBlockN = 64 keys (up to the diagonal when causal):
//     1. S = Q K^T                 (WMMA m16n16k16, fp32 accumulators, stored to shared memory)
//     2. s = scale * S, masked to -inf past the keys' end and above the diagonal;
//        m_new = max(m, rowmax s), p = exp(s - m_new), l = l * exp(m - m_new) + rowsum p
//     3. O = exp(m - m_new) O + P V (WMMA for P V, P rounded to the input dtype as FlashAttention does;
//        the tile's P V goes through shared memory so that each lane can rescale its half row of O,
//        which it keeps in fp32 registers: WMMA does not say which accumulator element is which row)
//   out = O / l, lse = m + log l   (out = 0 and lse = -inf for a row with no key)
//
// Backward, per block of kBwdBlockN = 32 keys of one (batch, kv head), looping over the query heads of its
// group and the query blocks that can see these keys, with delta_i = rowsum(dO_i * O_i) precomputed:
//   p_ij  = exp(scale q_i.k_j - lse_i)            (0 where masked)
//   dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)
//   dV_j += sum_i p_ij dO_i,   dK_j += scale sum_i ds_ij q_i    (registers, no atomics: the block owns j)
//   dQ_i += scale sum_j ds_ij k_j                              (fp32 atomicAdd: many key blocks share i)
#include <mma.h>

#include <algorithm>

#include "attention_params.h"
#include "common.cuh"

namespace gptfast::cuda {
namespace {

using namespace nvcuda;

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kPadHalf = 8;   // row padding of half tiles: keeps WMMA's 32-byte alignment, spreads banks
constexpr int kPadFloat = 4;  // same for fp32 tiles

// Shared-memory layout of the forward kernel, in elements of each tile's type.
template <int D>
struct FwdSmem {
  static constexpr int kQld = D + kPadHalf;        // Q, K, V tiles: T[rows][kQld]
  static constexpr int kSld = kBlockN + kPadFloat;  // scores: float[kBlockM][kSld]
  static constexpr int kPld = kBlockN + kPadHalf;   // probabilities: T[kBlockM][kPld]
  static constexpr int kOld = D + kPadFloat;        // one tile's P V: float[kBlockM][kOld]
  static constexpr int64_t kQBytes = int64_t(kBlockM) * kQld * 2;
  static constexpr int64_t kKBytes = int64_t(kBlockN) * kQld * 2;
  static constexpr int64_t kSBytes = int64_t(kBlockM) * kSld * 4;
  static constexpr int64_t kPBytes = int64_t(kBlockM) * kPld * 2;
  static constexpr int64_t kOBytes = int64_t(kBlockM) * kOld * 4;
  static constexpr int64_t kBytes = kQBytes + 2 * kKBytes + kSBytes + kPBytes + kOBytes;
};

__device__ __forceinline__ int64_t offset(const Strides& s, int64_t b, int64_t h, int64_t row) {
  return b * s.batch + h * s.head + row * s.row;
}

// Copies rows [row0, row0 + ROWS) of a (rows, D) matrix into a shared tile T[ROWS][ld] with 16-byte
// accesses; rows at or past `rows` become zeros, so they add nothing to the products.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(T* tile, int ld, const T* src, int64_t row_stride, int row0, int rows) {
  constexpr int kChunks = D / 8;  // 8 elements of 2 bytes = 16 bytes
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < rows) val = *reinterpret_cast<const uint4*>(src + (row0 + r) * row_stride + c);
    *reinterpret_cast<uint4*>(tile + r * ld + c) = val;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p) {
  using L = FwdSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = reinterpret_cast<T*>(smem + L::kQBytes);
  T* vs = reinterpret_cast<T*>(smem + L::kQBytes + L::kKBytes);
  float* ss = reinterpret_cast<float*>(smem + L::kQBytes + 2 * L::kKBytes);
  T* ps = reinterpret_cast<T*>(smem + L::kQBytes + 2 * L::kKBytes + L::kSBytes);
  float* pvs = reinterpret_cast<float*>(smem + L::kQBytes + 2 * L::kKBytes + L::kSBytes + L::kPBytes);

  // Heaviest causal query blocks (the last ones) start first.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads_q / p.heads_kv);
  const T* q = static_cast<const T*>(p.q) + offset(p.q_strides, b, h, 0);
  const T* k = static_cast<const T*>(p.k) + offset(p.k_strides, b, hk, 0);
  const T* v = static_cast<const T*>(p.v) + offset(p.v_strides, b, hk, 0);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  // Softmax ownership: lane pair (2r, 2r + 1) holds row 16 * warp + r, one half of its columns each.
  const int row = 16 * warp + lane / 2, half = lane % 2;
  const int qi = m0 + row;  // this lane's query index

  load_tile<T, kBlockM, D>(qs, L::kQld, q, p.q_strides.row, m0, p.len_q);
  float m_i = -INFINITY, l_i = 0.0f;
  float o_acc[D / 2];  // this lane's half row of the fp32 output accumulator O
#pragma unroll
  for (int d = 0; d < D / 2; ++d) o_acc[d] = 0.0f;
  __syncthreads();
  // The warp's 16 query rows stay in registers as A fragments for every key tile (4 registers each).
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(qf[kk], qs + 16 * warp * L::kQld + kk * 16, L::kQld);

  const int n_end = p.causal ? min(p.len_k, m0 + kBlockM) : p.len_k;
  for (int n0 = 0; n0 < n_end; n0 += kBlockN) {
    __syncthreads();  // every warp is done with the previous K and V tiles
    load_tile<T, kBlockN, D>(ks, L::kQld, k, p.k_strides.row, n0, p.len_k);
    load_tile<T, kBlockN, D>(vs, L::kQld, v, p.v_strides.row, n0, p.len_k);
    __syncthreads();

    // 1. S = Q K^T for this warp's 16 rows: K^T read as a column-major B operand from K's rows.
#pragma unroll
    for (int nf = 0; nf < kBlockN / 16; ++nf) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(bt, ks + nf * 16 * L::kQld + kk * 16, L::kQld);
        wmma::mma_sync(acc, qf[kk], bt, acc);
      }
      wmma::store_matrix_sync(ss + 16 * warp * L::kSld + nf * 16, acc, L::kSld, wmma::mem_row_major);
    }
    __syncwarp();

    // 2. Online softmax of this lane's half row; masked scores are -inf and give p = 0.
    float* srow = ss + row * L::kSld + half * (kBlockN / 2);
    float tile_max = -INFINITY;
#pragma unroll 8
    for (int c = 0; c < kBlockN / 2; ++c) {
      const int kj = n0 + half * (kBlockN / 2) + c;
      const bool keep = kj < p.len_k && !(p.causal && kj > qi);
      const float s = keep ? srow[c] * p.scale : -INFINITY;
      srow[c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
    const float m_new = fmaxf(m_i, tile_max);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no key yet: exp(-inf - 0) = 0, never NaN
    const float alpha = __expf(m_i - m_use);
    T* prow = ps + row * L::kPld + half * (kBlockN / 2);
    float row_sum = 0.0f;
#pragma unroll 8
    for (int c = 0; c < kBlockN / 2; ++c) {
      const float pv = __expf(srow[c] - m_use);
      prow[c] = from_float<T>(pv);
      row_sum += pv;
    }
    row_sum += __shfl_xor_sync(kFullMask, row_sum, 1);
    l_i = l_i * alpha + row_sum;
    m_i = m_new;
    __syncwarp();

    // 3. This tile's P V for the warp's 16 rows (fresh accumulators, parked in the warp's slice of pvs),
    //    then O = alpha * O + P V by each lane on its half row held in registers.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf[kBlockN / 16];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) wmma::load_matrix_sync(pf[kk], ps + 16 * warp * L::kPld + kk * 16, L::kPld);
#pragma unroll
    for (int df = 0; df < D / 16; ++df) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(bv, vs + kk * 16 * L::kQld + df * 16, L::kQld);
        wmma::mma_sync(acc, pf[kk], bv, acc);
      }
      wmma::store_matrix_sync(pvs + 16 * warp * L::kOld + df * 16, acc, L::kOld, wmma::mem_row_major);
    }
    __syncwarp();
    const float* pvrow = pvs + row * L::kOld + half * (D / 2);
#pragma unroll
    for (int d = 0; d < D / 2; ++d) o_acc[d] = o_acc[d] * alpha + pvrow[d];
    __syncwarp();  // the next tile's stores into pvs wait for these reads
  }

  // 4. out = O / l (16-byte stores), lse = m + log l; a row with no key (l = 0) gives 0 and -inf. A NaN l
  //    (NaN in the scores) keeps lse NaN, so the backward's recomputed P is NaN and not exp(s + inf).
  if (qi < p.len_q) {
    const bool dead = l_i == 0.0f;
    const float inv_l = dead ? 0.0f : 1.0f / l_i;
    T* out = static_cast<T*>(p.out) + offset(p.out_strides, b, h, qi);
#pragma unroll
    for (int d = 0; d < D / 2; d += 8) {
      Vec<T, 8> pack;
#pragma unroll
      for (int e = 0; e < 8; ++e) pack.v[e] = from_float<T>(o_acc[d + e] * inv_l);
      *reinterpret_cast<Vec<T, 8>*>(out + half * (D / 2) + d) = pack;
    }
    if (half == 0) {
      const float lse = dead ? -INFINITY : m_i + static_cast<float>(log(static_cast<double>(l_i)));
      p.lse[(int64_t(b) * p.heads_q + h) * p.len_q + qi] = lse;
    }
  }
}

// ---------------------------------------------------------------------------------------------- backward
constexpr int kBwdBlockN = 32;
constexpr int kBwdBlockM = 32;
constexpr int kBwdThreads = 256;

// Shared-memory layout of the backward kernel, fp32 tiles with one float of padding per row so that a
// warp reading a column of K (or V) hits 32 different banks.
template <int D>
struct BwdSmem {
  static constexpr int kLd = D + 1;
  static constexpr int kPld = kBwdBlockN + 1;
  static constexpr int64_t kFloats =
      2 * int64_t(kBwdBlockN) * kLd + 2 * int64_t(kBwdBlockM) * kLd + 2 * int64_t(kBwdBlockM) * kPld + 2 * kBwdBlockM;
  static constexpr int64_t kBytes = kFloats * 4;
};

// Rows [row0, row0 + ROWS) of a (rows, D) matrix of T into an fp32 tile float[ROWS][ld], zeros past `rows`.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile_f32(float* tile, int ld, const T* src, int64_t row_stride, int row0,
                                              int rows) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    Vec<T, 8> pack;
    if (row0 + r < rows) {
      pack = *reinterpret_cast<const Vec<T, 8>*>(src + (row0 + r) * row_stride + c);
#pragma unroll
      for (int e = 0; e < 8; ++e) tile[r * ld + c + e] = to_float(pack.v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) tile[r * ld + c + e] = 0.0f;
    }
  }
}

// delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d]: one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const AttentionParams p) {
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.len_q;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * kWarps;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; r < rows; r += stride) {
    const int64_t i = r % p.len_q, bh = r / p.len_q;
    const int64_t h = bh % p.heads_q, b = bh / p.heads_q;
    const T* o = static_cast<const T*>(p.out) + offset(p.out_strides, b, h, i);
    const T* g = static_cast<const T*>(p.dout) + offset(p.dout_strides, b, h, i);
    float acc = 0.0f;
    for (int d = lane; d < D; d += kWarpSize) acc += to_float(o[d]) * to_float(g[d]);
    acc = warp_sum(acc);
    if (lane == 0) p.delta[r] = acc;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kBwdThreads) attention_bwd_kernel(const AttentionParams p) {
  using L = BwdSmem<D>;
  constexpr int kPerThread = kBwdBlockN * D / kBwdThreads;  // dK, dV entries each thread accumulates
  extern __shared__ __align__(128) unsigned char smem[];
  float* kt = reinterpret_cast<float*>(smem);
  float* vt = kt + kBwdBlockN * L::kLd;
  float* qt = vt + kBwdBlockN * L::kLd;
  float* dot = qt + kBwdBlockM * L::kLd;
  float* pt = dot + kBwdBlockM * L::kLd;
  float* dst = pt + kBwdBlockM * L::kPld;
  float* lse_t = dst + kBwdBlockM * L::kPld;
  float* delta_t = lse_t + kBwdBlockM;

  const int n0 = blockIdx.x * kBwdBlockN;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int tid = threadIdx.x;

  load_tile_f32<T, kBwdBlockN, D>(kt, L::kLd, static_cast<const T*>(p.k) + offset(p.k_strides, b, hk, 0),
                                  p.k_strides.row, n0, p.len_k);
  load_tile_f32<T, kBwdBlockN, D>(vt, L::kLd, static_cast<const T*>(p.v) + offset(p.v_strides, b, hk, 0),
                                  p.v_strides.row, n0, p.len_k);
  float dk_acc[kPerThread], dv_acc[kPerThread];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) dk_acc[e] = dv_acc[e] = 0.0f;

  // Causal: query i sees key j only when i >= j, so query blocks before the one holding n0 see nothing.
  const int m_start = p.causal ? (n0 / kBwdBlockM) * kBwdBlockM : 0;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const T* q = static_cast<const T*>(p.q) + offset(p.q_strides, b, h, 0);
    const T* dout = static_cast<const T*>(p.dout) + offset(p.dout_strides, b, h, 0);
    const int64_t bh_row = (int64_t(b) * p.heads_q + h) * p.len_q;
    for (int m0 = m_start; m0 < p.len_q; m0 += kBwdBlockM) {
      __syncthreads();  // the previous query block's tiles are no longer read
      load_tile_f32<T, kBwdBlockM, D>(qt, L::kLd, q, p.q_strides.row, m0, p.len_q);
      load_tile_f32<T, kBwdBlockM, D>(dot, L::kLd, dout, p.dout_strides.row, m0, p.len_q);
      if (tid < kBwdBlockM) {
        const bool in = m0 + tid < p.len_q;
        lse_t[tid] = in ? p.lse[bh_row + m0 + tid] : 0.0f;
        delta_t[tid] = in ? p.delta[bh_row + m0 + tid] : 0.0f;
      }
      __syncthreads();

      // 1. p_ij and ds_ij for the 32 x 32 tile.
      for (int idx = tid; idx < kBwdBlockM * kBwdBlockN; idx += kBwdThreads) {
        const int mi = idx / kBwdBlockN, nj = idx % kBwdBlockN;
        const int i = m0 + mi, j = n0 + nj;
        const bool keep = i < p.len_q && j < p.len_k && !(p.causal && j > i);
        float s = 0.0f, dp = 0.0f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) {
          s += qt[mi * L::kLd + d] * kt[nj * L::kLd + d];
          dp += dot[mi * L::kLd + d] * vt[nj * L::kLd + d];
        }
        const float pij = keep ? __expf(s * p.scale - lse_t[mi]) : 0.0f;
        pt[mi * L::kPld + nj] = pij;
        dst[mi * L::kPld + nj] = pij * (dp - delta_t[mi]);
      }
      __syncthreads();

      // 2. dV_j += sum_i p_ij dO_i and dK_j += sum_i ds_ij q_i (scale applied once at the end).
#pragma unroll
      for (int e = 0; e < kPerThread; ++e) {
        const int idx = tid + e * kBwdThreads;
        const int nj = idx / D, d = idx % D;
        float dv = 0.0f, dk = 0.0f;
#pragma unroll 8
        for (int mi = 0; mi < kBwdBlockM; ++mi) {
          dv += pt[mi * L::kPld + nj] * dot[mi * L::kLd + d];
          dk += dst[mi * L::kPld + nj] * qt[mi * L::kLd + d];
        }
        dv_acc[e] += dv;
        dk_acc[e] += dk;
      }

      // 3. dQ_i += scale sum_j ds_ij k_j, added to the fp32 accumulator shared with other key blocks.
      for (int idx = tid; idx < kBwdBlockM * D; idx += kBwdThreads) {
        const int mi = idx / D, d = idx % D;
        if (m0 + mi >= p.len_q) continue;
        float acc = 0.0f;
#pragma unroll 8
        for (int nj = 0; nj < kBwdBlockN; ++nj) acc += dst[mi * L::kPld + nj] * kt[nj * L::kLd + d];
        atomicAdd(p.dq_accum + (bh_row + m0 + mi) * D + d, acc * p.scale);
      }
    }
  }

  // 4. This block owns keys [n0, n0 + 32) of kv head hk: write dK = scale * sum ds q and dV.
  const int64_t kv_row = (int64_t(b) * p.heads_kv + hk) * p.len_k;
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int idx = tid + e * kBwdThreads;
    const int nj = idx / D, d = idx % D;
    if (n0 + nj < p.len_k) {
      static_cast<T*>(p.dk)[(kv_row + n0 + nj) * D + d] = from_float<T>(dk_acc[e] * p.scale);
      static_cast<T*>(p.dv)[(kv_row + n0 + nj) * D + d] = from_float<T>(dv_acc[e]);
    }
  }
}

template <typename T, int D>
cudaError_t launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  constexpr int64_t kSmem = FwdSmem<D>::kBytes;
  cudaError_t err = cudaFuncSetAttribute(attention_fwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.len_q, kBlockM)), p.heads_q, p.batch);
  attention_fwd_kernel<T, D><<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_bwd(const AttentionParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.len_q;
  if (rows > 0) {
    const dim3 grid(static_cast<unsigned>(std::min(ceil_div(rows, kWarps), kMaxBlocks)));
    attention_bwd_delta_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.len_k == 0) return cudaSuccess;
  constexpr int64_t kSmem = BwdSmem<D>::kBytes;
  cudaError_t err = cudaFuncSetAttribute(attention_bwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.len_k, kBwdBlockN)), p.heads_kv, p.batch);
  attention_bwd_kernel<T, D><<<grid, kBwdThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int64_t attention_fwd_smem_bytes(int head_dim) {
  return head_dim == 64 ? FwdSmem<64>::kBytes : FwdSmem<128>::kBytes;
}

int64_t attention_bwd_smem_bytes(int head_dim) {
  return head_dim == 64 ? BwdSmem<64>::kBytes : BwdSmem<128>::kBytes;
}

cudaError_t attention_fwd_launch(const AttentionParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.heads_q == 0 || params.len_q == 0) return cudaSuccess;
  return GPTFAST_HALF_SWITCH(params.dtype, T, [&] {
    return GPTFAST_HEADDIM_SWITCH(params.head_dim, D, [&] { return launch_fwd<T, D>(params, stream); });
  });
}

cudaError_t attention_bwd_launch(const AttentionParams& params, cudaStream_t stream) {
  // With no query (L = 0 or Hq = 0) the backward kernel still runs: it writes dK = dV = 0.
  if (params.batch == 0 || params.heads_kv == 0) return cudaSuccess;
  return GPTFAST_HALF_SWITCH(params.dtype, T, [&] {
    return GPTFAST_HEADDIM_SWITCH(params.head_dim, D, [&] { return launch_bwd<T, D>(params, stream); });
  });
}

}  // namespace gptfast::cuda
