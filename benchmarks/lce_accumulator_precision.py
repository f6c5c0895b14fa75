"""Why linear_cross_entropy keeps an fp32 dweight accumulator for bf16 inputs (design.md: accumulate in fp32).

A chunked linear cross-entropy adds one dweight contribution per chunk of tokens. Accumulating them in bf16
(as Liger-Kernel does, and which would cut the op's peak memory by the 2 bytes per weight the fp32 accumulator
costs) rounds the running sum once per chunk. This measures max|dW - reference| on random bf16 inputs, the
reference in float64, for
  - torch unfused: bf16 logits, bf16 dlogits, one dW GEMM (the error yardstick of the tolerance rule);
  - chunks with an fp32 accumulator (what gptfast does);
  - chunks with a bf16 accumulator (addmm in bf16 with fp32 math inside each GEMM);
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

    reference = dlogits(hidden.double() @ weight.double().T, target).T @ hidden.double()
    unfused = (dlogits(hidden @ weight.T, target).bfloat16().T @ hidden).double()
    acc32 = torch.zeros(V, H)
    acc16 = torch.zeros(V, H, dtype=torch.bfloat16)
    for start in range(0, M, C):
        h_c, t_c = hidden[start : start + C], target[start : start + C]
        d_c = dlogits(h_c @ weight.T, t_c).bfloat16()
        acc32.addmm_(d_c.T.float(), h_c.float())
        acc16 = torch.addmm(acc16, d_c.T, h_c)
    errors = {
        "torch unfused (bf16)": (unfused - reference).abs().max().item(),
        "chunks, fp32 accumulator": (acc32.bfloat16().double() - reference).abs().max().item(),
        "chunks, bf16 accumulator": (acc16.double() - reference).abs().max().item(),
    }
    base = errors["torch unfused (bf16)"]
    print(f"M={M} H={H} V={V}, {-(-M // C)} chunks of {C}; max|reference| = {reference.abs().max().item():.3g}")
    for name, err in errors.items():
        print(f"  {name:<26} max error {err:.3e}  = {err / base:.2f}x torch's")


if __name__ == "__main__":
    main()
