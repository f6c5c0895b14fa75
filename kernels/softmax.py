"""Triton softmax: y = softmax(scale * x) over the rows of an (M, N) matrix, causal mask fused.

Two forward bodies, behind one kernel (constexpr ONLINE) so the GPU autotuner can time one against the other:
- the single pass, for rows that fit in registers (N <= SINGLE_PASS_MAX): one read and one write. Each program
  holds a [ROWS, BLOCK] tile of whole rows (several short rows per program, so that short rows still move
  enough bytes per program).
- the online pass: one program per row streams BLOCK columns at a time. Pass 1 keeps a running max m and sum d
  (online softmax: d <- d * exp(m_old - m_new) + sum exp(s - m_new)); pass 2 re-reads the row, mostly from L2,
  and writes exp(s - m) / d.
config(M, N) picks by row length when one config runs (the interpreter, GPTFAST_AUTOTUNE=0);
candidates(M, N) lists what the autotuner times on a GPU. The backward, dx = scale * y * (dy - rowsum(dy *
y)), has the same two bodies from the saved y: one read of y and dy and one write when the row fits, and a
dot-product pass first when it does not.

Causal (causal_rows = L > 0): row r of the flattened stack of (L, N) score matrices keeps columns j <= r % L.
Masked columns are never read and are written as 0. Column 0 is always kept, so a row is fully masked only
when its inputs are all -inf; such a row gives zeros, as the reference does.

Shapes: x, y, dy, dx are (M, N), row-major contiguous. Math is fp32 for fp16/bf16/fp32 inputs and fp64 for
fp64 inputs; outputs have the input's dtype. All offsets are int64 (M * N may exceed 2^31).
"""

import functools

import torch
import triton
import triton.language as tl

from gptfast import backends

from . import _tuning

SINGLE_PASS_MAX = 32768  # longest row kept whole in registers (fp32: 32 values per thread at 32 warps)
ONLINE_BLOCK = 8192  # columns per step of the multi-block path
ROW_TILE = 4096  # elements a single-pass program aims to hold when rows are short


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _softmax_fwd_tile(
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
def _softmax_fwd_online(
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
def _softmax_bwd_tile(
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
def _softmax_bwd_online(
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


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,
    y_ptr,
    M,
    N,
    scale,
    causal_rows,
    N_BUCKET,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONLINE: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid (cdiv(M, ROWS),): the single-pass tile or, with ONLINE (ROWS = 1), the multi-block row. One kernel
    for both, so the autotuner can time one against the other; N_BUCKET only keys it."""
    if ONLINE:
        _softmax_fwd_online(x_ptr, y_ptr, N, scale, causal_rows, BLOCK, CAUSAL, ACC)
    else:
        _softmax_fwd_tile(x_ptr, y_ptr, M, N, scale, causal_rows, ROWS, BLOCK, CAUSAL, ACC)


@triton.jit
def _softmax_bwd_kernel(
    dy_ptr,
    y_ptr,
    dx_ptr,
    M,
    N,
    scale,
    causal_rows,
    N_BUCKET,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONLINE: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC: tl.constexpr,
):
    """The backward's counterpart of _softmax_fwd_kernel."""
    if ONLINE:
        _softmax_bwd_online(dy_ptr, y_ptr, dx_ptr, N, scale, causal_rows, BLOCK, CAUSAL, ACC)
    else:
        _softmax_bwd_tile(dy_ptr, y_ptr, dx_ptr, M, N, scale, causal_rows, ROWS, BLOCK, CAUSAL, ACC)


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
    block = block or (_tuning.next_power_of_2(N) if N <= SINGLE_PASS_MAX else ONLINE_BLOCK)
    if block >= N:
        rows = min(max(1, ROW_TILE // block), _tuning.next_power_of_2(M))
        return dict(single=True, ROWS=rows, BLOCK=block, num_warps=num_warps_for(rows * block))
    return dict(single=False, ROWS=1, BLOCK=block, num_warps=num_warps_for(block))


def candidates(M: int, N: int, backward: bool = False) -> list[dict]:
    """The configs the GPU autotuner times for (M, N), config(M, N) first (what runs untuned).

    Which wins depends on how many rows an SM keeps in flight, and so on the registers a row takes: a 32k-
    column row in registers leaves room for one 32-warp program per SM, whose loads then stall while it
    reduces and stores. Around the default the list has the single pass with half and twice the warps and
    with twice the rows per program, and for rows over 4096 columns the online path (whose second read of a
    row mostly hits L2) at 4096 and 8192 columns a step. Candidates that would spill are left out."""
    first = config(M, N)
    out = [first]
    if first["single"]:
        block, rows = first["BLOCK"], first["ROWS"]
        more_rows = min(2 * rows, _tuning.next_power_of_2(M))
        for r, w in ((rows, first["num_warps"] // 2), (rows, first["num_warps"] * 2), (more_rows, None)):
            w = w or num_warps_for(r * block)
            if 1 <= w <= 32 and _fits(r * block, w, backward):
                out.append(dict(single=True, ROWS=r, BLOCK=block, num_warps=w))
    if N > 4096:
        for step in (4096, 8192):
            for w in (8, 16):
                if step < N and _fits(step, w, backward):
                    out.append(dict(single=False, ROWS=1, BLOCK=step, num_warps=w))
    return _tuning.unique(out)


def _fits(elements: int, num_warps: int, backward: bool) -> bool:
    """Whether a tile of `elements` fp32 values (two per element in the backward: y and dy) fits a thread's
    register budget at num_warps without spilling: a linear fit to what ptxas reports for these kernels on
    sm_90a (scripts/triton_ptxas.py), against min(255, 65536 / threads) registers a thread."""
    per_thread = elements / (32 * num_warps)
    estimate = (2.5 if backward else 1.5) * per_thread + 8
    return estimate <= min(255, 65536 // (32 * num_warps))


def _meta(c: dict) -> dict:
    return dict(ROWS=c["ROWS"], BLOCK=c["BLOCK"], ONLINE=not c["single"])


def _tuned(kernel, M: int, N: int):
    """(the kernel autotuned over candidates(M, N), None) keyed by N's power-of-two bucket and the causal
    flag, or (None, the config) when one config runs."""
    if not _tuning.enabled():
        return None, config(M, N)
    if isinstance(M, int) and isinstance(N, int):  # not symbolic sizes (torch.compile), which do not hash
        return _tuned_sizes(kernel, M, N)
    return _tuned_sizes.__wrapped__(kernel, M, N)


@functools.lru_cache(maxsize=1024)
def _tuned_sizes(kernel, M: int, N: int):
    # Cached: the candidates and the autotuner's key cost about 10 us of host time per launch.
    cands = candidates(M, N, kernel is _softmax_bwd_kernel)
    if len(cands) == 1:
        return None, cands[0]
    configs = [dict(_meta(c), num_warps=c["num_warps"]) for c in cands]
    return _tuning.autotuned(kernel, configs, ["N_BUCKET", "CAUSAL"]), None


def _run(kernel, M: int, N: int, block, candidate, args: tuple, causal: bool, acc) -> None:
    """Launches `kernel` over an (M, N) problem: the given candidate, the given block's config, the autotuned
    candidates, or the default config."""
    bucket = _tuning.next_power_of_2(max(int(N), 1))
    if candidate is not None:
        tuned, fixed = None, candidate
    elif block is not None:
        tuned, fixed = None, config(M, N, block)
    else:
        tuned, fixed = _tuned(kernel, M, N)
    if tuned is not None:
        launch(tuned)[lambda meta: (triton.cdiv(M, meta["ROWS"]),)](*args, bucket, CAUSAL=causal, ACC=acc)
    else:
        launch(kernel)[(triton.cdiv(M, fixed["ROWS"]),)](
            *args, bucket, **_meta(fixed), CAUSAL=causal, ACC=acc, num_warps=fixed["num_warps"]
        )


def softmax_forward(
    x: torch.Tensor, scale: float, causal_rows: int, block: int | None = None, candidate: dict | None = None
) -> torch.Tensor:
    """y[M, N] = softmax(scale * x) per row. `block` (a power of two) forces the columns per step; a block
    shorter than N takes the online multi-block path (the tests use this to run it on small inputs).
    `candidate`, one of candidates(M, N), forces that config (the tests check each one the autotuner may
    pick)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    M, N = x.shape
    if x.numel() == 0:
        return y
    args = (x, y, M, N, scale, causal_rows)
    _run(_softmax_fwd_kernel, M, N, block, candidate, args, causal_rows > 0, acc_dtype(x.dtype))
    return y


def softmax_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    scale: float,
    causal_rows: int,
    block: int | None = None,
    candidate: dict | None = None,
) -> torch.Tensor:
    """dx[M, N] = scale * y * (dy - rowsum(dy * y)); `block` and `candidate` as in softmax_forward
    (candidate from candidates(M, N, backward=True))."""
    dy, y = dy.contiguous(), y.contiguous()
    dx = torch.empty_like(y)
    M, N = y.shape
    if y.numel() == 0:
        return dx
    args = (dy, y, dx, M, N, scale, causal_rows)
    _run(_softmax_bwd_kernel, M, N, block, candidate, args, causal_rows > 0, acc_dtype(y.dtype))
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


def _case(direction: str, dtype: str, N: int, causal: bool, c: dict) -> dict:
    fn = _softmax_fwd_kernel if direction == "fwd" else _softmax_bwd_kernel
    names = ("x_ptr", "y_ptr") if direction == "fwd" else ("dy_ptr", "y_ptr", "dx_ptr")
    consts = dict(**_meta(c), CAUSAL=causal, ACC=tl.float32)
    sig = {
        **{n: f"*{dtype}" for n in names},
        "M": "i32",
        "N": "i32",
        "scale": "fp32",
        "causal_rows": "i32",
        "N_BUCKET": "i32",
        **{k: "constexpr" for k in consts},
    }
    path = f"online{c['BLOCK']}" if consts["ONLINE"] else f"tile{c['ROWS']}x{c['BLOCK']}"
    return dict(
        name=f"softmax_{direction}_{dtype}_N{N}_causal{int(causal)}_{path}_w{c['num_warps']}",
        fn=fn,
        signature=sig,
        constexprs=consts,
        num_warps=c["num_warps"],
        num_stages=3,
    )


def _compile_cases(every_candidate: bool) -> list[dict]:
    """The default config of each row-length class for every dtype, causal and not; with every_candidate,
    everything the autotuner may pick there. The CPU suite builds the defaults plus every candidate at the
    benchmark's bf16 sizes (8192 and 32768 columns), which cover each kind of candidate."""
    cases = []
    for dtype in ("fp32", "fp16", "bf16"):
        for causal in (False, True):
            # single-pass tiles from short rows (many per program) to 32k-column rows, then the online path
            for N in (64, 1024, 4096, 8192, 16384, 32768, 1 << 18) if not causal else (1024, 32768, 1 << 18):
                tuned = every_candidate or (dtype == "bf16" and not causal and N in (8192, 32768))
                for d in ("fwd", "bwd"):
                    for c in candidates(1 << 20, N, d == "bwd") if tuned else [config(1 << 20, N)]:
                        cases.append(_case(d, dtype, N, causal, c))
    return cases


COMPILE_CASES = with_alignment(_compile_cases(every_candidate=False))
ALL_COMPILE_CASES = with_alignment(_compile_cases(every_candidate=True))
