// linear_cross_entropy_fwd / _bwd on CPU: the logits exist chunk_size rows at a time.
// Per chunk of rows [s, e):
//   1. logits = hidden[s:e] @ weight^T + bias           (at::addmm into one reused fp32 buffer)
//   2. the fused cross-entropy row kernels read each row once for (loss, lse) and, when gradients are wanted,
//      overwrite it in place with dlogits = dloss * (softmax * (1 + 2 z lse) - eps / V - (1 - eps) onehot)
//   3. dhidden[s:e] = dlogits @ weight,  dweight += dlogits^T @ hidden[s:e],  dbias += colsum(dlogits)
// Math and accumulators are fp32 for fp16/bf16 inputs (fp64 for fp64); the results are cast once at the end.
#include "cross_entropy.h"

namespace gptfast::cpu {
namespace {

at::ScalarType math_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct Chunked {
  at::Tensor hidden, weight, bias, target;  // weight/bias in the math type; target int64, checked
  CrossEntropyOptions options;
  int64_t chunk_size;
};

struct Grads {
  at::Tensor dhidden, dweight, dbias;  // math type accumulators
};

Chunked prepare(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double z_loss,
                int64_t chunk_size, const char* half) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && weight.size(1) == hidden.size(1), "linear_cross_entropy_",
              half, ": hidden must be (M, H) and weight (V, H), got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(chunk_size > 0, "linear_cross_entropy_", half, ": chunk_size must be positive, got ", chunk_size);
  TORCH_CHECK(target.numel() == hidden.size(0), "linear_cross_entropy_", half, ": target must have ",
              hidden.size(0), " elements, got ", target.numel());
  const auto ct = math_type(hidden);
  const int64_t V = weight.size(0);
  at::Tensor b = bias.has_value() && bias->defined() ? bias->to(ct).contiguous() : at::Tensor();
  return {hidden.contiguous(), weight.to(ct).contiguous(), b,
          checked_targets(target, V, ignore_index, "linear_cross_entropy"),
          {ignore_index, label_smoothing, z_loss}, chunk_size};
}

Grads zero_grads(const Chunked& c) {
  const auto opts = c.weight.options();
  return {at::empty({c.hidden.size(0), c.hidden.size(1)}, opts), at::zeros_like(c.weight),
          c.bias.defined() ? at::zeros_like(c.bias) : at::empty({0}, opts)};
}

// Runs steps 1-3 over every chunk. dloss == nullptr means the gradients of loss.sum() (dloss = 1 per row);
// loss/lse may be null (the backward has lse already); grads null means no gradients.
template <typename A>
void run_chunks(const Chunked& c, const A* dloss, A* loss, const A* lse_in, A* lse_out, Grads* grads) {
  const int64_t M = c.hidden.size(0), V = c.weight.size(0);
  const int64_t* tp = c.target.const_data_ptr<int64_t>();
  at::Tensor buffer = at::empty({std::min(c.chunk_size, M), V}, c.weight.options());
  for (int64_t s = 0; s < M; s += c.chunk_size) {
    const int64_t n = std::min(c.chunk_size, M - s);
    at::Tensor logits = buffer.narrow(0, 0, n);
    const at::Tensor h = c.hidden.narrow(0, s, n).to(c.weight.scalar_type());
    if (c.bias.defined()) {
      at::addmm_out(logits, c.bias, h, c.weight.t());
    } else {
      at::mm_out(logits, h, c.weight.t());
    }
    A* lp = logits.mutable_data_ptr<A>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = s + r;
        A* row = lp + r * V;
        const int64_t t = row_target(tp, i, c.options.ignore_index);
        double row_lse = lse_in ? double(lse_in[i]) : 0.0;
        A row_sum = A(0);
        if (!lse_in) ce_row_lse(row, V, row_lse, row_sum);
        if (lse_out) lse_out[i] = A(row_lse);
        if (loss) loss[i] = t < 0 ? A(0) : ce_row_loss(row_lse, row[t], row_sum, V, c.options);
        if (grads) ce_row_grad(row, row, V, t, dloss ? dloss[i] : A(1), A(row_lse), c.options);
      }
    });
    if (!grads) continue;
    at::Tensor dh = grads->dhidden.narrow(0, s, n);
    at::mm_out(dh, logits, c.weight);
    grads->dweight.addmm_(logits.t(), h);
    if (c.bias.defined()) grads->dbias.add_(logits.sum(0));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cast_grads(const Grads& g, const at::Tensor& hidden,
                                                          const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  return {g.dhidden.to(hidden.scalar_type()), g.dweight.to(weight.scalar_type()),
          has_bias ? g.dbias.to(bias->scalar_type()) : g.dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double z_loss,
    int64_t chunk_size, bool with_grad) {
  const Chunked c = prepare(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, chunk_size, "fwd");
  const int64_t M = hidden.size(0);
  at::Tensor loss = at::empty({M}, c.weight.options()), lse = at::empty({M}, c.weight.options());
  Grads g = with_grad ? zero_grads(c) : Grads{};
  AT_DISPATCH_FLOATING_TYPES(c.weight.scalar_type(), "linear_cross_entropy_fwd", [&] {
    run_chunks<scalar_t>(c, nullptr, loss.mutable_data_ptr<scalar_t>(), nullptr, lse.mutable_data_ptr<scalar_t>(),
                         with_grad ? &g : nullptr);
  });
  if (!with_grad) {  // three distinct empties: a custom op's outputs may not alias each other
    const auto opts = c.weight.options();
    return {loss, lse, at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  }
  auto [dh, dw, db] = cast_grads(g, hidden, weight, bias);
  return {loss, lse, dh, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd(
    const at::Tensor& dloss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
    double z_loss, int64_t chunk_size) {
  const Chunked c = prepare(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, chunk_size, "bwd");
  TORCH_CHECK(dloss.numel() == hidden.size(0) && lse.numel() == hidden.size(0), "linear_cross_entropy_bwd: dloss ",
              "and lse must have ", hidden.size(0), " elements, got ", dloss.numel(), " and ", lse.numel());
  const auto ct = c.weight.scalar_type();
  const at::Tensor dl = dloss.to(ct).contiguous(), l = lse.to(ct).contiguous();
  Grads g = zero_grads(c);
  AT_DISPATCH_FLOATING_TYPES(ct, "linear_cross_entropy_bwd", [&] {
    run_chunks<scalar_t>(c, dl.const_data_ptr<scalar_t>(), nullptr, l.const_data_ptr<scalar_t>(), nullptr, &g);
  });
  return cast_grads(g, hidden, weight, bias);
}

}  // namespace
}  // namespace gptfast::cpu

TORCH_LIBRARY_IMPL(gptfast, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &gptfast::cpu::linear_cross_entropy_fwd);
  m.impl("linear_cross_entropy_bwd", &gptfast::cpu::linear_cross_entropy_bwd);
}
