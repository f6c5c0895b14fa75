"""Triton softmax: y = softmax(scale * x) over the rows of an (M, N) matrix, causal mask fused.

Two forward kernels, picked by row length:
- rows that fit in registers (N <= SINGLE_PASS_MAX): one read and one write. Each program holds a
  [ROWS, BLOCK] tile of whole rows (several short rows per program, so that short rows still move enough
  bytes per program).
- longer rows: one program per row streams BLOCK columns at a time. Pass 1 keeps a running max m and sum d
  (online softmax: d <- d * exp(m_old - m_new) + sum exp(s - m_new)); pass 2 re-reads the row, mostly from L2,
  and writes exp(s - m) / d.
The backward, dx = scale * y * (dy - rowsum(dy * y)), is one kernel from the saved y: one read of y and dy and
one write when the row fits, and a dot-product pass first when it does not.

Causal (causal_rows = L > 0): row r of the flattened stack of (L, N) score matrices keeps columns j <= r % L.
Masked columns are never read and are written as 0. Column 0 is always kept, so a row is fully masked only
when its inputs are all -inf; such a row gives zeros, as the reference does.

Shapes: x, y, dy, dx are (M, N), row-major contiguous. Math is fp32 for fp16/bf16/fp32 inputs and fp64 for
fp64 inputs; outputs have the input's dtype. All offsets are int64 (M * N may exceed 2^31).
"""

import torch
import triton
import triton.language as tl

from gptfast import backends

SINGLE_PASS_MAX = 32768  # longest row kept whole in registers (fp32: 32 values per thread at 32 warps)
ONLINE_BLOCK = 8192  # columns per step of the multi-block path
ROW_TILE = 4096  # elements a single-pass program aims to hold when rows are short


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _softmax_fwd_tile_kernel(
    x_ptr,
    y_ptr,
    M,
    N,
    scale,
    causal_rows,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    keep = inside
    if CAUSAL:
        keep = keep & (cols[None, :] <= (rows % causal_rows)[:, None])
    offsets = rows[:, None] * N + cols[None, :]
    # 1. s = scale * x on kept columns, -inf elsewhere (applied after the scale, so a negative scale is safe)
    s = tl.where(keep, tl.load(x_ptr + offsets, mask=keep, other=0.0).to(ACC) * scale, float("-inf"))
    # 2. y = exp(s - max) / sum; an all -inf row keeps max 0 and sum 0, and gives zeros instead of NaN
    m = tl.max(s, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(s - m[:, None])
    d = tl.sum(e, axis=1)
    inv = 1.0 / tl.where(d == 0.0, 1.0, d)
    tl.store(y_ptr + offsets, (e * inv[:, None]).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _softmax_fwd_online_kernel(
    x_ptr,
    y_ptr,
    N,
    scale,
    causal_rows,
    BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * N
    y_row = y_ptr + row * N
    n_keep = N
    if CAUSAL:
        n_keep = tl.minimum(N, row % causal_rows + 1)
    cols = tl.arange(0, BLOCK)
    # 1. running max m and sum d of exp(s - m) over the kept columns
    m = tl.full((), float("-inf"), ACC)
    d = tl.zeros((), ACC)
    for start in range(0, n_keep, BLOCK):
        c = start + cols
        s = tl.where(
            c < n_keep, tl.load(x_row + c, mask=c < n_keep, other=0.0).to(ACC) * scale, float("-inf")
        )
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(s - m_ref), axis=0)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    inv = 1.0 / tl.where(d == 0.0, 1.0, d)
    # 2. y = exp(s - m) / d, zeros on masked columns
    for start in range(0, N, BLOCK):
        c = start + cols
        s = tl.where(
            c < n_keep, tl.load(x_row + c, mask=c < n_keep, other=0.0).to(ACC) * scale, float("-inf")
        )
        tl.store(y_row + c, (tl.exp(s - m) * inv).to(y_ptr.dtype.element_ty), mask=c < N)


@triton.jit
def _softmax_bwd_tile_kernel(
    dy_ptr,
    y_ptr,
    dx_ptr,
    M,
    N,
    scale,
    causal_rows,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    keep = inside
    if CAUSAL:
        # y is 0 on masked columns, so dx is too: skip reading them
        keep = keep & (cols[None, :] <= (rows % causal_rows)[:, None])
    offsets = rows[:, None] * N + cols[None, :]
    y = tl.load(y_ptr + offsets, mask=keep, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offsets, mask=keep, other=0.0).to(ACC)
    # dx = scale * y * (dy - <dy, y>)
    dot = tl.sum(y * dy, axis=1)
    dx = scale * y * (dy - dot[:, None])
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _softmax_bwd_online_kernel(
    dy_ptr,
    y_ptr,
    dx_ptr,
    N,
    scale,
    causal_rows,
    BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_keep = N
    if CAUSAL:
        n_keep = tl.minimum(N, row % causal_rows + 1)
    cols = tl.arange(0, BLOCK)
    # 1. <dy, y> over the kept columns, accumulated per lane and reduced once
    acc = tl.zeros((BLOCK,), ACC)
    for start in range(0, n_keep, BLOCK):
        c = start + cols
        y = tl.load(y_ptr + row * N + c, mask=c < n_keep, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + row * N + c, mask=c < n_keep, other=0.0).to(ACC)
        acc += y * dy
    dot = tl.sum(acc, axis=0)
    # 2. dx = scale * y * (dy - <dy, y>)
    for start in range(0, N, BLOCK):
        c = start + cols
        y = tl.load(y_ptr + row * N + c, mask=c < n_keep, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + row * N + c, mask=c < n_keep, other=0.0).to(ACC)
        tl.store(dx_ptr + row * N + c, (scale * y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=c < N)


# ---------------------------------------------------------------------------------------------- launchers
def launch(kernel):
    """The kernel as torch.compile traces it (wrap_triton) on GPUs; the plain kernel under the interpreter."""
    return kernel if backends.interpreting() else torch.library.wrap_triton(kernel)


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def num_warps_for(block: int) -> int:
    """Warps per program for a tile of `block` elements: about 16-32 values per thread."""
    return 4 if block <= 2048 else 8 if block <= 4096 else 16 if block <= 16384 else 32


def config(M: int, N: int, block: int | None = None) -> dict:
    """Launch shape for (M, N): single pass (ROWS rows of BLOCK columns) or online (BLOCK columns a step)."""
    block = block or (triton.next_power_of_2(N) if N <= SINGLE_PASS_MAX else ONLINE_BLOCK)
    if block >= N:
        rows = min(max(1, ROW_TILE // block), triton.next_power_of_2(M))
        return dict(single=True, ROWS=rows, BLOCK=block, num_warps=num_warps_for(rows * block))
    return dict(single=False, ROWS=1, BLOCK=block, num_warps=num_warps_for(block))


def softmax_forward(
    x: torch.Tensor, scale: float, causal_rows: int, block: int | None = None
) -> torch.Tensor:
    """y[M, N] = softmax(scale * x) per row. `block` (a power of two) forces the columns per step; a block
    shorter than N takes the online multi-block path (the tests use this to run it on small inputs)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    M, N = x.shape
    if x.numel() == 0:
        return y
    cfg = config(M, N, block)
    common = dict(
        BLOCK=cfg["BLOCK"], CAUSAL=causal_rows > 0, ACC=acc_dtype(x.dtype), num_warps=cfg["num_warps"]
    )
    if cfg["single"]:
        launch(_softmax_fwd_tile_kernel)[(triton.cdiv(M, cfg["ROWS"]),)](
            x, y, M, N, scale, causal_rows, ROWS=cfg["ROWS"], **common
        )
    else:
        launch(_softmax_fwd_online_kernel)[(M,)](x, y, N, scale, causal_rows, **common)
    return y


def softmax_backward(
    dy: torch.Tensor, y: torch.Tensor, scale: float, causal_rows: int, block: int | None = None
) -> torch.Tensor:
    """dx[M, N] = scale * y * (dy - rowsum(dy * y)); `block` as in softmax_forward."""
    dy, y = dy.contiguous(), y.contiguous()
    dx = torch.empty_like(y)
    M, N = y.shape
    if y.numel() == 0:
        return dx
    cfg = config(M, N, block)
    common = dict(
        BLOCK=cfg["BLOCK"], CAUSAL=causal_rows > 0, ACC=acc_dtype(y.dtype), num_warps=cfg["num_warps"]
    )
    if cfg["single"]:
        launch(_softmax_bwd_tile_kernel)[(triton.cdiv(M, cfg["ROWS"]),)](
            dy, y, dx, M, N, scale, causal_rows, ROWS=cfg["ROWS"], **common
        )
    else:
        launch(_softmax_bwd_online_kernel)[(M,)](dy, y, dx, N, scale, causal_rows, **common)
    return dx


# ---------------------------------------------------------------------------------------------- the pair
def softmax_fwd(x: torch.Tensor, scale: float, causal_rows: int) -> torch.Tensor:
    """y[M, N] = softmax(scale * x[M, N]) per row; column j of row r masked when j > r % causal_rows > 0."""
    return softmax_forward(x, scale, causal_rows)


def softmax_bwd(dy: torch.Tensor, y: torch.Tensor, scale: float, causal_rows: int) -> torch.Tensor:
    """dx[M, N] = scale * y * (dy - rowsum(dy * y)) from the saved output y[M, N]."""
    return softmax_backward(dy, y, scale, causal_rows)


# ---------------------------------------------------------------------------------- sm_90a compile grid
def with_alignment(cases: list[dict], plain_dtype: str = "fp16") -> list[dict]:
    """Each case as the GPU launcher specialises it for 16-divisible pointers and sizes (the common,
    vectorised case: "attrs" for triton.compile), plus the unaligned form for the cases whose name has
    `plain_dtype`."""
    out = []
    for case in cases:
        fn, sig = case["fn"], case["signature"]
        names = [n for n, t in sig.items() if t.startswith("*") or t in ("i32", "i64") and n in ALIGNED_INTS]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}
        out.append({**case, "name": case["name"] + "_aligned", "attrs": attrs})
        if plain_dtype in case["name"]:
            out.append(case)
    return out


ALIGNED_INTS = ("N", "V", "stride", "out_stride")


def _compile_cases() -> list[dict]:
    cases = []
    for dtype in ("fp32", "fp16", "bf16"):
        ptrs = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
        bwd_ptrs = {"dy_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}"}
        scalars = {"scale": "fp32", "causal_rows": "i32"}
        for causal in (False, True):
            # the single-pass tiles the launcher picks: short rows (many per program) up to 32k-column rows
            for N in (64, 1024, 4096, 16384, 32768) if not causal else (1024, 32768):
                cfg = config(1 << 20, N)
                consts = dict(ROWS=cfg["ROWS"], BLOCK=cfg["BLOCK"], CAUSAL=causal, ACC=tl.float32)
                for name, fn, p in (
                    ("softmax_fwd_tile", _softmax_fwd_tile_kernel, ptrs),
                    ("softmax_bwd_tile", _softmax_bwd_tile_kernel, bwd_ptrs),
                ):
                    sig = {**p, "M": "i32", "N": "i32", **scalars, **{k: "constexpr" for k in consts}}
                    cases.append(
                        dict(
                            name=f"{name}_{dtype}_N{N}_causal{int(causal)}",
                            fn=fn,
                            signature=sig,
                            constexprs=consts,
                            num_warps=cfg["num_warps"],
                            num_stages=3,
                        )
                    )
            cfg = config(1, 1 << 18)
            consts = dict(BLOCK=cfg["BLOCK"], CAUSAL=causal, ACC=tl.float32)
            for name, fn, p in (
                ("softmax_fwd_online", _softmax_fwd_online_kernel, ptrs),
                ("softmax_bwd_online", _softmax_bwd_online_kernel, bwd_ptrs),
            ):
                sig = {**p, "N": "i32", **scalars, **{k: "constexpr" for k in consts}}
                cases.append(
                    dict(
                        name=f"{name}_{dtype}_causal{int(causal)}",
                        fn=fn,
                        signature=sig,
                        constexprs=consts,
                        num_warps=cfg["num_warps"],
                        num_stages=3,
                    )
                )
    return cases


COMPILE_CASES = with_alignment(_compile_cases())
