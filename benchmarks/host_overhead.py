"""Host time per call of the public ops at tiny shapes, where the kernels do next to nothing.

That time is what a GPU running mid-size kernels waits for once the host falls behind (at 2baac1f, the
4096 x 32768 cross-entropy on an H200 ran at 0.56x torch).

    python benchmarks/host_overhead.py                 # cpu backend (the C++ kernels), 9 rounds
    python benchmarks/host_overhead.py --backend reference --rounds 15
    python benchmarks/host_overhead.py --device cuda --backend triton,cuda   # on a GPU (scripts/gpu_check.sh)

Two tables, each measured alternately in one run (rounds of --calls calls, best round kept, so load from other
processes hits both sides alike):
- the public op (checks, backend selection, layout, kernels, autograd) against the torch op: F.cross_entropy,
  torch.softmax, F.scaled_dot_product_attention;
- the dispatch path alone, same op, backend and arguments: _library.call (the eager autograd.Function every
  public op takes) against the registered op through the dispatcher's torch.library autograd, which is what
  torch.compile traces and what every eager call took before _library.call.
One CPU thread, so that the C++ kernels' thread pool does not enter the figure. On CUDA each round ends with a
synchronize inside the timed region, so a GPU slower than the host would show (at these sizes it never is).
"""
import argparse
import contextlib
import time

import torch
import torch.nn.functional as F


def cases(backend: str, device: str):
    """(public, dispatch): name -> (torch or registered step, gptfast step); each step is one call."""
    from gptfast import ops
    from gptfast.ops import _library

    g = torch.Generator().manual_seed(0)
    # On CUDA bf16 and head dim 64, which the cuda backend's attention takes; on the CPU fp32.
    dtype, head_dim = (torch.bfloat16, 64) if device == "cuda" else (torch.float32, 16)
    x = torch.randn(8, 16, generator=g).to(device, dtype).requires_grad_()
    t = torch.randint(0, 16, (8,), generator=g).to(device)
    q = torch.randn(1, 2, 8, head_dim, generator=g).to(device, dtype).requires_grad_()
    rng = torch.zeros(2, dtype=torch.int64)
    args = {
        "softmax": (x, 1.0, 0),
        "cross_entropy": (x, t, -100, 0.0, 0.0),
        "attention": (q, q, q, None, 0.0, True, head_dim**-0.5, rng),
    }
    for op in args:
        _library.resolve(op, x.device, backend)

    def registered(op):
        return lambda: _library.fwd(op, backend)(*args[op])[0].sum().backward()

    def called(op):
        return lambda: _library.call(op, backend, *args[op])[0].sum().backward()

    public = {
        "softmax fwd+bwd": (
            lambda: torch.softmax(x, -1).sum().backward(),
            lambda: ops.softmax(x, backend=backend).sum().backward(),
        ),
        "cross_entropy fwd+bwd": (
            lambda: F.cross_entropy(x, t).backward(),
            lambda: ops.cross_entropy(x, t, backend=backend).backward(),
        ),
        "attention fwd+bwd": (
            lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward(),
            lambda: ops.scaled_dot_product_attention(q, q, q, is_causal=True, backend=backend)
            .sum().backward(),
        ),
        "softmax no-grad": (lambda: torch.softmax(x, -1), lambda: ops.softmax(x, backend=backend)),
    }
    dispatch = {f"{op} fwd+bwd": (registered(op), called(op)) for op in args}
    dispatch["softmax no-grad"] = (
        lambda: _library.fwd("softmax", backend)(*args["softmax"]),
        lambda: _library.call("softmax", backend, *args["softmax"]),
    )
    return public, dispatch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_round(step, calls: int, no_grad: bool) -> float:
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        _sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        _sync()
        return (time.perf_counter() - t0) / calls


def measure(table: dict, rounds: int, calls: int) -> dict:
    """name -> (best us of the first step, of the second)."""
    result = {}
    for case, steps in table.items():
        no_grad = "no-grad" in case
        for step in steps:  # warm-up: the first calls register ops and fill caches
            best_round(step, 20, no_grad)
        best = [float("inf")] * len(steps)
        for _ in range(rounds):
            for i, step in enumerate(steps):
                best[i] = min(best[i], best_round(step, calls, no_grad))
        result[case] = tuple(b * 1e6 for b in best)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default=None, help="comma-separated (default: cpu, or triton on cuda)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for backend in (args.backend or ("cpu" if args.device == "cpu" else "triton")).split(","):
        public, dispatch = cases(backend, args.device)
        print(f"host time per call (us), best of {args.rounds} rounds of {args.calls}; "
              f"backend {backend} on {args.device}")
        for title, table, base in (("public op", public, "torch"), ("dispatch path", dispatch, "registered")):
            print(f"\n{title:24s} {base:>10s} {'gptfast':>8s}  gptfast time / {base}")
            for case, (theirs, ours) in measure(table, args.rounds, args.calls).items():
                print(f"{case:24s} {theirs:10.1f} {ours:8.1f}  {ours / theirs:.2f}x")
        print()


if __name__ == "__main__":
    main()
