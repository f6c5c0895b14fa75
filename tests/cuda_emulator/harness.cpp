// C entry points over the kernels' launchers, for ctypes (tests/ops/test_cuda_backend.py builds this with the
// kernel files, transformed by the test to launch through emu_launch).
#include "emu.h"
#include "softmax_params.h"
#include "cross_entropy_params.h"
#include "attention_params.h"
using namespace gptfast::cuda;
// A launcher's status, or 99 when the emulation saw a fault the hardware would not forgive (emu.h).
static int emu_status(cudaError_t rc) { return emu_fault.exchange(0) ? 99 : int(rc); }
static int emu_softmax_kernel = 0;  // SoftmaxParams::kernel of the next emu_softmax calls
extern "C" {
void emu_set_eager_copies(int eager) { emu_eager_copies.store(eager != 0); }
void emu_set_softmax_kernel(int kernel) { emu_softmax_kernel = kernel; }
// softmax_kernel_choices for contiguous (rows, cols) matrices at 16-byte aligned addresses (fake pointers:
// nothing is read).
int emu_softmax_kernel_choices(int fwd, int64_t cols, int dtype) {
  SoftmaxParams p;
  p.dtype = DType(dtype);
  p.rows = 1; p.cols = cols; p.x_row_stride = p.y_row_stride = p.dy_row_stride = p.out_row_stride = cols;
  p.x = p.y = p.dy = p.out = reinterpret_cast<void*>(uintptr_t(1) << 20);
  return softmax_kernel_choices(p, fwd != 0);
}
int emu_softmax(int fwd, const void* a, const void* b, void* out, int64_t rows, int64_t cols, int64_t sa, int64_t sb,
                int64_t so, float scale, int64_t causal_rows, int dtype) {
  SoftmaxParams p;
  p.kernel = emu_softmax_kernel;
  p.dtype = DType(dtype);
  p.rows = rows; p.cols = cols; p.scale = scale; p.causal_rows = causal_rows; p.out = out; p.out_row_stride = so;
  if (fwd) { p.x = a; p.x_row_stride = sa; return emu_status(softmax_fwd_launch(p, nullptr)); }
  p.y = a; p.y_row_stride = sa; p.dy = b; p.dy_row_stride = sb;
  return emu_status(softmax_bwd_launch(p, nullptr));
}
int emu_ce(int fwd, const void* logits, int64_t ls, const void* target, int t32, float* loss, float* lse,
           const float* lse_in, const float* dloss, void* dlogits, int64_t ds, int64_t rows, int64_t cols,
           int64_t ignore, double smooth, double z, int dtype, int64_t col_offset, int64_t vocab) {
  CrossEntropyParams p;
  p.dtype = DType(dtype);
  p.logits = logits; p.logits_row_stride = ls; p.target = target; p.target_int32 = t32; p.loss = loss; p.lse = lse;
  p.lse_in = lse_in; p.dloss = dloss; p.dlogits = dlogits; p.dlogits_row_stride = ds; p.rows = rows; p.cols = cols;
  p.ignore_index = ignore; p.label_smoothing = smooth; p.z_loss = z; p.col_offset = col_offset; p.vocab = vocab;
  return emu_status(fwd ? cross_entropy_fwd_launch(p, nullptr) : cross_entropy_bwd_launch(p, nullptr));
}
// strides: 3 per tensor (batch, head, row) for q, k, v, out, dout
int emu_attn(int fwd, const void* q, const void* k, const void* v, void* out, float* lse, const int64_t* st,
             int B, int Hq, int Hk, int L, int S, int D, float scale, int causal, int dtype,
             const void* dout, float* delta, float* dq, void* dk, void* dv, int fwd_tiling) {
  AttentionParams p;
  p.fwd_tiling = fwd_tiling;
  p.q = q; p.k = k; p.v = v; p.out = out; p.lse = lse;
  p.q_strides = {st[0], st[1], st[2]}; p.k_strides = {st[3], st[4], st[5]}; p.v_strides = {st[6], st[7], st[8]};
  p.out_strides = {st[9], st[10], st[11]}; p.dout_strides = {st[12], st[13], st[14]};
  p.batch = B; p.heads_q = Hq; p.heads_kv = Hk; p.len_q = L; p.len_k = S; p.head_dim = D; p.scale = scale;
  p.causal = causal; p.dtype = DType(dtype); p.dout = dout; p.delta = delta; p.dq_accum = dq; p.dk = dk; p.dv = dv;
  return emu_status(fwd ? attention_fwd_launch(p, nullptr) : attention_bwd_launch(p, nullptr));
}
}
