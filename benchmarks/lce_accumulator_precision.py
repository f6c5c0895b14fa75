"""How linear_cross_entropy may sum its bf16 gradients (design.md: accumulate in fp32, error <= 2x torch's).

A linear cross-entropy chunked over tokens adds one dweight contribution per chunk. Summing them in bf16 (as
Liger-Kernel does) rounds the running sum once per chunk; an fp32 accumulator costs 4 bytes per weight on top
of the gradient. Taking dweight by vocab slices instead (the Triton backward for bf16 inputs of several
chunks) writes each slice's rows with one GEMM over all tokens, so nothing is summed across GEMMs; dhidden is
then the sum over slices. This measures max|grad - reference| on random bf16 inputs, the reference in
float64, for
  - torch unfused: bf16 logits, bf16 dlogits, one GEMM per gradient (the yardstick of the tolerance rule);
  - dW over token chunks, with an fp32 accumulator, and with a bf16 one (addmm in bf16, fp32 inside);
  - dW by vocab slices;
  - dH over vocab slices, with an fp32 accumulator (what gptfast does), and with each slice's term rounded
    to bf16 before an fp32 add (which would spare the fp32 operands where no mixed-dtype matmul exists);
and prints each error as a multiple of torch's. The rule allows 2x.

    python benchmarks/lce_accumulator_precision.py [--tokens 8192 --hidden 256 --vocab 16384 --chunk 1024]
"""

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    M, H, V, C = args.tokens, args.hidden, args.vocab, args.chunk
    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(M, H, generator=g).bfloat16()
    weight = (0.05 * torch.randn(V, H, generator=g)).bfloat16()
    target = torch.randint(0, V, (M,), generator=g)

    def dlogits(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """d sum(loss) / d logits = softmax - onehot, in logits' precision (fp32 math for bf16)."""
        p = torch.softmax(logits.double() if logits.dtype == torch.float64 else logits.float(), dim=-1)
        p[torch.arange(len(rows)), rows] -= 1
        return p

    d_ref = dlogits(hidden.double() @ weight.double().T, target)
    ref_w, ref_h = d_ref.T @ hidden.double(), d_ref @ weight.double()
    d_bf16 = dlogits(hidden @ weight.T, target).bfloat16()
    unfused_w, unfused_h = d_bf16.T @ hidden, d_bf16 @ weight
    acc32 = torch.zeros(V, H)
    acc16 = torch.zeros(V, H, dtype=torch.bfloat16)
    for start in range(0, M, C):
        h_c, t_c = hidden[start : start + C], target[start : start + C]
        d_c = dlogits(h_c @ weight.T, t_c).bfloat16()
        acc32.addmm_(d_c.T.float(), h_c.float())
        acc16 = torch.addmm(acc16, d_c.T, h_c)
    S = max(256, C * V // M)  # kernels/linear_cross_entropy.py's slice width for this chunk size
    sliced_w = torch.empty(V, H, dtype=torch.bfloat16)
    h32, h_rounded = torch.zeros(M, H), torch.zeros(M, H)
    for v0 in range(0, V, S):
        d_s = d_bf16[:, v0 : v0 + S]  # what one slice's kernel writes (fp32 math, one rounding)
        torch.mm(d_s.T, hidden, out=sliced_w[v0 : v0 + S])
        h32.addmm_(d_s.float(), weight[v0 : v0 + S].float())
        h_rounded += d_s @ weight[v0 : v0 + S]

    def err(x, ref):
        return (x.double() - ref).abs().max().item()

    base_w, base_h = err(unfused_w, ref_w), err(unfused_h, ref_h)
    print(f"M={M} H={H} V={V}, {-(-M // C)} token chunks of {C}, {-(-V // S)} vocab slices of {S}")
    rows = [
        ("dW torch unfused (bf16)", err(unfused_w, ref_w), base_w),
        ("dW chunks, fp32 accumulator", err(acc32.bfloat16(), ref_w), base_w),
        ("dW chunks, bf16 accumulator", err(acc16, ref_w), base_w),
        ("dW by vocab slices", err(sliced_w, ref_w), base_w),
        ("dH torch unfused (bf16)", err(unfused_h, ref_h), base_h),
        ("dH slices, fp32 accumulator", err(h32.bfloat16(), ref_h), base_h),
        ("dH slices, bf16-rounded terms", err(h_rounded.bfloat16(), ref_h), base_h),
    ]
    for name, e, base in rows:
        print(f"  {name:<30} max error {e:.3e}  = {e / base:.2f}x torch's")


if __name__ == "__main__":
    main()
