"""Peak memory of an LM head and its loss, forward+backward: torch, ops.cross_entropy, its inplace_backward.

    python benchmarks/cross_entropy_inplace_memory.py                       # CPU: the cpu backend, fp32
    python benchmarks/cross_entropy_inplace_memory.py --tokens 8192 --hidden 4096 --vocab 128256 \
        --dtype bfloat16 --backend triton                                   # a GPU

Each step is `cross_entropy(hidden @ weight.T, target).backward()` on leaves whose gradients are cleared
before it. The figure is gptfast.bench.memory.peak_bytes (the CUDA allocator's peak, or on the CPU the running
sum of the profiler's allocator events) above what was allocated before, the gradients included. The step
peaks in the loss's backward, where the default holds the logits and their dlogits; the in-place backward
writes dlogits over the logits, so it saves one (M, V) buffer less the dW and dhidden that the matmul's
backward then adds.
"""

import argparse

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backend", default=None, help="gptfast backend (default: the fastest one here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from gptfast import ops
    from gptfast.bench.memory import method, peak_bytes

    torch.manual_seed(0)
    M, H, V, dtype = args.tokens, args.hidden, args.vocab, getattr(torch, args.dtype)
    hidden = torch.randn(M, H, device=args.device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=args.device) / H**0.5).to(dtype).requires_grad_()
    target = torch.randint(0, V, (M,), device=args.device)
    losses = {
        "torch F.cross_entropy": lambda x: F.cross_entropy(x, target),
        "ops.cross_entropy": lambda x: ops.cross_entropy(x, target, backend=args.backend),
        "ops.cross_entropy(inplace_backward=True)": lambda x: ops.cross_entropy(
            x, target, inplace_backward=True, backend=args.backend
        ),
    }

    def peak(loss_fn) -> int:
        hidden.grad = weight.grad = None
        return peak_bytes(lambda: loss_fn(hidden @ weight.T).backward(), args.device)

    for loss_fn in losses.values():
        peak(loss_fn)  # warm-up: op registration and first-call allocations are not the step's
    mib = 2**20
    logits = M * V * hidden.element_size() / mib
    print(f"M={M} H={H} V={V} {args.dtype} on {args.device} ({method(args.device)}); logits {logits:.0f} MiB")
    base = None
    for name, loss_fn in losses.items():
        p = peak(loss_fn)
        base = base or p
        print(f"  {name:<42} {p / mib:9.1f} MiB  {p / base:6.1%} of torch")


if __name__ == "__main__":
    main()
