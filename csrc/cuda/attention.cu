// Attention forward (FlashAttention-2 on tensor cores: mma.sync m16n8k16 with ldmatrix and cp.async) and
// backward (the same on tensor cores) for fp16/bf16, head dims 32, 64, 96 and 128, GQA, causal (top-left) or
// not, any sequence lengths. See README.md for the launch shapes.
//
// Forward, per block of kBlockM queries of one (batch, head), 4 warps each owning kBlockM / 4 query rows (by
// default two 16-row MMA tiles, so every K and V fragment read from shared memory feeds two MMAs); the
// tilings (kBlockM x kBlockN) are listed in kFwdTilings:
//   for each tile of kBlockN keys (up to the diagonal when causal):
//     1. S = Q K^T in fp32 registers (the C fragments), Q and K read from shared memory by ldmatrix
//     2. s = S * scale * log2(e), masked to -inf past the keys' end and above the diagonal (only on the
//        tiles that need it); per row: m_new = max(m, rowmax s), p = 2^(s - m_new),
//        l = l 2^(m - m_new) + rowsum p, O = 2^(m - m_new) O. A row's scores of a tile sit in the 4 lanes
//        of a quad, so its max is two shuffles; l stays a per-lane partial sum until the end.
//     3. O += P V: P is rounded to the input dtype (as FlashAttention does) and reused from the S
//        registers as A fragments (the C layout of two 8-key blocks is the A layout of one 16-key step);
//        V is read by ldmatrix.trans.
//   The copies overlap the math: V of tile j loads during step 1, K of tile j + 1 during steps 2 and 3.
//   out = O / l, lse = m ln 2 + log l   (out = 0 and lse = -inf for a row with no key)
//
// Backward (FlashAttention-2's), per block of 64 keys of one (batch, kv head), 4 warps each owning 16 keys,
// looping over the query heads of its GQA group and the steps of kBlockM queries that can see these keys,
// with delta_i = rowsum(dO_i * O_i) precomputed by a small kernel:
//   1. S^T = K Q^T                                   (keys are the MMA rows, so steps 2-5 stay in registers)
//   2. p_ji = 2^(scale log2(e) s_ji - log2(e) lse_i)  (0 where masked)
//   3. dV_j += sum_i p_ji dO_i                        (P^T reused from the C fragments as A fragments)
//   4. dp_ji = v_j . dO_i,  ds_ji = p_ji (dp_ji - delta_i)
//   5. dK_j += sum_i ds_ji q_i                        (dK, dV in registers, no atomics: the block owns j;
//                                                      scale applied once at the end)
//   6. dQ_i += scale sum_j ds_ji k_j                   (dS^T through shared memory, read back transposed by
//                                                      ldmatrix.trans; fp32 atomicAdd: key blocks share i)
// P and dS are rounded to the input dtype before their MMAs, as FlashAttention does.
#include <algorithm>

#include "attention_params.h"
#include "common.cuh"
#include "mma.cuh"

namespace gptfast::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Forward tilings: (16-row MMA tiles per warp, keys per tile), the default first, for head dims up to 64 and
// above. Which is fastest depends on the GPU and on how many blocks a shape launches, so the binding times
// them once per shape bucket (attention_binding.cpp, binding_utils.h). The defaults are the tilings that
// ptxas fits in 255 registers without spilling: above head dim 64, 32 keys keep S (32 rows x 32 keys) and O
// (32 x D) in registers; 64 keys there (FlashAttention-2's 128 x 64 on sm_90) take all 255 and, at head dim
// 128, spill a few loop-invariant values and row sums (68 bytes a thread), but halve the barriers per key;
// one MMA tile per warp (64 x 64) halves the registers for O, so more blocks fit on an SM, at twice the
// shared-memory reads per MMA.
struct FwdShape {
  int m_tiles;
  int block_n;
};
constexpr FwdShape kFwdTilings[2][kAttentionFwdMaxTilings] = {{{2, 64}, {1, 64}, {0, 0}},
                                                              {{2, 32}, {2, 64}, {1, 64}}};
constexpr int fwd_tiling_count(int head_dim) { return head_dim > 64 ? 3 : 2; }
constexpr int64_t fwd_smem_bytes(int block_m, int block_n, int head_dim) {
  return int64_t(block_m + 2 * block_n) * (head_dim + 8) * 2;
}

// Rows of the Q, K and V tiles are padded by 8 elements (16 bytes): the eight 16-byte rows one ldmatrix
// phase reads then start 4 banks apart and never conflict.
template <int D, int I>
struct FwdTile {
  static constexpr int kMTiles = kFwdTilings[D > 64][I].m_tiles;  // 16-row MMA tiles per warp
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kWarps;
  static constexpr int kBlockN = kFwdTilings[D > 64][I].block_n;
  static constexpr int kLd = D + 8;
  static constexpr int64_t kBytes = fwd_smem_bytes(kBlockM, kBlockN, D);
  // One MMA tile per warp fits unspilled in the registers of three blocks (12 warps) per SM above head dim
  // 64 (168 a thread, where ptxas would take 181: two blocks) and of four up to 64 (128 a thread).
  static constexpr int kMinBlocks = kMTiles == 1 ? (D > 64 ? 3 : 4) : 1;
  static_assert(kMTiles > 0 && kBlockN > 0, "no such tiling");
};

__device__ __forceinline__ int64_t offset(const Strides& s, int64_t b, int64_t h, int64_t row) {
  return b * s.batch + h * s.head + row * s.row;
}

// Starts copying rows [row0, row0 + ROWS) of a (rows, D) matrix into tile[ROWS][ld], 16 bytes per cp.async;
// rows at or past `rows` become zeros, so they add nothing to the products (and no NaN from garbage).
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, int ld, const T* src, int64_t row_stride, int row0,
                                                int rows) {
  constexpr int kChunks = D / 8;  // 8 elements of 2 bytes = 16 bytes
  static_assert(ROWS * kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int it = 0; it < ROWS * kChunks / kThreads; ++it) {
    const int idx = it * kThreads + static_cast<int>(threadIdx.x);
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool in = row0 + r < rows;
    cp_async_16(tile + r * ld + c, in ? src + int64_t(row0 + r) * row_stride + c : src, in);
  }
}

// Warp-level tile products on the m16n8k16 fragments (see mma.cuh) for MT 16-row tiles of C per warp; each
// B fragment is loaded once and feeds all MT tiles.
//
// acc[mt][nb] = A B^T over K = 16 KSTEPS: row r of A's tile mt at a_lane + (16 mt + r) LD, row n of B at
// b_lane + n LD, where a_lane and b_lane are this lane's ldmatrix addresses for a plain A load and a plain
// load of two 8-row blocks of B.
template <typename T, int MT, int NB, int KSTEPS, int LD>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[MT][NB][4], const T* a_lane, const T* b_lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) acc[mt][nb][0] = acc[mt][nb][1] = acc[mt][nb][2] = acc[mt][nb][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], a_lane + mt * 16 * LD + kk * 16);
#pragma unroll
    for (int nb = 0; nb < NB; nb += 2) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b_lane + nb * 8 * LD + kk * 16);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][nb], a[mt], bf[0], bf[1]);
        mma_16816<T>(acc[mt][nb + 1], a[mt], bf[2], bf[3]);
      }
    }
  }
}

// acc[mt][db] += P B over K = 8 KB, with P given as C fragments p[mt][kb] (rounded to T here: the C layout of
// two 8-column blocks is the A layout of one 16-deep step) and row k of B at b_lane + k LD, read by
// ldmatrix.trans two 8-column blocks at a time.
template <typename T, int MT, int KB, int DB, int LD>
__device__ __forceinline__ void warp_mma_pb(float (&acc)[MT][DB][4], const float (&pc)[MT][KB][4], const T* b_lane) {
#pragma unroll
  for (int kk = 0; kk < KB / 2; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = pack2<T>(pc[mt][2 * kk][0], pc[mt][2 * kk][1]);
      a[mt][1] = pack2<T>(pc[mt][2 * kk][2], pc[mt][2 * kk][3]);
      a[mt][2] = pack2<T>(pc[mt][2 * kk + 1][0], pc[mt][2 * kk + 1][1]);
      a[mt][3] = pack2<T>(pc[mt][2 * kk + 1][2], pc[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int db = 0; db < DB; db += 2) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b_lane + kk * 16 * LD + db * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][db], a[mt], bf[0], bf[1]);
        mma_16816<T>(acc[mt][db + 1], a[mt], bf[2], bf[3]);
      }
    }
  }
}

template <typename T, int D, int I>
__global__ void __launch_bounds__(kThreads, FwdTile<D, I>::kMinBlocks)
    attention_fwd_kernel(const AttentionParams p) {
  using F = FwdTile<D, I>;
  constexpr int kMT = F::kMTiles, kBlockM = F::kBlockM, kBlockN = F::kBlockN, kLd = F::kLd;
  constexpr int kNB = kBlockN / 8;  // 8-key column blocks of S
  constexpr int kDB = D / 8;        // 8-wide column blocks of O
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = qs + kBlockM * kLd;
  T* vs = ks + kBlockN * kLd;

  // Heaviest causal query blocks (the last ones) start first.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads_q / p.heads_kv);
  const T* q = static_cast<const T*>(p.q) + offset(p.q_strides, b, h, 0);
  const T* k = static_cast<const T*>(p.k) + offset(p.k_strides, b, hk, 0);
  const T* v = static_cast<const T*>(p.v) + offset(p.v_strides, b, hk, 0);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;  // this lane's rows g, g + 8 and columns 2t, 2t + 1 of each C tile
  const int warp_row0 = warp * F::kWarpRows;
  // ldmatrix row addresses of this lane (see mma.cuh): A tiles of Q, B tiles of K (two 8-key blocks at
  // once) and of V (transposed; two 8-wide column blocks at once).
  const T* q_lane = qs + (warp_row0 + lane % 16) * kLd + (lane / 16) * 8;
  const T* k_lane = ks + (lane % 8 + (lane / 16) * 8) * kLd + ((lane / 8) % 2) * 8;
  const T* v_lane = vs + (lane % 8 + ((lane / 8) % 2) * 8) * kLd + (lane / 16) * 8;

  const int n_end = p.causal ? min(p.len_k, m0 + kBlockM) : p.len_k;
  load_tile_async<kBlockM, D>(qs, kLd, q, p.q_strides.row, m0, p.len_q);
  if (n_end > 0) load_tile_async<kBlockN, D>(ks, kLd, k, p.k_strides.row, 0, p.len_k);
  cp_async_commit();

  float o[kMT][kDB][4];
  float m_i[kMT][2], l_i[kMT][2];  // per row (g, g + 8 of each tile): running max (log2 units), partial sum
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int db = 0; db < kDB; ++db) o[mt][db][0] = o[mt][db][1] = o[mt][db][2] = o[mt][db][3] = 0.0f;
    m_i[mt][0] = m_i[mt][1] = -INFINITY;
    l_i[mt][0] = l_i[mt][1] = 0.0f;
  }
  const float scale_log2 = p.scale * kLog2e;

  for (int n0 = 0; n0 < n_end; n0 += kBlockN) {
    cp_async_wait<0>();
    __syncthreads();  // K tile n0 is in for every thread, and every warp is done with the previous V tile
    load_tile_async<kBlockN, D>(vs, kLd, v, p.v_strides.row, n0, p.len_k);
    cp_async_commit();

    // 1. S = Q K^T for this warp's kWarpRows rows.
    float s[kMT][kNB][4];
    warp_mma_abt<T, kMT, kNB, D / 16, kLd>(s, q_lane, k_lane);

    // 2. Scaled, masked scores and the online softmax. Only the key tile crossing len_k and the tiles on
    //    the causal diagonal mask anything.
    const bool masked = n0 + kBlockN > p.len_k || (p.causal && n0 + kBlockN - 1 > m0);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int qi = m0 + warp_row0 + mt * 16 + g + hr * 8;
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = s[mt][nb][2 * hr + e] * scale_log2;
            if (masked) {
              const int kj = n0 + nb * 8 + 2 * t + e;
              if (kj >= p.len_k || (p.causal && kj > qi)) x = -INFINITY;
            }
            s[mt][nb][2 * hr + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        const float m_new = fmaxf(m_i[mt][hr], mx);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no key yet: 2^(-inf - 0) = 0, never NaN
        const float alpha = exp2f(m_i[mt][hr] - m_use);
        float row_sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = exp2f(s[mt][nb][2 * hr + e] - m_use);
            s[mt][nb][2 * hr + e] = pv;
            row_sum += pv;
          }
        }
        l_i[mt][hr] = l_i[mt][hr] * alpha + row_sum;
        m_i[mt][hr] = m_new;
#pragma unroll
        for (int db = 0; db < kDB; ++db) {
          o[mt][db][2 * hr] *= alpha;
          o[mt][db][2 * hr + 1] *= alpha;
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V tile n0 is in, and every warp is done with K tile n0
    if (n0 + kBlockN < n_end) {
      load_tile_async<kBlockN, D>(ks, kLd, k, p.k_strides.row, n0 + kBlockN, p.len_k);
      cp_async_commit();
    }

    // 3. O += P V.
    warp_mma_pb<T, kMT, kNB, kDB, kLd>(o, s, v_lane);
  }
  cp_async_wait<0>();  // with no key tile, the Q copy is still owed

  // 4. out = O / l, lse = m ln 2 + log l; a row with no key (l = 0) gives 0 and -inf. A NaN l (NaN in the
  //    scores) keeps lse NaN, so the backward's recomputed P is NaN and not exp(s + inf).
  T* out = static_cast<T*>(p.out) + offset(p.out_strides, b, h, 0);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = l_i[mt][hr];
      l += __shfl_xor_sync(kFullMask, l, 1);
      l += __shfl_xor_sync(kFullMask, l, 2);
      const int qi = m0 + warp_row0 + mt * 16 + g + hr * 8;
      if (qi >= p.len_q) continue;
      const bool dead = l == 0.0f;
      const float inv_l = dead ? 0.0f : 1.0f / l;
      T* row = out + int64_t(qi) * p.out_strides.row + 2 * t;
#pragma unroll
      for (int db = 0; db < kDB; ++db) {
        const uint32_t pair = pack2<T>(o[mt][db][2 * hr] * inv_l, o[mt][db][2 * hr + 1] * inv_l);
        *reinterpret_cast<uint32_t*>(row + db * 8) = pair;
      }
      if (t == 0) {
        const float lse = dead ? -INFINITY : m_i[mt][hr] * kLn2 + static_cast<float>(log(static_cast<double>(l)));
        p.lse[(int64_t(b) * p.heads_q + h) * p.len_q + qi] = lse;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------- backward
// Backward tiles: kBlockN = 64 keys per block, 16 per warp; kBlockM query rows per step. Q, dO, K, V and dS
// rows are padded by 8 elements, as in the forward, for conflict-free ldmatrix.
template <int D>
struct BwdTile {
  static constexpr int kBlockN = 16 * kWarps;
  // 32 query rows above head dim 64 keep dK, dV (16 keys x D each), S^T and dS^T in registers unspilled.
  static constexpr int kBlockM = D > 64 ? 32 : 64;
  // The dQ step: warp w takes query rows 16 (w % kQTiles) + [0, 16) and column part w / kQTiles of D.
  static constexpr int kQTiles = kBlockM / 16;
  static constexpr int kDParts = kWarps / kQTiles;
  static constexpr int kLd = D + 8;
  static constexpr int kDsLd = kBlockM + 8;
  static constexpr int64_t kBytes =
      (int64_t(2 * kBlockN + 2 * kBlockM) * kLd + int64_t(kBlockN) * kDsLd) * 2 + 2 * kBlockM * 4;
};

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
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(const AttentionParams p) {
  using F = BwdTile<D>;
  constexpr int kBlockN = F::kBlockN, kBlockM = F::kBlockM, kLd = F::kLd, kDsLd = F::kDsLd;
  constexpr int kMB = kBlockM / 8;  // 8-query column blocks of S^T
  constexpr int kDB = D / 8;        // 8-wide column blocks of dK, dV
  extern __shared__ __align__(128) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + kBlockN * kLd;
  T* qs = vs + kBlockN * kLd;
  T* dos = qs + kBlockM * kLd;
  T* dss = dos + kBlockM * kLd;  // dS^T of the step, [key][query]
  float* lse_s = reinterpret_cast<float*>(dss + kBlockN * kDsLd);  // lse * log2(e)
  float* delta_s = lse_s + kBlockM;

  const int n0 = blockIdx.x * kBlockN;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int key0 = n0 + 16 * warp;  // this warp's 16 keys; its lane holds rows key0 + g and key0 + g + 8
  const float scale_log2 = p.scale * kLog2e;

  // ldmatrix row addresses of this lane (see mma.cuh).
  const T* k_a = ks + (16 * warp + lane % 16) * kLd + (lane / 16) * 8;   // K rows as A (S^T = K Q^T)
  const T* v_a = vs + (16 * warp + lane % 16) * kLd + (lane / 16) * 8;   // V rows as A (dP^T = V dO^T)
  const int b_row = lane % 8 + (lane / 16) * 8, b_col = ((lane / 8) % 2) * 8;
  const T* q_b = qs + b_row * kLd + b_col;                               // Q^T, dO^T as B
  const T* do_b = dos + b_row * kLd + b_col;
  const int t_row = lane % 8 + ((lane / 8) % 2) * 8, t_col = (lane / 16) * 8;
  const T* q_bt = qs + t_row * kLd + t_col;                              // Q, dO as B (.trans)
  const T* do_bt = dos + t_row * kLd + t_col;
  const T* k_bt = ks + t_row * kLd + t_col;                              // K as B of dQ = dS K (.trans)
  const int q_tile = warp % F::kQTiles, d_lo = (warp / F::kQTiles) * (D / F::kDParts);
  const T* ds_at = dss + (lane % 8 + (lane / 16) * 8) * kDsLd + 16 * q_tile + ((lane / 8) % 2) * 8;  // dS as A

  const T* kg = static_cast<const T*>(p.k) + offset(p.k_strides, b, hk, 0);
  const T* vg = static_cast<const T*>(p.v) + offset(p.v_strides, b, hk, 0);
  load_tile_async<kBlockN, D>(ks, kLd, kg, p.k_strides.row, n0, p.len_k);
  load_tile_async<kBlockN, D>(vs, kLd, vg, p.v_strides.row, n0, p.len_k);
  cp_async_commit();

  float dk[1][kDB][4], dv[1][kDB][4];  // one 16-key tile per warp
#pragma unroll
  for (int db = 0; db < kDB; ++db)
#pragma unroll
    for (int j = 0; j < 4; ++j) dk[0][db][j] = dv[0][db][j] = 0.0f;

  // Causal: query i sees key j only when i >= j, so query blocks before the one holding n0 see nothing.
  const int m_start = p.causal ? (n0 / kBlockM) * kBlockM : 0;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const T* qg = static_cast<const T*>(p.q) + offset(p.q_strides, b, h, 0);
    const T* dog = static_cast<const T*>(p.dout) + offset(p.dout_strides, b, h, 0);
    const int64_t bh_row = (int64_t(b) * p.heads_q + h) * p.len_q;
    for (int m0 = m_start; m0 < p.len_q; m0 += kBlockM) {
      // Not needed for correctness (the previous step last read Q, dO, lse and delta before its dS barrier, and
      // the dS tile its step 6 reads is rewritten only after the barrier below), but without it ptxas overlaps
      // the steps and spills at head dim 128.
      __syncthreads();
      load_tile_async<kBlockM, D>(qs, kLd, qg, p.q_strides.row, m0, p.len_q);
      load_tile_async<kBlockM, D>(dos, kLd, dog, p.dout_strides.row, m0, p.len_q);
      cp_async_commit();
      if (tid < kBlockM) {
        const bool in = m0 + tid < p.len_q;
        lse_s[tid] = in ? p.lse[bh_row + m0 + tid] * kLog2e : 0.0f;
        delta_s[tid] = in ? p.delta[bh_row + m0 + tid] : 0.0f;
      }
      cp_async_wait<0>();
      __syncthreads();  // this step's tiles are in, and every warp is done with the previous step's dS

      // 1. S^T = K Q^T for this warp's 16 keys (rows) and the step's queries (columns).
      float st[1][kMB][4];
      warp_mma_abt<T, 1, kMB, D / 16, kLd>(st, k_a, q_b);

      // 2. P^T = 2^(S^T scale log2(e) - lse log2(e)), 0 where masked (and for query rows past len_q).
      const bool masked = m0 + kBlockM > p.len_q || n0 + kBlockN > p.len_k || (p.causal && n0 + kBlockN - 1 > m0);
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int mi = mb * 8 + 2 * t + j % 2;
          float pv = exp2f(st[0][mb][j] * scale_log2 - lse_s[mi]);
          if (masked) {
            const int qi = m0 + mi, kj = key0 + g + 8 * (j / 2);
            if (qi >= p.len_q || kj >= p.len_k || (p.causal && kj > qi)) pv = 0.0f;
          }
          st[0][mb][j] = pv;
        }
      }

      // 3. dV += P^T dO, P^T rounded to the input dtype.
      warp_mma_pb<T, 1, kMB, kDB, kLd>(dv, st, do_bt);

      // 4. dP^T = V dO^T, then dS^T = P^T (dP^T - delta) with delta_i = rowsum(dO_i O_i).
      float ds[1][kMB][4];
      warp_mma_abt<T, 1, kMB, D / 16, kLd>(ds, v_a, do_b);
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
        for (int j = 0; j < 4; ++j) ds[0][mb][j] = st[0][mb][j] * (ds[0][mb][j] - delta_s[mb * 8 + 2 * t + j % 2]);

      // 5. dK += dS^T Q (scale applied once at the end), and dS^T, rounded as step 5 rounds it, to shared
      //    memory for step 6 (lane (g, t) holds rows g, g + 8 and columns 2t, 2t + 1 of each 8-query block).
      warp_mma_pb<T, 1, kMB, kDB, kLd>(dk, ds, q_bt);
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        T* ds_row = dss + (16 * warp + g) * kDsLd + mb * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(ds_row) = pack2<T>(ds[0][mb][0], ds[0][mb][1]);
        *reinterpret_cast<uint32_t*>(ds_row + 8 * kDsLd) = pack2<T>(ds[0][mb][2], ds[0][mb][3]);
      }
      __syncthreads();  // all of dS^T is in shared memory

      // 6. dQ += scale dS K for this warp's 16 query rows and columns [d_lo, d_lo + D / kDParts), over the
      //    block's 64 keys in 16-wide column chunks, added to the fp32 accumulator the key blocks share.
      uint32_t a[kBlockN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) ldmatrix_x4_trans(a[kk], ds_at + kk * 16 * kDsLd);
      const int q_lo = m0 + 16 * q_tile + g;
      float* dq_lo = p.dq_accum + (bh_row + q_lo) * D + 2 * t;
#pragma unroll
      for (int db = d_lo / 8; db < (d_lo + D / F::kDParts) / 8; db += 2) {
        float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, k_bt + kk * 16 * kLd + db * 8);
          mma_16816<T>(acc[0], a[kk], bk[0], bk[1]);
          mma_16816<T>(acc[1], a[kk], bk[2], bk[3]);
        }
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (q_lo < p.len_q) {
            atomicAdd(dq_lo + (db + c) * 8, acc[c][0] * p.scale);
            atomicAdd(dq_lo + (db + c) * 8 + 1, acc[c][1] * p.scale);
          }
          if (q_lo + 8 < p.len_q) {
            atomicAdd(dq_lo + 8 * D + (db + c) * 8, acc[c][2] * p.scale);
            atomicAdd(dq_lo + 8 * D + (db + c) * 8 + 1, acc[c][3] * p.scale);
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // with no query step, the K and V copies are still owed

  // 7. This block owns keys [n0, n0 + 64) of kv head hk: dK = scale sum_i dS^T q_i and dV, in the dtype.
  const int64_t kv_row = (int64_t(b) * p.heads_kv + hk) * p.len_k;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int kj = key0 + g + 8 * hr;
    if (kj >= p.len_k) continue;
    T* dk_row = static_cast<T*>(p.dk) + (kv_row + kj) * D + 2 * t;
    T* dv_row = static_cast<T*>(p.dv) + (kv_row + kj) * D + 2 * t;
#pragma unroll
    for (int db = 0; db < kDB; ++db) {
      *reinterpret_cast<uint32_t*>(dk_row + db * 8) =
          pack2<T>(dk[0][db][2 * hr] * p.scale, dk[0][db][2 * hr + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_row + db * 8) = pack2<T>(dv[0][db][2 * hr], dv[0][db][2 * hr + 1]);
    }
  }
}

template <typename T, int D, int I>
cudaError_t launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  constexpr int64_t kSmem = FwdTile<D, I>::kBytes;
  cudaError_t err = cudaFuncSetAttribute(attention_fwd_kernel<T, D, I>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.len_q, FwdTile<D, I>::kBlockM)), p.heads_q, p.batch);
  attention_fwd_kernel<T, D, I><<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_fwd_tiling(const AttentionParams& p, cudaStream_t stream) {
  switch (p.fwd_tiling) {
    case 0:
      return launch_fwd<T, D, 0>(p, stream);
    case 1:
      return launch_fwd<T, D, 1>(p, stream);
    case 2:
      if constexpr (fwd_tiling_count(D) > 2) return launch_fwd<T, D, 2>(p, stream);
      [[fallthrough]];
    default:
      return cudaErrorInvalidValue;
  }
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
  constexpr int64_t kSmem = BwdTile<D>::kBytes;
  cudaError_t err = cudaFuncSetAttribute(attention_bwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.len_k, BwdTile<D>::kBlockN)), p.heads_kv, p.batch);
  attention_bwd_kernel<T, D><<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int attention_fwd_tilings(int head_dim) { return fwd_tiling_count(head_dim); }

AttentionFwdTiling attention_fwd_tiling(int head_dim, int tiling) {
  if (tiling < 0 || tiling >= fwd_tiling_count(head_dim)) return {};
  const FwdShape s = kFwdTilings[head_dim > 64][tiling];
  const int block_m = 16 * s.m_tiles * kWarps;
  return {block_m, s.block_n, fwd_smem_bytes(block_m, s.block_n, head_dim)};
}

int64_t attention_bwd_smem_bytes(int head_dim) {
  return GPTFAST_HEADDIM_SWITCH(head_dim, D, [&] { return BwdTile<D>::kBytes; });
}

cudaError_t attention_fwd_launch(const AttentionParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.heads_q == 0 || params.len_q == 0) return cudaSuccess;
  return GPTFAST_HALF_SWITCH(params.dtype, T, [&] {
    return GPTFAST_HEADDIM_SWITCH(params.head_dim, D, [&] { return launch_fwd_tiling<T, D>(params, stream); });
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
