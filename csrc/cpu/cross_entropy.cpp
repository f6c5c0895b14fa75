// cross_entropy_fwd / cross_entropy_bwd on CPU, one row per task step (row kernels in cross_entropy.h).
// Forward reads each row once (online LSE, target logit, row sum); backward reads it once and writes dlogits.
// All offsets are int64 (row * V passes 2^31 at vocab 128k x 16k rows).
#include "cross_entropy.h"
#include "memory.h"

namespace gptfast::cpu {
namespace {

int64_t grain(int64_t V) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits_in, const at::Tensor& target,
                                                     int64_t ignore_index, double label_smoothing, double z_loss) {
  TORCH_CHECK(logits_in.dim() == 2, "cross_entropy_fwd: logits must be (M, V), got ", logits_in.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits_in.size(0), "cross_entropy_fwd: target must be (",
              logits_in.size(0), ",), got ", target.sizes());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t M = logits.size(0), V = logits.size(1);
  const at::Tensor t = checked_targets(target, V, ignore_index, "cross_entropy");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({M}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({M}, logits.options().dtype(acc));
  const CrossEntropyOptions o{ignore_index, label_smoothing, z_loss};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    A* lossp = loss.mutable_data_ptr<A>();
    A* lsep = lse.mutable_data_ptr<A>();
    at::parallel_for(0, M, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* x = xp + i * V;
        double row_lse;
        A row_sum;
        ce_row_lse(x, V, row_lse, row_sum);
        const int64_t ti = row_target(tp, i, ignore_index);
        lsep[i] = A(row_lse);
        lossp[i] = ti < 0 ? A(0) : ce_row_loss(row_lse, A(x[ti]), row_sum, V, o);
      }
    });
  });
  return {loss, lse};
}

// dlogits of the contiguous (M, V) logits, written into `out` (the logits themselves for the in-place op:
// ce_row_grad reads each element before it overwrites it).
void write_grad(const at::Tensor& dloss, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse_in,
                int64_t ignore_index, double label_smoothing, double z_loss, at::Tensor& out, const char* op) {
  const int64_t M = logits.size(0), V = logits.size(1);
  TORCH_CHECK(dloss.numel() == M && lse_in.numel() == M && target.numel() == M, op,
              ": dloss, lse and target must have ", M, " elements, got ", dloss.numel(), ", ", lse_in.numel(),
              " and ", target.numel());
  const at::Tensor t = checked_targets(target, V, ignore_index, "cross_entropy");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor dl = dloss.to(acc).contiguous(), lse = lse_in.to(acc).contiguous();
  const CrossEntropyOptions o{ignore_index, label_smoothing, z_loss};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    scalar_t* gp = out.mutable_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const A* dlp = dl.const_data_ptr<A>();
    const A* lsep = lse.const_data_ptr<A>();
    at::parallel_for(0, M, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        ce_row_grad(xp + i * V, gp + i * V, V, row_target(tp, i, ignore_index), dlp[i], lsep[i], o);
      }
    });
  });
}

at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits_in, const at::Tensor& target,
                             const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss) {
  TORCH_CHECK(logits_in.dim() == 2, "cross_entropy_bwd: logits must be (M, V), got ", logits_in.sizes());
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor dlogits = empty_output_like(logits);
  write_grad(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss, dlogits, "cross_entropy_bwd");
  return dlogits;
}

// ops.cross_entropy(..., inplace_backward=True): the gradient replaces the saved logits, so the backward
// allocates no (M, V) buffer.
void cross_entropy_bwd_inplace(const at::Tensor& dloss, at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              "cross_entropy_bwd_inplace: logits must be contiguous (M, V), got sizes ", logits.sizes(),
              " and strides ", logits.strides());
  write_grad(dloss, logits, target, lse, ignore_index, label_smoothing, z_loss, logits, "cross_entropy_bwd_inplace");
}

}  // namespace
}  // namespace gptfast::cpu

TORCH_LIBRARY_IMPL(gptfast, CPU, m) {
  m.impl("cross_entropy_fwd", &gptfast::cpu::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &gptfast::cpu::cross_entropy_bwd);
  m.impl("cross_entropy_bwd_inplace", &gptfast::cpu::cross_entropy_bwd_inplace);
}
