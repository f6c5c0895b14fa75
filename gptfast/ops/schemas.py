"""The op-pair schemas every backend implements (the same strings are in csrc/ops.cpp; a test keeps them equal).

Each op is a forward/backward pair with one contract on every backend. Shapes (M rows, N or V columns):

softmax_fwd(x[M,N], scale, causal_rows) -> y[M,N]
    y = softmax(scale * x) per row. causal_rows = L > 0 masks column j of row r when j > r % L (rows are the
    flattened (..., L, N) score matrices, top-left aligned); 0 means no mask.
softmax_bwd(dy, y, scale, causal_rows) -> dx = scale * y * (dy - rowsum(dy * y))

cross_entropy_fwd(logits[M,V], target[M], ignore_index, label_smoothing, z_loss) -> (loss[M], lse[M])
    loss and lse in fp32 (fp64 for fp64 logits); ignored rows have loss 0.
cross_entropy_bwd(dloss[M], logits, target, lse, ignore_index, label_smoothing, z_loss) -> dlogits[M,V]
cross_entropy_bwd_inplace(dloss[M], logits[M,V] (contiguous), target, lse, ...) -> ()
    the same dlogits written over logits (ops.cross_entropy's inplace_backward=True)

linear_cross_entropy_fwd(hidden[M,H], weight[V,H], target[M], bias[V]?, ..., chunk_size, with_grad)
    -> (loss[M], lse[M], dhidden[M,H], dweight[V,H], dbias[V])
    the logits hidden @ weight.T + bias exist chunk_size rows at a time. With with_grad the three gradients
    are those of loss.sum() (computed during the forward, as each chunk's logits are in hand); without it
    they are empty tensors.
linear_cross_entropy_bwd(dloss[M], hidden, weight, target, bias?, lse, ..., chunk_size)
    -> (dhidden, dweight, dbias)   recomputes the logits chunk by chunk (or, for fp16/bf16 on the triton and
    cuda backends, by vocab slices: ops.linear_cross_entropy.takes_vocab_slices); dbias is empty when bias
    is None.

attention_fwd(q[B,Hq,L,D], k[B,Hk,S,D], v[B,Hk,S,Dv], attn_mask?, dropout_p, is_causal, scale, rng[2])
    -> (out[B,Hq,L,Dv], lse[B,Hq,L] fp32)
    Hq % Hk == 0 (query head h reads kv head h // (Hq // Hk)). attn_mask is bool (True keeps) or additive
    float, broadcastable to (B,Hq,L,S). is_causal keeps key j for query i when j <= i (top-left, as torch).
    rng = int64 (seed, offset) on the CPU, read by the dropout of both passes. A row with no key left gives
    out = 0 and lse = -inf.
attention_bwd(dout, q, k, v, attn_mask?, out, lse, dropout_p, is_causal, scale, rng) -> (dq, dk, dv)
    out and the gradients are contiguous whatever the strides of q, k and v.
"""

SCHEMAS = {
    "softmax_fwd": "(Tensor x, float scale, int causal_rows) -> Tensor",
    "softmax_bwd": "(Tensor dy, Tensor y, float scale, int causal_rows) -> Tensor",
    "cross_entropy_fwd": (
        "(Tensor logits, Tensor target, int ignore_index, float label_smoothing, float z_loss)"
        " -> (Tensor, Tensor)"
    ),
    "cross_entropy_bwd": (
        "(Tensor dloss, Tensor logits, Tensor target, Tensor lse, int ignore_index, float label_smoothing,"
        " float z_loss) -> Tensor"
    ),
    "cross_entropy_bwd_inplace": (
        "(Tensor dloss, Tensor(a!) logits, Tensor target, Tensor lse, int ignore_index,"
        " float label_smoothing, float z_loss) -> ()"
    ),
    "linear_cross_entropy_fwd": (
        "(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, float label_smoothing,"
        " float z_loss, int chunk_size, bool with_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "linear_cross_entropy_bwd": (
        "(Tensor dloss, Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor lse, int ignore_index,"
        " float label_smoothing, float z_loss, int chunk_size) -> (Tensor, Tensor, Tensor)"
    ),
    "attention_fwd": (
        "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal, float scale,"
        " Tensor rng) -> (Tensor, Tensor)"
    ),
    "attention_bwd": (
        "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor out, Tensor lse, float dropout_p,"
        " bool is_causal, float scale, Tensor rng) -> (Tensor, Tensor, Tensor)"
    ),
}
