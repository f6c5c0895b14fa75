// softmax_fwd / softmax_bwd on CPU: one task per block of rows, each row handled while it sits in L1/L2.
//   forward:  y = exp(scale * x - m) / sum,  m = max(scale * x), over the row's unmasked prefix
//   backward: dx = scale * y * (dy - rowsum(dy * y))
// With causal_rows = L > 0, row r keeps columns j <= r % L (the rows are stacked (L, N) score matrices); the
// masked tail is written as 0 in both passes, and a row with nothing kept (never happens: j = 0 is always
// kept) would give zeros.
#include "memory.h"
#include "vec.h"

namespace gptfast::cpu {
namespace {

int64_t kept_columns(int64_t row, int64_t N, int64_t causal_rows) {
  return causal_rows > 0 ? std::min(N, row % causal_rows + 1) : N;
}

// 1. m = max(scale * x); 2. e = exp(scale * x - m) into a fp32 scratch row, summed; 3. y = e / sum.
template <typename T>
void softmax_row(const T* x, T* y, acc_t<T>* scratch, int64_t N, int64_t n, acc_t<T> scale) {
  using A = acc_t<T>;
  using Vec = AVec<T>;
  constexpr int64_t W = Vec::size();
  const Vec vscale(scale);
  int64_t j = 0;
  Vec vmax(neg_inf<A>());
  for (; j + W <= n; j += W) vmax = at::vec::maximum(vmax, load_vec(x + j) * vscale);
  A m = hmax(vmax);
  for (; j < n; ++j) m = std::max(m, A(x[j]) * scale);
  const A base = safe_base(m);
  const Vec vbase(base);
  Vec vsum(A(0));
  for (j = 0; j + W <= n; j += W) {
    Vec e = vexp(load_vec(x + j) * vscale - vbase);
    e.store(scratch + j);
    vsum = vsum + e;
  }
  A sum = hsum(vsum);
  for (; j < n; ++j) {
    scratch[j] = std::exp(A(x[j]) * scale - base);
    sum += scratch[j];
  }
  // Only a fully masked row sums to 0 (it gives zeros). A NaN sum (NaN or +inf in the row) must stay NaN, as
  // in torch, and not zero the row's finite entries.
  const A inv = sum == A(0) ? A(0) : A(1) / sum;
  const Vec vinv(inv);
  for (j = 0; j + W <= n; j += W) store_vec(y + j, Vec::loadu(scratch + j) * vinv);
  for (; j < n; ++j) y[j] = T(scratch[j] * inv);
  for (j = n; j < N; ++j) y[j] = T(0);
}

template <typename T>
void softmax_bwd_row(const T* dy, const T* y, T* dx, int64_t N, int64_t n, acc_t<T> scale) {
  using A = acc_t<T>;
  using Vec = AVec<T>;
  constexpr int64_t W = Vec::size();
  int64_t j = 0;
  Vec vdot(A(0));
  for (; j + W <= n; j += W) vdot = at::vec::fmadd(load_vec(dy + j), load_vec(y + j), vdot);
  A dot = hsum(vdot);
  for (; j < n; ++j) dot += A(dy[j]) * A(y[j]);
  const Vec vscale(scale), vdotv(dot);
  for (j = 0; j + W <= n; j += W) store_vec(dx + j, vscale * load_vec(y + j) * (load_vec(dy + j) - vdotv));
  for (; j < n; ++j) dx[j] = T(scale * A(y[j]) * (A(dy[j]) - dot));
  for (j = n; j < N; ++j) dx[j] = T(0);
}

// Rows per task: enough work to amortise the task, few enough to balance two cores on small inputs.
int64_t grain(int64_t N) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
}

at::Tensor softmax_fwd(const at::Tensor& x_in, double scale, int64_t causal_rows) {
  TORCH_CHECK(x_in.dim() == 2, "softmax_fwd: x must be (M, N), got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_output_like(x);
  const int64_t M = x.size(0), N = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, grain(N), [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(N);
      for (int64_t r = begin; r < end; ++r) {
        softmax_row(xp + r * N, yp + r * N, scratch.data(), N, kept_columns(r, N, causal_rows), A(scale));
      }
    });
  });
  return y;
}

at::Tensor softmax_bwd(const at::Tensor& dy_in, const at::Tensor& y_in, double scale, int64_t causal_rows) {
  TORCH_CHECK(y_in.dim() == 2 && dy_in.sizes() == y_in.sizes(), "softmax_bwd: dy and y must both be (M, N), got ",
              dy_in.sizes(), " and ", y_in.sizes());
  TORCH_CHECK(dy_in.scalar_type() == y_in.scalar_type(), "softmax_bwd: dy must have y's dtype (",
              y_in.scalar_type(), "), got ", dy_in.scalar_type());
  const at::Tensor dy = dy_in.contiguous(), y = y_in.contiguous();
  at::Tensor dx = empty_output_like(y);
  const int64_t M = y.size(0), N = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_bwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, grain(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        softmax_bwd_row(dyp + r * N, yp + r * N, dxp + r * N, N, kept_columns(r, N, causal_rows), A(scale));
      }
    });
  });
  return dx;
}

}  // namespace
}  // namespace gptfast::cpu

TORCH_LIBRARY_IMPL(gptfast, CPU, m) {
  m.impl("softmax_fwd", &gptfast::cpu::softmax_fwd);
  m.impl("softmax_bwd", &gptfast::cpu::softmax_bwd);
}
