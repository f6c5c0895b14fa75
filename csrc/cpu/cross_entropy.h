// Per-row cross-entropy kernels shared by cross_entropy.cpp and linear_cross_entropy.cpp.
//   forward:  loss = (1 - eps) * (lse - x[t]) + eps * (lse - sum(x) / V) + z * lse^2   (0 for ignored rows)
//   backward: dx_j = dloss * (p_j * (1 + 2 z lse) - eps / V - (1 - eps) [j == t]),   p_j = exp(x_j - lse)
#pragma once
#include "vec.h"

namespace gptfast::cpu {

struct CrossEntropyOptions {
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
};

// Elements per online-LSE block: 2048 fp32 (8 KB) stay in L1 between the max sweep and the exp sweep, so
// the row is read from memory once.
constexpr int64_t kLseBlock = 2048;

// One read of the row: lse (online over blocks: the running sum is rescaled when a block raises the max)
// and sum(x) for label smoothing.
template <typename T>
void ce_row_lse(const T* x, int64_t V, double& lse, acc_t<T>& row_sum) {
  using A = acc_t<T>;
  using Vec = AVec<T>;
  constexpr int64_t W = Vec::size();
  A m = neg_inf<A>(), s = A(0), total = A(0);
  for (int64_t b0 = 0; b0 < V; b0 += kLseBlock) {
    const int64_t b1 = std::min(V, b0 + kLseBlock);
    Vec vmax(neg_inf<A>()), vtot(A(0));
    int64_t j = b0;
    for (; j + W <= b1; j += W) {
      const Vec v = load_vec(x + j);
      vmax = at::vec::maximum(vmax, v);
      vtot = vtot + v;
    }
    A bm = hmax(vmax);
    total += hsum(vtot);
    for (; j < b1; ++j) {
      bm = std::max(bm, A(x[j]));
      total += A(x[j]);
    }
    if (bm > m) {
      s *= std::exp(m - bm);
      m = bm;
    }
    const A base = safe_base(m);
    const Vec vbase(base);
    Vec vs(A(0));
    for (j = b0; j + W <= b1; j += W) vs = vs + vexp(load_vec(x + j) - vbase);
    s += hsum(vs);
    for (; j < b1; ++j) s += std::exp(A(x[j]) - base);
  }
  // lse and the loss are combined in fp64 and rounded once: z_loss * lse^2 would otherwise amplify lse's own
  // rounding and put a loss near 20 a few fp32 ulps off.
  lse = double(safe_base(m)) + std::log(double(s));
  row_sum = total;
}

template <typename A>
A ce_row_loss(double lse, A x_target, A row_sum, int64_t V, const CrossEntropyOptions& o) {
  double loss = lse - double(x_target);
  if (o.label_smoothing != 0.0) {
    loss = (1.0 - o.label_smoothing) * loss + o.label_smoothing * (lse - double(row_sum) / double(V));
  }
  if (o.z_loss != 0.0) loss += o.z_loss * lse * lse;
  return A(loss);
}

// dx for one row in one pass (dx may alias x). t < 0 marks an ignored row: dx = 0.
template <typename T, typename G>
void ce_row_grad(const T* x, G* dx, int64_t V, int64_t t, acc_t<T> dloss, acc_t<T> lse, const CrossEntropyOptions& o) {
  using A = acc_t<T>;
  using Vec = AVec<T>;
  static_assert(std::is_same_v<acc_t<G>, A>, "dx must share x's math type");
  constexpr int64_t W = Vec::size();
  if (t < 0) {
    std::fill(dx, dx + V, G(0));
    return;
  }
  const A eps = A(o.label_smoothing);
  const A coef = dloss * (A(1) + A(2) * A(o.z_loss) * lse);
  const A shift = dloss * eps / A(V);
  const A x_target = A(x[t]);  // read before dx (possibly x itself) is written
  const Vec vlse(lse), vcoef(coef), vshift(shift);
  int64_t j = 0;
  for (; j + W <= V; j += W) store_vec(dx + j, vexp(load_vec(x + j) - vlse) * vcoef - vshift);
  for (; j < V; ++j) dx[j] = G(std::exp(A(x[j]) - lse) * coef - shift);
  dx[t] = G(std::exp(x_target - lse) * coef - shift + dloss * (eps - A(1)));
}

// The kernels read targets as int64 and check them once, before any row is touched. Returns the row's
// target, or -1 for an ignored row.
inline at::Tensor checked_targets(const at::Tensor& target, int64_t V, int64_t ignore_index, const char* op) {
  at::Tensor t = target.to(at::kLong).contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < V), op,
                      ": target values must be in [0, ", V, ") or ignore_index=", ignore_index, "; got ", tp[i]);
  }
  return t;
}

inline int64_t row_target(const int64_t* tp, int64_t i, int64_t ignore_index) {
  return tp[i] == ignore_index ? -1 : tp[i];
}

}  // namespace gptfast::cpu
