// Torch binding of the CUDA attention kernels: checks (refusing what the kernels do not do, with the fix),
// 16-byte alignment of q/k/v, output allocation, the current stream, the launches.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "attention_params.h"
#include "binding_utils.h"

namespace gptfast::cuda {
namespace {

constexpr const char* kFwd = "attention_fwd (cuda)";
constexpr const char* kBwd = "attention_bwd (cuda)";

// The kernels read rows with 16-byte loads: the head dim contiguous, every other stride a multiple of
// 8 elements and a 16-byte aligned start. Views that break this are copied (contiguous copies always fit).
at::Tensor aligned_rows(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

Strides strides_of(const at::Tensor& t) { return Strides{t.stride(0), t.stride(1), t.stride(2)}; }

// Everything both passes check; returns the filled shape/dtype part of the params.
AttentionParams check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& attn_mask, double dropout_p, const char* op) {
  TORCH_CHECK(!(attn_mask.has_value() && attn_mask->defined()), op,
              ": attn_mask is not supported by the cuda backend; use backend='triton' or 'reference'");
  TORCH_CHECK(dropout_p == 0.0, op, ": dropout is not supported by the cuda backend (dropout_p=", dropout_p,
              "); use backend='triton' or 'reference'");
  check_cuda(q, op, "q");
  check_same_device(q, k, op, "k");
  check_same_device(q, v, op, "v");
  check_dim(q, 4, op, "q");
  check_dim(k, 4, op, "k");
  check_dim(v, 4, op, "v");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the cuda backend takes float16 or bfloat16 q/k/v, got ", q.scalar_type(),
              "; use backend='triton' or 'reference'");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
              v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), S = k.size(2);
  TORCH_CHECK(D == 32 || D == 64 || D == 96 || D == 128, op,
              ": the cuda backend takes head dim 32, 64, 96 or 128, got ", D,
              "; use backend='triton' or 'reference'");
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, op, ": k must be (", B, ", Hk, S, ", D, "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(),
              " (the cuda backend needs value dim == head dim), got ", v.sizes());
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, op, ": query heads (", Hq, ") must be a multiple of kv heads (", Hk, ")");
  TORCH_CHECK(B <= 65535 && Hq <= 65535, op, ": batch and query heads must be <= 65535 (grid limits), got ", B,
              " and ", Hq);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(L < kIntMax && S < kIntMax, op, ": sequence lengths must be < 2^31, got ", L, " and ", S);
  AttentionParams p;
  p.batch = static_cast<int>(B);
  p.heads_q = static_cast<int>(Hq);
  p.heads_kv = static_cast<int>(Hk);
  p.len_q = static_cast<int>(L);
  p.len_k = static_cast<int>(S);
  p.head_dim = static_cast<int>(D);
  p.dtype = q.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
  return p;
}

void check_smem(int64_t bytes, const char* op) {
  const int64_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, op, ": needs ", bytes, " bytes of shared memory per block, the device allows ",
              limit, "; use backend='triton' or 'reference'");
}

// ------------------------------------------------------------------------------------- forward tiling
// Which forward tiling (attention.cu's kFwdTilings) is fastest depends on the GPU, the head dim and how many
// blocks a shape launches, so the first call of each bucket (device, dtype, head dim, causal, and the powers of
// two at or above L, S and B * Hq) times every tiling that fits the device's shared memory and keeps the
// fastest (binding_utils.h). GPTFAST_CUDA_ATTENTION_FWD_TILING=i forces tiling i (the GPU tests of each).
std::string tiling_name(int head_dim, int i) {
  const AttentionFwdTiling t = attention_fwd_tiling(head_dim, i);
  return std::to_string(t.block_m) + "x" + std::to_string(t.block_n);
}

void choose_tiling(AttentionParams& p, int device, cudaStream_t stream) {
  const int count = attention_fwd_tilings(p.head_dim);
  const std::string what = "a tiling index for head dim " + std::to_string(p.head_dim);
  if (const std::optional<int> forced = forced_choice("GPTFAST_CUDA_ATTENTION_FWD_TILING", count, kFwd, what)) {
    p.fwd_tiling = *forced;
    return;
  }
  if (!autotune_enabled() || int64_t(p.batch) * p.heads_q * p.len_q == 0 || p.len_k == 0) return;
  static PickCache<7> picks;
  const PickCache<7>::Key key{device, static_cast<int64_t>(p.dtype), p.head_dim, p.causal, pow2_bucket(p.len_q),
                              pow2_bucket(p.len_k), pow2_bucket(int64_t(p.batch) * p.heads_q)};
  AttentionParams t = p;
  const std::optional<int> pick = timed_pick(
      picks, key, count, stream, kFwd,
      [&](int i) {
        t.fwd_tiling = i;
        check_launch(attention_fwd_launch(t, stream), kFwd);
      },
      [&](int i) {
        return attention_fwd_tiling(p.head_dim, i).smem_bytes >
               static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
      },
      [&] {
        return std::string(dtype_name(p.dtype)) + " D=" + std::to_string(p.head_dim) +
               (p.causal ? " causal" : " non-causal") + " L<=" + std::to_string(key[4]) +
               " S<=" + std::to_string(key[5]) + " B*Hq<=" + std::to_string(key[6]);
      },
      [&](int i) { return tiling_name(p.head_dim, i); });
  p.fwd_tiling = pick.value_or(0);
}

// q (B, Hq, L, D), k and v (B, Hk, S, D) -> (out (B, Hq, L, D), lse (B, Hq, L) fp32).
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                                 bool is_causal, double scale, const at::Tensor& rng) {
  AttentionParams p = check_inputs(q, k, v, attn_mask, dropout_p, kFwd);
  c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qa = aligned_rows(q), ka = aligned_rows(k), va = aligned_rows(v);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.q = qa.data_ptr();
  p.k = ka.data_ptr();
  p.v = va.data_ptr();
  p.q_strides = strides_of(qa);
  p.k_strides = strides_of(ka);
  p.v_strides = strides_of(va);
  p.out = out.data_ptr();
  p.out_strides = strides_of(out);
  p.lse = lse.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  choose_tiling(p, q.get_device(), stream);
  check_smem(attention_fwd_tiling(p.head_dim, p.fwd_tiling).smem_bytes, kFwd);
  check_launch(attention_fwd_launch(p, stream), kFwd);
  return {out, lse};
}

// dout, out (B, Hq, L, D), lse (B, Hq, L) -> (dq, dk, dv) in q's dtype, dq like q, dk and dv like k.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    bool is_causal, double scale, const at::Tensor& rng) {
  AttentionParams p = check_inputs(q, k, v, attn_mask, dropout_p, kBwd);
  check_same_device(q, dout, kBwd, "dout");
  check_same_device(q, out, kBwd, "out");
  check_same_device(q, lse, kBwd, "lse");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), kBwd, ": dout and out must have q's shape ",
              q.sizes(), ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), kBwd,
              ": dout and out must have q's dtype ", q.scalar_type(), ", got ", dout.scalar_type(), " and ",
              out.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              kBwd, ": lse must be (B, Hq, L) = ", q.sizes().slice(0, 3), ", got ", lse.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  check_smem(attention_bwd_smem_bytes(p.head_dim), kBwd);
  const at::Tensor qa = aligned_rows(q), ka = aligned_rows(k), va = aligned_rows(v);
  const at::Tensor da = aligned_rows(dout), oa = aligned_rows(out);
  const at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, f32);
  at::Tensor dq_accum = at::zeros(q.sizes(), f32);
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  p.q = qa.data_ptr();
  p.k = ka.data_ptr();
  p.v = va.data_ptr();
  p.q_strides = strides_of(qa);
  p.k_strides = strides_of(ka);
  p.v_strides = strides_of(va);
  p.out = oa.data_ptr();
  p.out_strides = strides_of(oa);
  p.dout = da.data_ptr();
  p.dout_strides = strides_of(da);
  p.lse = lse_f.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  check_launch(attention_bwd_launch(p, at::cuda::getCurrentCUDAStream().stream()), kBwd);
  return {dq_accum.to(q.scalar_type()), dk, dv};
}

}  // namespace
}  // namespace gptfast::cuda

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) {
  m.impl("attention_fwd", &gptfast::cuda::attention_fwd);
  m.impl("attention_bwd", &gptfast::cuda::attention_bwd);
}
