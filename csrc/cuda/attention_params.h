// The plain arguments of the CUDA attention kernels (filled by attention_binding.cpp, read by attention.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace gptfast::cuda {

// Strides of a (B, H, rows, head_dim) tensor in elements; the head dim itself is contiguous.
struct Strides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t row = 0;
};

// q (B, Hq, L, D), k and v (B, Hk, S, D), out (B, Hq, L, D) of `dtype` (fp16 or bf16), D = 32, 64, 96 or 128;
// query head h reads kv head h / (Hq / Hk). lse (B, Hq, L) fp32 contiguous: logsumexp of the scaled,
// masked scores, -inf for a row with no key. causal keeps key j for query i when j <= i (top-left).
// Every pointer is 16-byte aligned and every stride a multiple of 8 elements (the binding makes it so).
struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides q_strides, k_strides, v_strides;
  void* out = nullptr;  // forward output; backward input (read for delta)
  Strides out_strides;
  float* lse = nullptr;  // forward output; backward input
  int batch = 0;
  int heads_q = 0;
  int heads_kv = 0;
  int len_q = 0;
  int len_k = 0;
  int head_dim = 0;
  float scale = 1.0f;
  bool causal = false;
  DType dtype = DType::kFloat16;
  int fwd_tiling = 0;  // forward only: an index into the tilings below, 0 = the default for the head dim

  // Backward only.
  const void* dout = nullptr;  // (B, Hq, L, D)
  Strides dout_strides;
  float* delta = nullptr;     // (B, Hq, L) fp32 scratch: rowsum(dout * out)
  float* dq_accum = nullptr;  // (B, Hq, L, D) fp32 contiguous, zero-filled by the caller
  void* dk = nullptr;         // (B, Hk, S, D) contiguous, of `dtype`
  void* dv = nullptr;         // (B, Hk, S, D) contiguous, of `dtype`
};

// The forward's tilings for a head dim, the default (index 0) first: query rows and keys per block, and the
// dynamic shared memory it needs. An index past the list gives {} (attention_fwd_launch refuses it).
constexpr int kAttentionFwdMaxTilings = 3;
struct AttentionFwdTiling {
  int block_m = 0;
  int block_n = 0;
  int64_t smem_bytes = 0;
};
int attention_fwd_tilings(int head_dim);
AttentionFwdTiling attention_fwd_tiling(int head_dim, int tiling);

// Dynamic shared memory the backward needs; the binding checks it (and the forward's) against the device's
// opt-in limit.
int64_t attention_bwd_smem_bytes(int head_dim);

cudaError_t attention_fwd_launch(const AttentionParams& params, cudaStream_t stream);
// Writes dq_accum (scaled, fp32), dk and dv; the caller converts dq_accum to q's dtype.
cudaError_t attention_bwd_launch(const AttentionParams& params, cudaStream_t stream);

}  // namespace gptfast::cuda
