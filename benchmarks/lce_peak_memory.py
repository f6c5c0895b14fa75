"""Peak memory of one linear_cross_entropy forward+backward against unfused torch, on any device and dtype.

    python benchmarks/lce_peak_memory.py --tokens 2048 --hidden 1024 --vocab 8192 --dtype float16 \
        --chunk 256 --backend triton        # on a CPU machine: the Triton interpreter, about 5 minutes

Both run `loss.backward()` on fresh leaves; the figure is gptfast.bench.memory.peak_bytes (the CUDA
allocator's peak, or on the CPU the running sum of the profiler's allocator events), above what was allocated
before and including the gradients. The backend's host-side allocation pattern is the same under the Triton
interpreter as on a GPU, except where a path differs by device (the CPU has no mixed-dtype addmm, so the
Triton backward's fp32 dhidden accumulation copies its operands to fp32 there).
"""

import argparse
import os

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--chunk", type=int, default=None, help="chunk_size (default: the op's own rule)")
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cpu" and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from gptfast import ops
    from gptfast.bench.memory import peak_bytes

    torch.manual_seed(0)
    M, H, V, dtype = args.tokens, args.hidden, args.vocab, getattr(torch, args.dtype)
    hidden = torch.randn(M, H, device=args.device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=args.device) / H**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, V, (M,), device=args.device)

    def step(loss_fn):
        def run():
            hidden.grad = weight.grad = None
            loss_fn().backward()
            return hidden.grad, weight.grad

        return run

    fused = step(
        lambda: ops.linear_cross_entropy(hidden, weight, target, chunk_size=args.chunk, backend=args.backend)
    )
    unfused = step(lambda: F.cross_entropy(hidden @ weight.T, target))
    fused(), unfused()  # warm-up: registration and first-call allocations are not the op's
    f, u = peak_bytes(fused, args.device), peak_bytes(unfused, args.device)
    mib = 2**20
    print(
        f"M={M} H={H} V={V} {args.dtype} chunk={args.chunk or 'default'} {args.backend} on {args.device}: "
        f"fused {f / mib:.1f} MiB, unfused torch {u / mib:.1f} MiB, {f / u:.1%}; "
        f"dweight alone {V * H * hidden.element_size() / mib:.1f} MiB"
    )


if __name__ == "__main__":
    main()
