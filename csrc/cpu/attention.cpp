// attention_fwd / attention_bwd on CPU: FlashAttention-2's tiled algorithm. Scores live only as one
// (query block x key block) tile per task; nothing of size L x S is ever held.
//
// Forward, per (batch, query head, query block), over the key blocks it can see:
//   1. S = scale * Q_blk K_blk^T + mask            (causal keeps key j for query i when j <= i, top-left)
//   2. m' = max(m, rowmax S),  P = exp(S - m'),  l = l * exp(m - m') + rowsum P,  O = O * exp(m - m') + P V_blk
//   3. O /= l,  lse = m + log l                    (a row with no key left: O = 0, lse = -inf)
// Backward recomputes P = exp(S - lse) and uses delta = rowsum(dO * O):
//   dV = sum P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale * dS K,  dK = scale * sum dS^T Q
// race-free in one of two ways. Fused: one task per (batch, kv head) sweeps every (key block, query block)
// pair of it and of its group's query heads, 5 tile products per pair. Split, when there are too few kv heads
// to keep the threads busy: dK/dV per (batch, kv head, key block), then dQ per (batch, query head, query
// block), which computes S and P a second time (7 products per pair). GQA: query head h reads kv head
// h / (Hq / Hk).
// Inputs of any float dtype are copied once to fp32 (and to the transposed layouts the tile products stream);
// these copies are the size of the inputs.
#include "gemm.h"

namespace gptfast::cpu {
namespace {

// A natural-log lse below this exists only in rows a huge finite mask swamps (see attention_bwd).
constexpr double kSwampedLse = -1e37;
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;

int64_t blocks(int64_t n, int64_t block) {
  return (n + block - 1) / block;
}

// The additive fp32 mask as a strided (B, Hq, L, S) view: broadcast dims keep stride 0, so only the mask's
// own elements are converted (bool True -> 0, False -> -inf).
struct Mask {
  at::Tensor data;
  const float* ptr = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, ss = 0;

  explicit Mask(const std::optional<at::Tensor>& mask) {
    if (!mask.has_value() || !mask->defined()) return;
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4, "attention: attn_mask must be a (B, Hq, L, S) view, got ", m.sizes());
    std::vector<int64_t> sizes(m.sizes().begin(), m.sizes().end());
    for (int64_t d = 0; d < 4; ++d) {
      if (m.stride(d) == 0) sizes[d] = 1;
    }
    at::Tensor base = m.as_strided(sizes, m.strides());
    at::Tensor f = m.scalar_type() == at::kBool
                       ? at::where(base, 0.0f, -std::numeric_limits<float>::infinity()).to(at::kFloat)
                       : base.to(at::kFloat);
    data = f.expand(m.sizes());
    ptr = data.const_data_ptr<float>();
    sb = data.stride(0), sh = data.stride(1), sl = data.stride(2), ss = data.stride(3);
  }

  float at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return ptr[b * sb + h * sh + i * sl + j * ss];
  }
};

struct Shapes {
  int64_t B, Hq, Hk, L, S, D, Dv, group;
};

Shapes shapes_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be 4-d, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3), 1};
  TORCH_CHECK(s.Hk > 0 && s.Hq % s.Hk == 0, "attention: query heads (", s.Hq, ") must be a multiple of kv heads (",
              s.Hk, ")");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attention: the cpu backend takes float32, float16 or bfloat16, got ", q.scalar_type());
  s.group = s.Hq / s.Hk;
  return s;
}

void check_no_dropout(double dropout_p) {
  TORCH_CHECK(dropout_p == 0.0, "attention: the cpu backend does not implement dropout (got dropout_p=", dropout_p,
              "); use backend='reference' or dropout_p=0");
}

at::Tensor fp32(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

// t (B, H, N, D) -> (B, H, ceil(N / block), D, block) fp32: block b holds t[..., b*block : (b+1)*block, :]^T as
// one contiguous D x block tile (zero padded past N). The tile products stream these tiles row by row; reading
// them straight out of a (D, N) transpose would stride every row by N floats, and at N = 1024 (4 KB) all the
// rows of a tile alias to the same L1 sets.
at::Tensor fp32_transposed_blocks(const at::Tensor& t, int64_t block) {
  const int64_t N = t.size(2), nb = (N + block - 1) / block;
  at::Tensor f = t.to(at::kFloat);
  if (nb * block != N) f = at::constant_pad_nd(f, {0, 0, 0, nb * block - N});
  return f.reshape({t.size(0), t.size(1), nb, block, t.size(3)}).transpose(-1, -2).contiguous();
}

// Keys a query block [i0, i0 + nq) can see: all of them, or under causal up to its last query.
int64_t visible_keys(bool causal, int64_t i0, int64_t nq, int64_t S) {
  return causal ? std::min(S, i0 + nq) : S;
}

inline void scale_row(float* row, int64_t n, float scale) {
  at::vec::map([scale](Vectorized<float> x) { return x * Vectorized<float>(scale); }, row, row, n);
}

// Score tile row for query i over keys [j0, j0 + nk): scale, add the mask, -inf past the causal edge.
inline void finish_scores(float* row, int64_t nk, float scale, bool causal, int64_t i, int64_t j0, const Mask& mask,
                          int64_t b, int64_t h) {
  const int64_t kept = causal ? std::clamp<int64_t>(i - j0 + 1, 0, nk) : nk;
  if (mask.ptr) {
    for (int64_t j = 0; j < kept; ++j) row[j] = row[j] * scale + mask.at(b, h, i, j0 + j);
  } else {
    scale_row(row, kept, scale);
  }
  std::fill(row + kept, row + nk, -std::numeric_limits<float>::infinity());
}

// row = exp(row - base) in place; returns the row sum.
inline float exp_row(float* row, int64_t n, float base) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const Vec vb(base);
  Vec vs(0.f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec e = vexp(Vec::loadu(row + j) - vb);
    e.store(row + j);
    vs = vs + e;
  }
  if (j < n) {
    // Masked lanes would load 0 and add exp(-base) to the sum; pad them with -inf instead.
    float tail[W];
    std::fill(tail, tail + W, -std::numeric_limits<float>::infinity());
    std::copy(row + j, row + n, tail);
    const Vec e = vexp(Vec::loadu(tail) - vb);
    e.store(row + j, n - j);
    vs = vs + e;
  }
  return hsum(vs);
}

inline float row_max(const float* row, int64_t n) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  Vec vm(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) vm = at::vec::maximum(vm, Vec::loadu(row + j));
  float m = hmax(vm);
  for (; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

// ------------------------------------------------------------------------------------------------ forward
struct FwdTask {
  const Shapes& s;
  const float *q, *kt, *v;
  const Mask& mask;
  bool causal;
  float scale;
  float *out, *lse;

  void run(int64_t task, float* tile, float* acc, float* m, float* l) const {
    const int64_t nqb = blocks(s.L, kBlockQ);
    const int64_t bh = task / nqb, i0 = (task % nqb) * kBlockQ;
    const int64_t b = bh / s.Hq, h = bh % s.Hq, kvh = b * s.Hk + h / s.group;
    const int64_t nq = std::min(kBlockQ, s.L - i0);
    const float* qb = q + (bh * s.L + i0) * s.D;
    const float* ktb = kt + kvh * blocks(s.S, kBlockK) * s.D * kBlockK;
    const float* vb = v + kvh * s.S * s.Dv;
    std::fill(acc, acc + nq * s.Dv, 0.f);
    std::fill(m, m + nq, -std::numeric_limits<float>::infinity());
    std::fill(l, l + nq, 0.f);
    const int64_t n_keys = visible_keys(causal, i0, nq, s.S);
    for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, n_keys - j0);
      // 1. S = scale * Q K^T + mask
      gemm(qb, s.D, ktb + j0 * s.D, kBlockK, tile, kBlockK, nq, nk, s.D, false);
      for (int64_t r = 0; r < nq; ++r) {
        float* row = tile + r * kBlockK;
        finish_scores(row, nk, scale, causal, i0 + r, j0, mask, b, h);
        // 2. online softmax: rescale what O and l hold so far to the new running max
        const float m_new = std::max(m[r], row_max(row, nk));
        const float base = safe_base(m_new);
        const float alpha = std::exp(m[r] - base);
        l[r] = l[r] * alpha + exp_row(row, nk, base);
        m[r] = m_new;
        if (alpha != 1.f) {
          at::vec::map([alpha](Vectorized<float> x) { return x * Vectorized<float>(alpha); }, acc + r * s.Dv,
                       acc + r * s.Dv, s.Dv);
        }
      }
      gemm(tile, kBlockK, vb + j0 * s.Dv, s.Dv, acc, s.Dv, nq, s.Dv, nk, true);
    }
    // 3. normalise. l = 0 only for a row with no key left (out 0, lse -inf); a NaN l (NaN in the scores) keeps
    //    lse NaN, so the backward's recomputed P is NaN too rather than exp(S - inf) = 0.
    for (int64_t r = 0; r < nq; ++r) {
      const bool dead = l[r] == 0.f;
      const float inv = dead ? 0.f : 1.f / l[r];
      float* o = out + (bh * s.L + i0 + r) * s.Dv;
      at::vec::map([inv](Vectorized<float> x) { return x * Vectorized<float>(inv); }, o, acc + r * s.Dv, s.Dv);
      lse[bh * s.L + i0 + r] = dead ? -std::numeric_limits<float>::infinity() : m[r] + std::log(l[r]);
    }
  }
};

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                                 bool is_causal, double scale, const at::Tensor& rng) {
  check_no_dropout(dropout_p);
  const Shapes s = shapes_of(q, k, v);
  const at::Tensor qf = fp32(q), ktf = fp32_transposed_blocks(k, kBlockK), vf = fp32(v);
  const Mask mask(attn_mask);
  at::Tensor out = at::empty({s.B, s.Hq, s.L, s.Dv}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({s.B, s.Hq, s.L}, q.options().dtype(at::kFloat));
  const FwdTask t{s, qf.const_data_ptr<float>(), ktf.const_data_ptr<float>(), vf.const_data_ptr<float>(), mask,
                  is_causal, static_cast<float>(scale), out.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>()};
  at::parallel_for(0, s.B * s.Hq * blocks(s.L, kBlockQ), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kBlockQ * kBlockK), acc(kBlockQ * s.Dv), m(kBlockQ), l(kBlockQ);
    for (int64_t task = begin; task < end; ++task) t.run(task, tile.data(), acc.data(), m.data(), l.data());
  });
  return {out.to(q.scalar_type()), lse};
}

// ----------------------------------------------------------------------------------------------- backward
struct BwdInputs {
  const Shapes& s;
  // fp32; *t in transposed blocks (qt, v, doutt only for the split passes); lse +inf: no key left
  at::Tensor q, qt, k, kt, v, vt, dout, doutt, lse, delta;
  const Mask& mask;
  bool causal;
  float scale;
};

// P (or P^T) = exp(S - lse) for a tile, in place over the raw products Q K^T (or K Q^T).
inline void probs_row(float* row, int64_t n, const float* lse_of_col, float lse_of_row) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  if (lse_of_col) {
    for (; j + W <= n; j += W) vexp(Vec::loadu(row + j) - Vec::loadu(lse_of_col + j)).store(row + j);
    for (; j < n; ++j) row[j] = std::exp(row[j] - lse_of_col[j]);
  } else {
    const Vec vl(lse_of_row);
    for (; j + W <= n; j += W) vexp(Vec::loadu(row + j) - vl).store(row + j);
    for (; j < n; ++j) row[j] = std::exp(row[j] - lse_of_row);
  }
}

// dS = P * (dP - delta), in place over dP; delta per column (dK/dV pass) or one per row (dQ pass).
inline void dscores_row(float* dp, const float* p, int64_t n, const float* delta_of_col, float delta_of_row) {
  using Vec = Vectorized<float>;
  if (delta_of_col) {
    at::vec::map3([](Vec d, Vec pv, Vec dl) { return pv * (d - dl); }, dp, dp, p, delta_of_col, n);
  } else {
    const Vec dl(delta_of_row);
    at::vec::map2([dl](Vec d, Vec pv) { return pv * (d - dl); }, dp, dp, p, n);
  }
}

// dK, dV for keys [j0, j0 + nk) of kv head (b, kvh), summed over its query heads and every query block.
void dkdv_task(const BwdInputs& in, int64_t task, float* pt, float* dpt, float* dk, float* dv) {
  const Shapes& s = in.s;
  const int64_t nkb = blocks(s.S, kBlockK), nqb = blocks(s.L, kBlockQ);
  const int64_t bkv = task / nkb, j0 = (task % nkb) * kBlockK, b = bkv / s.Hk;
  const int64_t nk = std::min(kBlockK, s.S - j0);
  const float* kb = in.k.const_data_ptr<float>() + (bkv * s.S + j0) * s.D;
  const float* vb = in.v.const_data_ptr<float>() + (bkv * s.S + j0) * s.Dv;
  std::fill(dk, dk + nk * s.D, 0.f);
  std::fill(dv, dv + nk * s.Dv, 0.f);
  // Under causal, query i sees key j only when i >= j: start at the block holding query j0.
  const int64_t first_q = in.causal ? j0 / kBlockQ * kBlockQ : 0;
  for (int64_t g = 0; g < s.group; ++g) {
    const int64_t h = bkv % s.Hk * s.group + g, bh = b * s.Hq + h;
    const float* lse = in.lse.const_data_ptr<float>() + bh * s.L;
    const float* delta = in.delta.const_data_ptr<float>() + bh * s.L;
    for (int64_t i0 = first_q; i0 < s.L; i0 += kBlockQ) {
      const int64_t nq = std::min(kBlockQ, s.L - i0);
      // P^T = exp(scale * K Q^T + mask^T - lse)
      gemm(kb, s.D, in.qt.const_data_ptr<float>() + (bh * nqb * kBlockQ + i0) * s.D, kBlockQ, pt, kBlockQ, nk, nq,
           s.D, false);
      for (int64_t c = 0; c < nk; ++c) {
        float* row = pt + c * kBlockQ;
        const int64_t j = j0 + c;
        scale_row(row, nq, in.scale);
        if (in.mask.ptr) {
          for (int64_t r = 0; r < nq; ++r) row[r] += in.mask.at(b, h, i0 + r, j);
        }
        if (in.causal) {  // queries i < j do not see key j
          std::fill(row, row + std::clamp<int64_t>(j - i0, 0, nq), -std::numeric_limits<float>::infinity());
        }
        probs_row(row, nq, lse + i0, 0.f);
      }
      // dV += P^T dO
      const float* dob = in.dout.const_data_ptr<float>() + (bh * s.L + i0) * s.Dv;
      gemm(pt, kBlockQ, dob, s.Dv, dv, s.Dv, nk, s.Dv, nq, true);
      // dP^T = V dO^T;  dS^T = P^T * (dP^T - delta)
      gemm(vb, s.Dv, in.doutt.const_data_ptr<float>() + (bh * nqb * kBlockQ + i0) * s.Dv, kBlockQ, dpt, kBlockQ, nk,
           nq, s.Dv, false);
      for (int64_t c = 0; c < nk; ++c) dscores_row(dpt + c * kBlockQ, pt + c * kBlockQ, nq, delta + i0, 0.f);
      // dK += dS^T Q   (scaled at the end)
      gemm(dpt, kBlockQ, in.q.const_data_ptr<float>() + (bh * s.L + i0) * s.D, s.D, dk, s.D, nk, s.D, nq, true);
    }
  }
}

// dQ for queries [i0, i0 + nq) of query head (b, h).
void dq_task(const BwdInputs& in, int64_t task, float* p, float* dp, float* dq) {
  const Shapes& s = in.s;
  const int64_t nqb = blocks(s.L, kBlockQ);
  const int64_t bh = task / nqb, i0 = (task % nqb) * kBlockQ;
  const int64_t b = bh / s.Hq, h = bh % s.Hq, bkv = b * s.Hk + h / s.group;
  const int64_t nq = std::min(kBlockQ, s.L - i0);
  const float* qb = in.q.const_data_ptr<float>() + (bh * s.L + i0) * s.D;
  const float* dob = in.dout.const_data_ptr<float>() + (bh * s.L + i0) * s.Dv;
  const float* lse = in.lse.const_data_ptr<float>() + bh * s.L + i0;
  const float* delta = in.delta.const_data_ptr<float>() + bh * s.L + i0;
  std::fill(dq, dq + nq * s.D, 0.f);
  const int64_t n_keys = visible_keys(in.causal, i0, nq, s.S);
  for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, n_keys - j0);
    // P = exp(scale * Q K^T + mask - lse)
    const int64_t nkb = blocks(s.S, kBlockK);
    gemm(qb, s.D, in.kt.const_data_ptr<float>() + (bkv * nkb * kBlockK + j0) * s.D, kBlockK, p, kBlockK, nq, nk, s.D,
         false);
    for (int64_t r = 0; r < nq; ++r) {
      float* row = p + r * kBlockK;
      finish_scores(row, nk, in.scale, in.causal, i0 + r, j0, in.mask, b, h);
      probs_row(row, nk, nullptr, lse[r]);
    }
    // dP = dO V^T;  dS = P * (dP - delta);  dQ += dS K
    gemm(dob, s.Dv, in.vt.const_data_ptr<float>() + (bkv * nkb * kBlockK + j0) * s.Dv, kBlockK, dp, kBlockK, nq, nk,
         s.Dv, false);
    for (int64_t r = 0; r < nq; ++r) dscores_row(dp + r * kBlockK, p + r * kBlockK, nk, nullptr, delta[r]);
    gemm(dp, kBlockK, in.k.const_data_ptr<float>() + (bkv * s.S + j0) * s.D, s.D, dq, s.D, nq, s.D, nk, true);
  }
}

// dQ, dK, dV of kv head bkv = (batch, kv head) and of the query heads of its group, in one sweep: S and P are
// computed once per (key block, query block) pair for all three gradients. The task owns every row it
// accumulates into (dK, dV of its kv head; dQ of its query heads), so tasks never race. dK and dQ are left
// unscaled (the caller multiplies them by scale).
void fused_bwd_task(const BwdInputs& in, int64_t bkv, float* p, float* ds, float* dq, float* dk, float* dv) {
  const Shapes& s = in.s;
  const int64_t b = bkv / s.Hk, nkb = blocks(s.S, kBlockK);
  const float* q = in.q.const_data_ptr<float>();
  const float* dout = in.dout.const_data_ptr<float>();
  const float* kh = in.k.const_data_ptr<float>() + bkv * s.S * s.D;
  const float* kth = in.kt.const_data_ptr<float>() + bkv * nkb * kBlockK * s.D;
  const float* vth = in.vt.const_data_ptr<float>() + bkv * nkb * kBlockK * s.Dv;
  float* dkh = dk + bkv * s.S * s.D;
  float* dvh = dv + bkv * s.S * s.Dv;
  std::fill(dkh, dkh + s.S * s.D, 0.f);
  std::fill(dvh, dvh + s.S * s.Dv, 0.f);
  for (int64_t g = 0; g < s.group; ++g) {
    const int64_t h = bkv % s.Hk * s.group + g, bh = b * s.Hq + h;
    const float* lse = in.lse.const_data_ptr<float>() + bh * s.L;
    const float* delta = in.delta.const_data_ptr<float>() + bh * s.L;
    float* dqh = dq + bh * s.L * s.D;
    std::fill(dqh, dqh + s.L * s.D, 0.f);
    // Key block outermost: its dK/dV rows and K tiles stay in L1 while the query blocks stream through L2.
    for (int64_t j0 = 0; j0 < s.S; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, s.S - j0);
      const int64_t first_q = in.causal ? j0 / kBlockQ * kBlockQ : 0;  // queries i < j0 see no key of the block
      for (int64_t i0 = first_q; i0 < s.L; i0 += kBlockQ) {
        const int64_t nq = std::min(kBlockQ, s.L - i0);
        const float* qb = q + (bh * s.L + i0) * s.D;
        const float* dob = dout + (bh * s.L + i0) * s.Dv;
        // P = exp(scale * Q K^T + mask - lse)
        gemm(qb, s.D, kth + j0 * s.D, kBlockK, p, kBlockK, nq, nk, s.D, false);
        for (int64_t r = 0; r < nq; ++r) {
          float* row = p + r * kBlockK;
          finish_scores(row, nk, in.scale, in.causal, i0 + r, j0, in.mask, b, h);
          probs_row(row, nk, nullptr, lse[i0 + r]);
        }
        // dV += P^T dO;  dP = dO V^T;  dS = P * (dP - delta);  dK += dS^T Q;  dQ += dS K
        gemm_at(p, kBlockK, dob, s.Dv, dvh + j0 * s.Dv, s.Dv, nk, s.Dv, nq, true);
        gemm(dob, s.Dv, vth + j0 * s.Dv, kBlockK, ds, kBlockK, nq, nk, s.Dv, false);
        for (int64_t r = 0; r < nq; ++r) dscores_row(ds + r * kBlockK, p + r * kBlockK, nk, nullptr, delta[i0 + r]);
        gemm_at(ds, kBlockK, qb, s.D, dkh + j0 * s.D, s.D, nk, s.D, nq, true);
        gemm(ds, kBlockK, kh + j0 * s.D, s.D, dqh + i0 * s.D, s.D, nq, s.D, nk, true);
      }
    }
  }
}

// The fused sweep has one task per kv head, the split passes one per (head, block): with T kv heads on P
// threads the fused one costs ceil(T / P) rounds of 5 products, the split ones about T / P rounds of 7.
bool fused_backward_pays(int64_t kv_heads) {
  const int64_t threads = at::get_num_threads();
  return (kv_heads + threads - 1) / threads * 5 * threads <= 7 * kv_heads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    bool is_causal, double scale, const at::Tensor& rng) {
  check_no_dropout(dropout_p);
  const Shapes s = shapes_of(q, k, v);
  const Mask mask(attn_mask);
  const at::Tensor dof = fp32(dout);
  // delta = rowsum(dO * O); a row with no key left gets lse = +inf so that every exp(S - lse) is 0. So does a
  // row that a huge finite mask swamps (transformers' finfo.min padding on every key): its lse (below any lse
  // real scores give) absorbed log(sum), so P cannot be recovered from it.
  const at::Tensor delta = (dof * out.to(at::kFloat)).sum(-1).contiguous();
  const at::Tensor lse_f = lse.to(at::kFloat).masked_fill(lse < kSwampedLse,
                                                          std::numeric_limits<float>::infinity()).contiguous();
  const bool fused = fused_backward_pays(s.B * s.Hk);
  const BwdInputs in{s,
                     fp32(q),
                     fused ? at::Tensor() : fp32_transposed_blocks(q, kBlockQ),
                     fp32(k),
                     fp32_transposed_blocks(k, kBlockK),
                     fused ? at::Tensor() : fp32(v),
                     fp32_transposed_blocks(v, kBlockK),
                     dof,
                     fused ? at::Tensor() : fp32_transposed_blocks(dout, kBlockQ),
                     lse_f,
                     delta,
                     mask,
                     is_causal,
                     static_cast<float>(scale)};
  at::Tensor dq = at::empty({s.B, s.Hq, s.L, s.D}, q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty({s.B, s.Hk, s.S, s.D}, q.options().dtype(at::kFloat));
  at::Tensor dv = at::empty({s.B, s.Hk, s.S, s.Dv}, q.options().dtype(at::kFloat));
  const float sc = static_cast<float>(scale);
  if (fused) {
    at::parallel_for(0, s.B * s.Hk, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> p(kBlockQ * kBlockK), ds(kBlockQ * kBlockK);
      for (int64_t bkv = begin; bkv < end; ++bkv) {
        fused_bwd_task(in, bkv, p.data(), ds.data(), dq.mutable_data_ptr<float>(), dk.mutable_data_ptr<float>(),
                       dv.mutable_data_ptr<float>());
        scale_row(dk.mutable_data_ptr<float>() + bkv * s.S * s.D, s.S * s.D, sc);
        const int64_t bh0 = bkv / s.Hk * s.Hq + bkv % s.Hk * s.group;
        scale_row(dq.mutable_data_ptr<float>() + bh0 * s.L * s.D, s.group * s.L * s.D, sc);
      }
    });
    return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
  }
  at::parallel_for(0, s.B * s.Hk * blocks(s.S, kBlockK), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pt(kBlockK * kBlockQ), dpt(kBlockK * kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bkv = task / blocks(s.S, kBlockK), j0 = task % blocks(s.S, kBlockK) * kBlockK;
      const int64_t nk = std::min(kBlockK, s.S - j0);
      float* dkb = dk.mutable_data_ptr<float>() + (bkv * s.S + j0) * s.D;
      float* dvb = dv.mutable_data_ptr<float>() + (bkv * s.S + j0) * s.Dv;
      dkdv_task(in, task, pt.data(), dpt.data(), dkb, dvb);
      scale_row(dkb, nk * s.D, sc);
    }
  });
  at::parallel_for(0, s.B * s.Hq * blocks(s.L, kBlockQ), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(kBlockQ * kBlockK), dp(kBlockQ * kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks(s.L, kBlockQ), i0 = task % blocks(s.L, kBlockQ) * kBlockQ;
      const int64_t nq = std::min(kBlockQ, s.L - i0);
      float* dqb = dq.mutable_data_ptr<float>() + (bh * s.L + i0) * s.D;
      dq_task(in, task, p.data(), dp.data(), dqb);
      scale_row(dqb, nq * s.D, sc);
    }
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace
}  // namespace gptfast::cpu

TORCH_LIBRARY_IMPL(gptfast, CPU, m) {
  m.impl("attention_fwd", &gptfast::cpu::attention_fwd);
  m.impl("attention_bwd", &gptfast::cpu::attention_bwd);
}
