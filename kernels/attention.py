"""FlashAttention-2 forward and backward in Triton: the "triton" backend of ops.scaled_dot_product_attention.

Layout (contract in gptfast/ops/schemas.py): q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv), any strides
with stride(-1) == 1 (the GPT passes views of its fused qkv projection, read in place); out (B, Hq, L, Dv) in
q's dtype and lse (B, Hq, L) fp32, the natural-log log-sum-exp of each score row (-inf for a row with no key
left).

Forward: one program per (query block, head, batch) streams the key blocks with an online softmax (running max
m, running sum l) in the base-2 domain (log2(e) is folded into the scale, so every exponential is one exp2).
Key blocks are visited in two stages: the blocks every row of the query block sees in full, loaded and scored
without any masks, then the few boundary blocks (the causal diagonal and the tail past S) with masks. With
is_causal, key blocks past the diagonal are never loaded. K and V tiles come through masked pointer loads or,
in the TMA configs the autotuner may pick on Hopper, through tensor descriptors made in the kernel (the copy
engine zero-fills rows past S and columns past D). The warp-specialised TMA configs load the Q block through a
descriptor too and run one masked stage over every block: triton splits that loop into a producer warp group
issuing the copies and two consumer warp groups doing the MMAs and the softmax (FlashAttention-3's structure).

Backward (deterministic, no atomics): a small kernel computes delta = rowsum(dO * O); one kernel per key block
accumulates dK and dV over the query blocks (one loop, causal select on each block) and, for GQA, over the
query heads of its group; one kernel per query block accumulates dQ over the key blocks in the forward's two
stages (one masked stage in the warp-specialised configs, whose dK/dV loop also runs over the group's heads
and query blocks as one). Both recompute P = exp2(S * log2(e) - lse * log2(e)) from the saved lse.
With O = (P * Z) V, P = softmax(S), S = scale * Q K^T and Z = keep / (1 - dropout_p) the dropout multiplier
(1 without dropout), the steps are
    1. dV = (P * Z)^T dO                       4. dQ = scale * dS K
    2. dP = (dO V^T) * Z                       5. dK = scale * dS^T Q
    3. dS = P * (dP - delta),  delta = rowsum(dP * P) = rowsum(dO * O)
numbered the same in the kernels below.

Dropout draws a Philox number per score element (b, h, i, j) from (seed, offset) = rng, so the backward
regenerates exactly the forward's mask; `dropout_mask` returns that mask for tests."""

import functools
import inspect
import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from gptfast import backends

from . import _tuning

LOG2E = 1.4426950408889634
# The kernels read these as compile-time constants (triton only lets jit code see constexpr globals).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
# A finite additive mask below -FLT_MAX / log2(e) (transformers' finfo.min padding) would overflow to -inf in
# the base-2 domain and empty its row; it is clamped to this, where it still swamps every score, so a row
# masked that way everywhere averages V with uniform weights, as torch does.
_MASK_FLOOR = tl.constexpr(-2.0e38)
# A natural-log lse below this exists only in such swamped rows (scores never reach it). Their P cannot be
# recovered from lse (its log(sum) was absorbed), so the backward treats them as rows with no key left.
_SWAMPED_LSE = tl.constexpr(-1.0e37)
MAX_HEAD_DIM = 256

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------ helpers
@triton.jit
def _log2_mask(mask):
    """An additive mask tile in the base-2 domain, -inf kept, huge finite values clamped (see _MASK_FLOOR)."""
    swamped = (mask < _MASK_FLOOR) & (mask != float("-inf"))
    return tl.where(swamped, _MASK_FLOOR, mask) * _LOG2E


@triton.jit
def _backward_lse2(lse):
    """The saved lse in the base-2 domain for recomputing P; +inf (P = 0) for a row with no key left or a
    swamped row (see _SWAMPED_LSE)."""
    return tl.where(lse < _SWAMPED_LSE, float("inf"), lse * _LOG2E)


@triton.jit
def _load_tile(
    ptrs, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr
):
    """Loads a (rows, cols) tile, zero outside n_rows x N_COLS; no mask where nothing can fall outside."""
    if CHECK_ROWS:
        if N_COLS == BLOCK_COLS:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    else:
        if N_COLS == BLOCK_COLS:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return tile


@triton.jit
def _dropout_keep(seed, offset, bh, i, j, threshold):
    """True where score (bh, i, j) survives dropout: Philox-4x32 on counter (j, i, bh, offset), key seed.

    i and j broadcast against each other (a column and a row of indices, either way round); the result has the
    full tile's shape. threshold = round(dropout_p * 2^32), so P(keep) = 1 - dropout_p."""
    jj = j + i * 0
    ii = i + j * 0
    zero = ii * 0
    r, _, _, _ = tl.philox(seed, jj, ii, zero + bh, zero + offset.to(tl.int32))
    return r >= threshold.to(tl.uint32)


@triton.jit
def _dropout_mask_kernel(Keep, Rng, L, S, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep mask (B, H, L, S) that the attention kernels draw, for tests."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = tl.load(Rng)
    offset = tl.load(Rng + 1)
    keep = _dropout_keep(seed, offset, bh, offs_m[:, None], offs_n[None, :], threshold)
    ptrs = Keep + bh.to(tl.int64) * L * S + offs_m[:, None].to(tl.int64) * S + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _attn_fwd_block(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    mask_base,
    k_offs,
    v_offs,
    mask_offs,
    offs_m,
    start_n,
    L,
    S,
    qk_scale,
    seed,
    rng_offset,
    bh,
    drop_threshold,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDARY: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Folds the key block at start_n (K and V at k_base / v_base, or through the descriptors) into (acc, l_i,
    m_i)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if USE_TMA:
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
    else:
        k = _load_tile(k_base + k_offs, offs_n, S, offs_d, D, BLOCK_D, BOUNDARY)
        v = _load_tile(v_base + v_offs, offs_n, S, offs_dv, DV, BLOCK_DV, BOUNDARY)
    # With FOLD_SCALE (scale > 0, no additive mask) the scores stay unscaled until the exponent: the
    # scaled row max is the raw max times the scale, and scale * s - m is one FMA per score instead of a
    # multiply and a subtract (the softmax, not the MMAs, bounds this loop on Hopper).
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if not FOLD_SCALE:
        qk = qk * qk_scale
    if MASK_KIND != 0:
        in_bounds = offs_m[:, None] < L
        if BOUNDARY:
            in_bounds = in_bounds & (offs_n[None, :] < S)
        if MASK_KIND == 1:
            keep_mask = tl.load(mask_base + mask_offs, mask=in_bounds, other=0)
            qk = tl.where(keep_mask != 0, qk, float("-inf"))
        else:
            qk += _log2_mask(tl.load(mask_base + mask_offs, mask=in_bounds, other=0.0).to(tl.float32))
    if BOUNDARY:
        valid = offs_n[None, :] < S
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        qk = tl.where(valid, qk, float("-inf"))
    if FOLD_SCALE:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row with no key seen yet has m = -inf; subtracting 0 instead keeps exp2 at 0 rather than NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if FOLD_SCALE:
        p = tl.exp2(qk * qk_scale - m_safe[:, None])
    else:
        p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        # The normaliser l sums P before dropout; only the values P V see the dropped entries.
        p = tl.where(
            _dropout_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], drop_threshold), p, 0.0
        )
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    k_desc,
    v_desc,
    mask_base,
    k_offs,
    v_offs,
    mask_offs,
    offs_m,
    lo,
    hi,
    stride_kn,
    stride_vn,
    stride_mn,
    L,
    S,
    qk_scale,
    seed,
    rng_offset,
    bh,
    drop_threshold,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDARY: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """Folds key blocks [lo, hi) into (acc, l_i, m_i). BOUNDARY blocks get the causal and the key-tail masks.

    Only the scalar base pointers advance; the tile offsets stay loop-invariant, so no tile of 64-bit pointers
    is carried around the loop (that would cost two registers per element and spill). WARP_SPEC (TMA, no mask,
    one BOUNDARY stage: see _warp_spec_ok) hands the loop to triton's warp-specialising pass; tl.range takes
    warp_specialize from triton 3.4 on, and older releases never compile this branch (_WS_STATE).
    """
    if WARP_SPEC:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _attn_fwd_block(
                acc,
                l_i,
                m_i,
                q,
                k_base,
                v_base,
                k_desc,
                v_desc,
                mask_base,
                k_offs,
                v_offs,
                mask_offs,
                offs_m,
                start_n,
                L,
                S,
                qk_scale,
                seed,
                rng_offset,
                bh,
                drop_threshold,
                D,
                DV,
                BLOCK_D,
                BLOCK_DV,
                BLOCK_N,
                BOUNDARY,
                IS_CAUSAL,
                MASK_KIND,
                HAS_DROPOUT,
                PRECISION,
                FOLD_SCALE,
                USE_TMA,
            )
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _attn_fwd_block(
                acc,
                l_i,
                m_i,
                q,
                k_base,
                v_base,
                k_desc,
                v_desc,
                mask_base,
                k_offs,
                v_offs,
                mask_offs,
                offs_m,
                start_n,
                L,
                S,
                qk_scale,
                seed,
                rng_offset,
                bh,
                drop_threshold,
                D,
                DV,
                BLOCK_D,
                BLOCK_DV,
                BLOCK_N,
                BOUNDARY,
                IS_CAUSAL,
                MASK_KIND,
                HAS_DROPOUT,
                PRECISION,
                FOLD_SCALE,
                USE_TMA,
            )
            k_base += BLOCK_N * stride_kn
            v_base += BLOCK_N * stride_vn
            mask_base += BLOCK_N * stride_mn
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Mask,
    Out,
    Lse,
    Rng,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_om,
    Hq,
    L,
    S,
    GROUP,
    qk_scale,
    dropout_scale,
    drop_threshold,
    L_BUCKET,
    S_BUCKET,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(L, BLOCK_M), Hq, B). MASK_KIND: 0 none, 1 bool (True keeps), 2 additive float. FOLD_SCALE:
    qk_scale > 0 and MASK_KIND != 2 (see _attn_fwd_block). L_BUCKET and S_BUCKET only key the autotuner (as
    in the backward kernels)."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        # Later query blocks see more keys: start them first so the grid does not end on a long straggler.
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    bh = b * Hq + h
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_head = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
    if WARP_SPEC:
        q = tl.make_tensor_descriptor(q_head, [L, D], [stride_qm, 1], [BLOCK_M, BLOCK_D]).load([start_m, 0])
    else:
        q_ptrs = (
            q_head
            + start_m.to(tl.int64) * stride_qm
            + (tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :])
        )
        q = _load_tile(q_ptrs, offs_m, L, offs_d, D, BLOCK_D, True)
    k_head = K + b64 * stride_kb + hk64 * stride_kh
    v_head = V + b64 * stride_vb + hk64 * stride_vh
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :]
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_head, [S, D], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_head, [S, DV], [stride_vn, 1], [BLOCK_N, BLOCK_DV])
    else:
        k_desc = k_head
        v_desc = v_head
    mask_head = Mask + b64 * stride_mb + h.to(tl.int64) * stride_mh
    mask_offs = 0
    if MASK_KIND != 0:
        mask_offs = offs_m[:, None].to(tl.int64) * stride_mm + offs_n[None, :] * stride_mn
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)

    # Key block [n, n + BLOCK_N) is seen in full by every row of this block when n + BLOCK_N <= min(start_m +
    # 1, S).
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
        full_hi = tl.minimum(start_m + 1, S) // BLOCK_N * BLOCK_N
    else:
        hi = S
        full_hi = S // BLOCK_N * BLOCK_N
    # The warp-specialised loop advances no pointer: K and V must come through descriptors and no mask be read.
    tl.static_assert(not WARP_SPEC or (USE_TMA and MASK_KIND == 0))
    if WARP_SPEC:
        # triton 3.6's Hopper warp-specialising pass takes one key loop a kernel (a second loop, or a branch in
        # the loop, fails or turns it off): the masked loop then runs over every block.
        full_hi = tl.full([], 0, tl.int32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if not WARP_SPEC:
        acc, l_i, m_i = _attn_fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_head,
            v_head,
            k_desc,
            v_desc,
            mask_head,
            k_offs,
            v_offs,
            mask_offs,
            offs_m,
            0,
            full_hi,
            stride_kn,
            stride_vn,
            stride_mn,
            L,
            S,
            qk_scale,
            seed,
            rng_offset,
            bh,
            drop_threshold,
            D,
            DV,
            BLOCK_D,
            BLOCK_DV,
            BLOCK_N,
            False,
            IS_CAUSAL,
            MASK_KIND,
            HAS_DROPOUT,
            PRECISION,
            FOLD_SCALE,
            USE_TMA,
            WARP_SPEC,
        )
    full_hi64 = full_hi.to(tl.int64)
    acc, l_i, m_i = _attn_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_head + full_hi64 * stride_kn,
        v_head + full_hi64 * stride_vn,
        k_desc,
        v_desc,
        mask_head + full_hi64 * stride_mn,
        k_offs,
        v_offs,
        mask_offs,
        offs_m,
        full_hi,
        hi,
        stride_kn,
        stride_vn,
        stride_mn,
        L,
        S,
        qk_scale,
        seed,
        rng_offset,
        bh,
        drop_threshold,
        D,
        DV,
        BLOCK_D,
        BLOCK_DV,
        BLOCK_N,
        True,
        IS_CAUSAL,
        MASK_KIND,
        HAS_DROPOUT,
        PRECISION,
        FOLD_SCALE,
        USE_TMA,
        WARP_SPEC,
    )

    # A row with no key left has l = 0: its output is 0 and its lse -inf, as torch gives.
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    inv_l = 1.0 / l_safe
    if HAS_DROPOUT:
        inv_l = inv_l * dropout_scale
    out = acc * inv_l[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    o_ptrs = (
        Out
        + b64 * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m[:, None].to(tl.int64) * stride_om
        + offs_dv[None, :]
    )
    if DV == BLOCK_DV:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < L)
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_dv[None, :] < DV))
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


# ----------------------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_delta_kernel(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    Hq,
    L,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32. Grid (cdiv(L, BLOCK_M), Hq, B)."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m[:, None].to(tl.int64)
    o = _load_tile(
        Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows * stride_om + offs_dv[None, :],
        offs_m,
        L,
        offs_dv,
        DV,
        BLOCK_DV,
        True,
    )
    do = _load_tile(
        DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows * stride_dom + offs_dv[None, :],
        offs_m,
        L,
        offs_dv,
        DV,
        BLOCK_DV,
        True,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (b * Hq + h).to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _attn_bwd_dkdv_block(
    dk,
    dv,
    k,
    v,
    q,
    do,
    lse2,
    delta,
    offs_m,
    offs_n,
    mask_base,
    mask_offs,
    L,
    S,
    qk_scale,
    dropout_scale,
    seed,
    rng_offset,
    bh,
    drop_threshold,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Adds one query block (q, do and its rows' lse2 and delta, at offs_m) to dk, dv (key block offs_n), in the
    transposed frame."""
    qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    if MASK_KIND != 0:
        in_bounds = (offs_m[None, :] < L) & (offs_n[:, None] < S)
    if MASK_KIND == 2:
        qk_t += _log2_mask(tl.load(mask_base + mask_offs, mask=in_bounds, other=0.0).to(tl.float32))
    p_t = tl.exp2(qk_t - lse2[None, :])
    if IS_CAUSAL:
        p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
    if MASK_KIND == 1:
        p_t = tl.where(tl.load(mask_base + mask_offs, mask=in_bounds, other=0) != 0, p_t, 0.0)
    # 2. dP = (dO V^T) * Z, with Z = keep / (1 - dropout_p) the dropout multiplier (1 without dropout)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if HAS_DROPOUT:
        keep_t = _dropout_keep(seed, rng_offset, bh, offs_m[None, :], offs_n[:, None], drop_threshold)
        pz_t = tl.where(keep_t, p_t * dropout_scale, 0.0)
        dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
    else:
        pz_t = p_t
    # 1. dV = (P * Z)^T dO (after step 2, which draws the keep mask both need)
    dv = tl.dot(pz_t.to(do.dtype), do, dv, input_precision=PRECISION)
    # 3. dS = P * (dP - delta), delta = rowsum(dP * P) = rowsum(dO * O)
    ds_t = p_t * (dp_t - delta[None, :])
    # 5. dK = scale * dS^T Q (the scale is applied once, after all blocks)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    q_desc,
    do_desc,
    h,
    mask_base,
    q_offs,
    do_offs,
    mask_offs,
    lse_ptr,
    delta_ptr,
    offs_n,
    lo,
    hi,
    stride_qm,
    stride_dom,
    stride_mm,
    L,
    S,
    qk_scale,
    dropout_scale,
    seed,
    rng_offset,
    bh,
    drop_threshold,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Adds the query blocks [lo, hi) of one head to dk, dv (key block offs_n), all in the transposed frame.

    Rows past L load q = dO = 0, delta = 0 and lse = +inf, so their P^T and dS^T columns are exactly 0.
    """
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if USE_TMA:
            q = q_desc.load([h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
            do = do_desc.load([h, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
        else:
            q = _load_tile(q_base + q_offs, offs_m, L, offs_d, D, BLOCK_D, True)
            do = _load_tile(do_base + do_offs, offs_m, L, offs_dv, DV, BLOCK_DV, True)
        lse = tl.load(lse_ptr + offs_m, mask=offs_m < L, other=float("inf"))
        # A row with no key left (lse = -inf) or a swamped one has P = 0: +inf makes exp2 give exactly that.
        lse2 = _backward_lse2(lse)
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < L, other=0.0)
        dk, dv = _attn_bwd_dkdv_block(
            dk,
            dv,
            k,
            v,
            q,
            do,
            lse2,
            delta,
            offs_m,
            offs_n,
            mask_base,
            mask_offs,
            L,
            S,
            qk_scale,
            dropout_scale,
            seed,
            rng_offset,
            bh,
            drop_threshold,
            MASK_KIND,
            HAS_DROPOUT,
            IS_CAUSAL,
            PRECISION,
        )
        q_base += BLOCK_M * stride_qm
        do_base += BLOCK_M * stride_dom
        mask_base += BLOCK_M * stride_mm
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    Mask,
    DO,
    Lse,
    Delta,
    DK,
    DVt,
    Rng,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    Hq,
    L,
    S,
    GROUP,
    qk_scale,
    sm_scale,
    dropout_scale,
    drop_threshold,
    L_BUCKET,
    S_BUCKET,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of kv head hk. Grid (cdiv(S, BLOCK_N), Hk, B); loops over the GROUP query heads
    that read this kv head and over their query blocks, so each dK/dV element has one writer (no atomics)."""
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_n = offs_n[:, None].to(tl.int64)
    if WARP_SPEC:
        # The warp-specialising pass takes no tensor loaded through pointers outside its loop.
        k_head = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
        v_head = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
        k = tl.make_tensor_descriptor(k_head, [S, D], [stride_kn, 1], [BLOCK_N, BLOCK_D]).load([start_n, 0])
        v = tl.make_tensor_descriptor(v_head, [S, DV], [stride_vn, 1], [BLOCK_N, BLOCK_DV]).load([start_n, 0])
    else:
        k = _load_tile(
            K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + rows_n * stride_kn + offs_d[None, :],
            offs_n,
            S,
            offs_d,
            D,
            BLOCK_D,
            True,
        )
        v = _load_tile(
            V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + rows_n * stride_vn + offs_dv[None, :],
            offs_n,
            S,
            offs_dv,
            DV,
            BLOCK_DV,
            True,
        )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)

    q_offs = offs_m0[:, None] * stride_qm + offs_d[None, :]
    do_offs = offs_m0[:, None] * stride_dom + offs_dv[None, :]
    # The mask tile is read transposed, (key, query), like P^T.
    mask_offs = 0
    if MASK_KIND != 0:
        mask_offs = offs_m0[None, :] * stride_mm + rows_n * stride_mn
    # Causal: query i sees key j only when i >= j, so the query blocks start at the one holding row start_n.
    # One loop with the causal select on every block: a separate diagonal loop costs more registers (and
    # spills) than the select costs time.
    lo = 0
    lo64 = 0
    if IS_CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        lo64 = lo.to(tl.int64)
    if USE_TMA:
        # (head, row, column) descriptors over this batch's Q and dO, made once for all GROUP heads
        q_desc = tl.make_tensor_descriptor(
            Q + b64 * stride_qb, [Hq, L, D], [stride_qh, stride_qm, 1], [1, BLOCK_M, BLOCK_D]
        )
        do_desc = tl.make_tensor_descriptor(
            DO + b64 * stride_dob, [Hq, L, DV], [stride_doh, stride_dom, 1], [1, BLOCK_M, BLOCK_DV]
        )
    else:
        q_desc = Q
        do_desc = DO
    tl.static_assert(not WARP_SPEC or (USE_TMA and MASK_KIND == 0))
    if WARP_SPEC:
        # One loop over (query head of the group, query block), as the pass takes one loop; the lse and delta
        # rows come through descriptors too (L % 4 == 0 keeps them 16-byte aligned). Rows past L read 0
        # everywhere: their P^T columns are 1 but dO, dP and delta are 0 there, so they add nothing.
        lse_desc = tl.make_tensor_descriptor(Lse + b64 * Hq * L, [Hq, L], [L, 1], [1, BLOCK_M])
        delta_desc = tl.make_tensor_descriptor(Delta + b64 * Hq * L, [Hq, L], [L, 1], [1, BLOCK_M])
        n_blocks = tl.cdiv(L - lo, BLOCK_M)
        for t in tl.range(0, GROUP * n_blocks, warp_specialize=True):
            h = hk * GROUP + t // n_blocks
            start_m = lo + (t % n_blocks) * BLOCK_M
            q = q_desc.load([h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
            do = do_desc.load([h, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
            dk, dv = _attn_bwd_dkdv_block(
                dk,
                dv,
                k,
                v,
                q,
                do,
                _backward_lse2(lse_desc.load([h, start_m]).reshape(BLOCK_M)),
                delta_desc.load([h, start_m]).reshape(BLOCK_M),
                start_m + offs_m0,
                offs_n,
                Mask,
                mask_offs,
                L,
                S,
                qk_scale,
                dropout_scale,
                seed,
                rng_offset,
                b * Hq + h,
                drop_threshold,
                MASK_KIND,
                HAS_DROPOUT,
                IS_CAUSAL,
                PRECISION,
            )
    else:
        for g in range(GROUP):
            h = hk * GROUP + g
            bh = b * Hq + h
            dk, dv = _attn_bwd_dkdv_inner(
                dk,
                dv,
                k,
                v,
                Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + lo64 * stride_qm,
                DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + lo64 * stride_dom,
                q_desc,
                do_desc,
                h,
                Mask + b64 * stride_mb + h.to(tl.int64) * stride_mh + lo64 * stride_mm,
                q_offs,
                do_offs,
                mask_offs,
                Lse + bh.to(tl.int64) * L,
                Delta + bh.to(tl.int64) * L,
                offs_n,
                lo,
                L,
                stride_qm,
                stride_dom,
                stride_mm,
                L,
                S,
                qk_scale,
                dropout_scale,
                seed,
                rng_offset,
                bh,
                drop_threshold,
                D,
                DV,
                BLOCK_D,
                BLOCK_DV,
                BLOCK_M,
                IS_CAUSAL,
                MASK_KIND,
                HAS_DROPOUT,
                PRECISION,
                USE_TMA,
            )
    dk = dk * sm_scale
    dk_ptrs = DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + rows_n * stride_dkn + offs_d[None, :]
    dv_ptrs = DVt + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + rows_n * stride_dvn + offs_dv[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_d[None, :] < D))
    tl.store(dv_ptrs, dv.to(DVt.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq_block(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    k_desc,
    v_desc,
    mask_base,
    k_offs,
    v_offs,
    mask_offs,
    offs_m,
    start_n,
    L,
    S,
    qk_scale,
    dropout_scale,
    seed,
    rng_offset,
    bh,
    drop_threshold,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDARY: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    DELTA_ONLY: tl.constexpr,
):
    """Adds the key block at start_n to dq (see _attn_bwd_dq_inner)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if USE_TMA:
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
    else:
        k = _load_tile(k_base + k_offs, offs_n, S, offs_d, D, BLOCK_D, BOUNDARY)
        v = _load_tile(v_base + v_offs, offs_n, S, offs_dv, DV, BLOCK_DV, BOUNDARY)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASK_KIND != 0:
        in_bounds = offs_m[:, None] < L
        if BOUNDARY:
            in_bounds = in_bounds & (offs_n[None, :] < S)
        if MASK_KIND == 2:
            qk += _log2_mask(tl.load(mask_base + mask_offs, mask=in_bounds, other=0.0).to(tl.float32))
    p = tl.exp2(qk - lse2[:, None])
    if MASK_KIND == 1:
        p = tl.where(tl.load(mask_base + mask_offs, mask=in_bounds, other=0) != 0, p, 0.0)
    if BOUNDARY:
        valid = offs_n[None, :] < S
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
    # 2. dP = (dO V^T) * Z
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], drop_threshold)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    if DELTA_ONLY:
        dq += p * dp
    else:
        # 3. dS = P * (dP - delta)
        ds = p * (dp - delta[:, None])
        # 4. dQ = scale * dS K (the scale is applied once, after all blocks)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    k_desc,
    v_desc,
    mask_base,
    k_offs,
    v_offs,
    mask_offs,
    offs_m,
    lo,
    hi,
    stride_kn,
    stride_vn,
    stride_mn,
    L,
    S,
    qk_scale,
    dropout_scale,
    seed,
    rng_offset,
    bh,
    drop_threshold,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BOUNDARY: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    DELTA_ONLY: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """Adds key blocks [lo, hi) to dq; BOUNDARY blocks get the causal and key-tail masks. With DELTA_ONLY, dq
    is a [BLOCK_M, BLOCK_N] accumulator of P * dP instead (its row sums are delta). WARP_SPEC: as in
    _attn_fwd_inner (one BOUNDARY stage, TMA, no mask), the loop goes to triton's warp-specialising pass."""
    # The warp-specialised loop advances no pointer: K and V must come through descriptors and no mask be read.
    tl.static_assert(not WARP_SPEC or (USE_TMA and MASK_KIND == 0 and not DELTA_ONLY))
    if WARP_SPEC:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            dq = _attn_bwd_dq_block(
                dq,
                q,
                do,
                lse2,
                delta,
                k_base,
                v_base,
                k_desc,
                v_desc,
                mask_base,
                k_offs,
                v_offs,
                mask_offs,
                offs_m,
                start_n,
                L,
                S,
                qk_scale,
                dropout_scale,
                seed,
                rng_offset,
                bh,
                drop_threshold,
                D,
                DV,
                BLOCK_D,
                BLOCK_DV,
                BLOCK_N,
                BOUNDARY,
                IS_CAUSAL,
                MASK_KIND,
                HAS_DROPOUT,
                PRECISION,
                USE_TMA,
                DELTA_ONLY,
            )
    else:
        for start_n in range(lo, hi, BLOCK_N):
            dq = _attn_bwd_dq_block(
                dq,
                q,
                do,
                lse2,
                delta,
                k_base,
                v_base,
                k_desc,
                v_desc,
                mask_base,
                k_offs,
                v_offs,
                mask_offs,
                offs_m,
                start_n,
                L,
                S,
                qk_scale,
                dropout_scale,
                seed,
                rng_offset,
                bh,
                drop_threshold,
                D,
                DV,
                BLOCK_D,
                BLOCK_DV,
                BLOCK_N,
                BOUNDARY,
                IS_CAUSAL,
                MASK_KIND,
                HAS_DROPOUT,
                PRECISION,
                USE_TMA,
                DELTA_ONLY,
            )
            k_base += BLOCK_N * stride_kn
            v_base += BLOCK_N * stride_vn
            mask_base += BLOCK_N * stride_mn
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    Mask,
    DO,
    Lse,
    Delta,
    DQ,
    Rng,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    Hq,
    L,
    S,
    GROUP,
    qk_scale,
    sm_scale,
    dropout_scale,
    drop_threshold,
    L_BUCKET,
    S_BUCKET,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    DELTA_ONLY: tl.constexpr,
    WARP_SPEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ of one query block. Grid (cdiv(L, BLOCK_M), Hq, B); the key blocks are visited as in the forward.

    DELTA_ONLY writes delta = rowsum(P * dP) to Delta instead, from the same P and dP the gradients then use
    (the fp32 launches): FlashAttention's rowsum(dO * O) equals it only up to O's rounding, and dS = P (dP -
    delta) amplifies that mismatch past twice torch's fp32 error on some inputs (measured: 2-3 draws in 20 at
    64 x 64). In half precision the mismatch is below the dtype's own rounding."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    bh = b * Hq + h
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_m = offs_m[:, None].to(tl.int64)
    if WARP_SPEC:
        # The pass takes no tensor loaded through pointers outside its loop: the row vectors come through
        # descriptors too (L % 4 == 0 keeps their rows 16-byte aligned). Rows past L read 0 everywhere, so their
        # P is 1 but dP, delta and so dS are 0, and their dQ rows are never stored.
        q_head = Q + b64 * stride_qb + h64 * stride_qh
        do_head = DO + b64 * stride_dob + h64 * stride_doh
        q = tl.make_tensor_descriptor(q_head, [L, D], [stride_qm, 1], [BLOCK_M, BLOCK_D]).load([start_m, 0])
        do_desc = tl.make_tensor_descriptor(do_head, [L, DV], [stride_dom, 1], [BLOCK_M, BLOCK_DV])
        do = do_desc.load([start_m, 0])
        lse = tl.make_tensor_descriptor(Lse + bh.to(tl.int64) * L, [L], [1], [BLOCK_M]).load([start_m])
        delta = tl.make_tensor_descriptor(Delta + bh.to(tl.int64) * L, [L], [1], [BLOCK_M]).load([start_m])
    else:
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + rows_m * stride_qm + offs_d[None, :]
        do_ptrs = DO + b64 * stride_dob + h64 * stride_doh + rows_m * stride_dom + offs_dv[None, :]
        q = _load_tile(q_ptrs, offs_m, L, offs_d, D, BLOCK_D, True)
        do = _load_tile(do_ptrs, offs_m, L, offs_dv, DV, BLOCK_DV, True)
        lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=float("inf"))
        if DELTA_ONLY:
            delta = tl.zeros([BLOCK_M], tl.float32)
        else:
            delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0)
    lse2 = _backward_lse2(lse)
    k_head = K + b64 * stride_kb + hk64 * stride_kh
    v_head = V + b64 * stride_vb + hk64 * stride_vh
    mask_head = Mask + b64 * stride_mb + h64 * stride_mh
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vn + offs_dv[None, :]
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_head, [S, D], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_head, [S, DV], [stride_vn, 1], [BLOCK_N, BLOCK_DV])
    else:
        k_desc = k_head
        v_desc = v_head
    mask_offs = 0
    if MASK_KIND != 0:
        mask_offs = rows_m * stride_mm + offs_n[None, :] * stride_mn
    seed = 0
    rng_offset = 0
    if HAS_DROPOUT:
        seed = tl.load(Rng)
        rng_offset = tl.load(Rng + 1)
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
        full_hi = tl.minimum(start_m + 1, S) // BLOCK_N * BLOCK_N
    else:
        hi = S
        full_hi = S // BLOCK_N * BLOCK_N
    if WARP_SPEC:
        full_hi = tl.full([], 0, tl.int32)  # one masked stage, as in the forward
    if DELTA_ONLY:
        dq = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if not WARP_SPEC:
        dq = _attn_bwd_dq_inner(
            dq,
            q,
            do,
            lse2,
            delta,
            k_head,
            v_head,
            k_desc,
            v_desc,
            mask_head,
            k_offs,
            v_offs,
            mask_offs,
            offs_m,
            0,
            full_hi,
            stride_kn,
            stride_vn,
            stride_mn,
            L,
            S,
            qk_scale,
            dropout_scale,
            seed,
            rng_offset,
            bh,
            drop_threshold,
            D,
            DV,
            BLOCK_D,
            BLOCK_DV,
            BLOCK_N,
            False,
            IS_CAUSAL,
            MASK_KIND,
            HAS_DROPOUT,
            PRECISION,
            USE_TMA,
            DELTA_ONLY,
            WARP_SPEC,
        )
    full_hi64 = full_hi.to(tl.int64)
    dq = _attn_bwd_dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        k_head + full_hi64 * stride_kn,
        v_head + full_hi64 * stride_vn,
        k_desc,
        v_desc,
        mask_head + full_hi64 * stride_mn,
        k_offs,
        v_offs,
        mask_offs,
        offs_m,
        full_hi,
        hi,
        stride_kn,
        stride_vn,
        stride_mn,
        L,
        S,
        qk_scale,
        dropout_scale,
        seed,
        rng_offset,
        bh,
        drop_threshold,
        D,
        DV,
        BLOCK_D,
        BLOCK_DV,
        BLOCK_N,
        True,
        IS_CAUSAL,
        MASK_KIND,
        HAS_DROPOUT,
        PRECISION,
        USE_TMA,
        DELTA_ONLY,
        WARP_SPEC,
    )
    if DELTA_ONLY:
        tl.store(Delta + bh.to(tl.int64) * L + offs_m, tl.sum(dq, 1), mask=offs_m < L)
    else:
        dq = dq * sm_scale
        dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + rows_m * stride_dqm + offs_d[None, :]
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_d[None, :] < D))


# --------------------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per (element bytes, padded head dim); autotune picks
# one per key on the GPU (the interpreter runs _INTERPRETER_CONFIG only), and COMPILE_CASES builds the first
# of each. The 16-bit lists keep the configs that ptxas builds for sm_90a without register spills (checked on
# the compiled cubins with stride alignment as at run time; head dim 256's backward keeps a few small spills).
# fp32 is not a speed target: one small config each, because ieee fp32 dots unroll into FMAs that take ptxas
# minutes at larger tiles.
# A fifth entry True marks a config that streams its loop's tiles (K and V in the forward and dQ, Q and dO in
# dK/dV) through TMA tensor descriptors made in the kernel: Hopper's bulk copies need no address registers
# (60-110 fewer a thread in the forward and dQ on sm_90a; dK/dV's accumulators leave it little to gain). They
# are timed only where descriptors can describe those tensors (see _tma_ok), never as the untuned default.
# A sixth entry True marks a config that triton's Hopper pass warp-specialises (_warp_spec_ok): num_warps is
# then each warp group's, 4, and num_stages the depth of the ring of streamed tiles between them. These fit
# sm_90a's 227 KB of shared memory (128 x 128 with three stages at head dim 128 does not: 246 KB).
_TMA_FWD = {
    64: [
        (128, 64, 4, 3, True),
        (128, 128, 8, 3, True),
        (128, 128, 4, 2, True, True),
        (128, 64, 4, 3, True, True),
    ],
    128: [
        (128, 64, 8, 3, True),
        (128, 128, 8, 2, True),
        (64, 64, 4, 2, True),
        (128, 128, 4, 2, True, True),
        (128, 64, 4, 3, True, True),
    ],
    256: [(128, 64, 8, 2, True), (64, 64, 4, 2, True), (128, 64, 4, 2, True, True)],
}
_TMA_DKDV = {  # no warp-specialised config at head dim 256: each spills 4 KB
    64: [
        (32, 128, 8, 2, True),
        (64, 128, 8, 3, True),
        (64, 128, 4, 2, True, True),
        (64, 128, 4, 3, True, True),
    ],
    128: [(32, 128, 8, 2, True), (32, 128, 4, 2, True, True), (32, 128, 4, 3, True, True)],
    256: [(16, 32, 4, 2, True), (32, 64, 8, 2, True)],
}
_TMA_DQ = {
    64: [
        (128, 64, 8, 2, True),
        (128, 64, 4, 3, True),
        (128, 64, 4, 2, True, True),
        (128, 128, 4, 2, True, True),
    ],
    128: [
        (128, 64, 8, 2, True),
        (128, 32, 8, 3, True),
        (64, 64, 4, 3, True),
        (128, 64, 4, 2, True, True),
        (128, 64, 4, 3, True, True),
    ],
    256: [(64, 32, 8, 2, True), (64, 32, 4, 2, True), (64, 32, 4, 2, True, True)],
}
_FWD = {
    (2, 64): [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), *_TMA_FWD[64]],
    (2, 128): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), *_TMA_FWD[128]],
    (2, 256): [(128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), *_TMA_FWD[256]],
    (4, 64): [(32, 32, 4, 2)],
    (4, 128): [(32, 32, 4, 2)],
    (4, 256): [(32, 16, 4, 2)],
}
_DKDV = {  # BLOCK_M: query rows per step, BLOCK_N: the key block a program owns
    (2, 64): [(32, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 2), (64, 64, 8, 2), *_TMA_DKDV[64]],
    (2, 128): [(32, 128, 8, 2), (32, 64, 8, 2), (32, 128, 8, 3), *_TMA_DKDV[128]],
    (2, 256): [(16, 32, 4, 2), (32, 32, 4, 2), (32, 64, 8, 2), *_TMA_DKDV[256]],
    (4, 64): [(32, 32, 4, 2)],
    (4, 128): [(32, 32, 4, 2)],
    (4, 256): [(16, 32, 4, 2)],
}
_DQ = {
    (2, 64): [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), *_TMA_DQ[64]],
    (2, 128): [(128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), *_TMA_DQ[128]],
    (2, 256): [(32, 32, 4, 2), (64, 32, 8, 2), (64, 32, 4, 2), *_TMA_DQ[256]],
    (4, 64): [(32, 32, 4, 2)],
    (4, 128): [(32, 32, 4, 2)],
    (4, 256): [(32, 16, 4, 2)],
}
# Few, large blocks: the interpreter's cost is per program and per loop step, not per element.
_INTERPRETER_CONFIG = (64, 64, 4, 1)
_AUTOTUNE_KEY = ["D", "DV", "IS_CAUSAL", "MASK_KIND", "HAS_DROPOUT", "L_BUCKET", "S_BUCKET", "GROUP"]


def _table_key(elem_bytes: int, block_d: int) -> tuple[int, int]:
    return (2 if elem_bytes <= 2 else 4, max(64, block_d))


def _to_config(c) -> dict:
    return dict(
        BLOCK_M=c[0],
        BLOCK_N=c[1],
        USE_TMA=_uses_tma(c),
        WARP_SPEC=_warp_specialized(c),
        num_warps=c[2],
        num_stages=c[3],
    )


def _uses_tma(c) -> bool:
    return len(c) > 4 and c[4]


def _warp_specialized(c) -> bool:
    return len(c) > 5 and c[5]


_TABLES = {
    "fwd": (_FWD, _attn_fwd_kernel),
    "dkdv": (_DKDV, _attn_bwd_dkdv_kernel),
    "dq": (_DQ, _attn_bwd_dq_kernel),
}


# kind -> config: forces that config for every launch of the kernel (the tests run each candidate this way,
# under the interpreter too, where the tile sizes are all that differ).
FORCED: dict[str, tuple] = {}


def _tuned(kind: str, q: Tensor, meta: dict, tma: bool = False, ws: bool = False):
    """The autotuned kernel for this dtype and padded head dim: one autotuner per candidate list, so nothing
    needs pruning at call time (torch.compile traces these launches). tma: whether the TMA configs may run;
    ws: whether the warp-specialised ones may too (see _warp_spec_ok)."""
    block = max(meta["BLOCK_D"], meta["BLOCK_DV"])
    return _tuned_for(kind, q.element_size(), block, tma, ws, backends.autotune_enabled(), FORCED.get(kind))


@functools.lru_cache(maxsize=None)
def _tuned_for(kind: str, itemsize: int, block: int, tma: bool, ws: bool, autotune: bool, forced):
    # Cached: building the candidate configs and the autotuner's key took 13-20 us of host time per launch.
    table, kernel = _TABLES[kind]
    candidates = table[_table_key(itemsize, block)]
    candidates = [c for c in candidates if (tma or not _uses_tma(c)) and (ws or not _warp_specialized(c))]
    candidates = candidates if autotune else candidates[:1]
    if _INTERPRET:
        candidates = [_INTERPRETER_CONFIG]
    if forced is not None:
        # A forced TMA config where TMA may not run (fp32's delta pass) runs as its pointer twin, a forced
        # warp-specialised one where that may not (a mask, dropout, unaligned rows) as its plain TMA twin.
        candidates = [forced if ws else forced[:5] if tma else forced[:4]]
    return _tuning.autotuned(kernel, [_to_config(c) for c in candidates], _AUTOTUNE_KEY)


def candidates(kind: str, dtype: torch.dtype, head_dim: int) -> list[tuple]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages[, TMA[, warp-specialised]]) list the GPU autotuner times for
    `kind` ("fwd", "dkdv", "dq") at this dtype and head dim, the default first (see the tables' comment)."""
    return _TABLES[kind][0][_table_key(dtype.itemsize, _block(head_dim))]


# -------------------------------------------------------------------------------------------- launchers
def _launch(kernel):
    # On GPUs the pair is a torch.library.triton_op, whose kernels must be launched through wrap_triton so
    # torch.compile sees them; the interpreter's kernels are plain Python and run as they are.
    return kernel if _INTERPRET else torch.library.wrap_triton(kernel)


def _block(dim: int) -> int:
    # tl.dot needs K >= 16, and tiles are powers of two: pad the head dim, masking the padding.
    return max(16, _tuning.next_power_of_2(dim))


def _mask_args(attn_mask: Tensor | None, q: Tensor):
    """(pointer tensor, kind, strides): kind 0 none, 1 bool, 2 additive; stride 0 broadcasts a dim."""
    if attn_mask is None:
        return q, 0, (0, 0, 0, 0)
    return attn_mask, 1 if attn_mask.dtype == torch.bool else 2, tuple(attn_mask.stride())


def _dropout_args(dropout_p: float, rng: Tensor, like: Tensor):
    """(rng on the kernels' device, 1 / (1 - p), uint32 threshold); the H2D copy of rng does not sync."""
    if dropout_p <= 0.0:
        return like, 1.0, 0
    threshold = min(int(round(dropout_p * 2.0**32)), 2**32 - 1)
    return rng.to(like.device, non_blocking=True), 1.0 / (1.0 - dropout_p), threshold


def _shared_meta(q: Tensor, v: Tensor, L: int, S: int, is_causal: bool, mask_kind: int, dropout_p: float):
    D, DV = q.shape[-1], v.shape[-1]
    return dict(
        # Lengths enter the autotune key as powers of two, so a decode loop (L = 1, S growing) does not retune
        # at every step; int() keeps symbolic sizes under torch.compile out of triton's bit tricks.
        L_BUCKET=_tuning.next_power_of_2(max(int(L), 1)),
        S_BUCKET=_tuning.next_power_of_2(max(int(S), 1)),
        D=D,
        DV=DV,
        BLOCK_D=_block(D),
        BLOCK_DV=_block(DV),
        IS_CAUSAL=bool(is_causal),
        MASK_KIND=mask_kind,
        HAS_DROPOUT=dropout_p > 0.0,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _tma_ok(kind: str, *tensors: Tensor) -> bool:
    """Whether `kind`'s kernel may read `tensors` (the ones it may load through TMA descriptors): 16-bit,
    16-byte aligned bases and row, head and batch strides (the hardware's rule), eager mode on a GPU. Traced
    calls (torch.compile) keep the pointer configs: descriptors made in the kernel need triton's scratch
    allocator at launch, which is set here and not by every torch release's compiled launcher. A FORCED config
    (the tests) decides by itself."""
    if kind in FORCED:
        return _uses_tma(FORCED[kind])
    if _INTERPRET or not _TMA_STATE["ok"] or torch.compiler.is_compiling():
        return False
    for t in tensors:
        if is_fake(t) or t.element_size() != 2 or t.data_ptr() % 16:
            return False
        strides = t.stride()[:3]
        if any(s * t.element_size() % 16 for s in strides):
            return False
        # A broadcast (stride 0) dimension, e.g. a dO expanded from a mean over the sequence, would be a zero
        # global stride in the descriptor; the pointer loads take it as it is.
        if any(s == 0 and n > 1 for s, n in zip(strides, t.shape[:3])):
            return False
    return True


def _warp_spec_ok(kind: str, meta: dict, tensors: tuple | None) -> bool:
    """Whether the warp-specialised configs may run: triton's Hopper pass (tl.range(warp_specialize=...), sm_90)
    splits their one loop into a TMA producer warp group and two consumer warp groups, each with half the
    program's rows (query rows in the forward and dQ, key rows in dK/dV), as FlashAttention-3 does. `tensors`
    are the ones they read through descriptors beyond the plain TMA configs' (Q; K and V; Q and dO), None
    where those cannot be (the backward's lse and delta rows, unless L % 4 == 0 and lse is contiguous and
    16-byte aligned). Masks and dropout stay out: the pass rejects a loop that loads the mask through
    pointers, and dropout is not what it is tuned for. GPTFAST_TRITON_WARP_SPEC=0 turns them off
    (scripts/gpu_check.sh does when its probe of them fails). A FORCED config decides by itself."""
    if tensors is None or meta["MASK_KIND"] != 0 or meta["HAS_DROPOUT"]:
        return False
    if kind in FORCED:
        return _warp_specialized(FORCED[kind])
    if _INTERPRET or not _WS_STATE["ok"] or os.environ.get("GPTFAST_TRITON_WARP_SPEC", "1") == "0":
        return False
    return torch.cuda.get_device_capability(tensors[0].device)[0] == 9 and _tma_ok(kind, *tensors)


def _run_tuned(kind: str, q: Tensor, meta: dict, grid, args: tuple, tma: bool, ws_tensors=None) -> None:
    """Launches `kind`'s autotuned kernel, with the TMA configs among the candidates when `tma` (and the
    warp-specialised ones where _warp_spec_ok(kind, meta, ws_tensors)). A GPU or triton release whose
    warp-specialised configs fail to build or launch keeps the others from then on, one whose TMA path fails
    the pointer configs, each said once; the GPU tests force every config, so such a failure still shows
    there."""
    ws = tma and _warp_spec_ok(kind, meta, ws_tensors)
    try:
        if tma and not _INTERPRET:
            triton.set_allocator(_tma_scratch)
        _launch(_tuned(kind, q, meta, tma, ws))[grid](*args, **meta)
    except Exception as e:
        if not tma or kind in FORCED or isinstance(e, torch.OutOfMemoryError):
            raise
        # With both among the candidates the failure is put down to the newer pass; should the plain TMA configs
        # fail too, the retry turns them off as well.
        state, what = (_WS_STATE, "warp-specialised") if ws else (_TMA_STATE, "TMA")
        state["ok"] = False
        text = str(e).strip().splitlines()
        warnings.warn(
            f"gptfast: the Triton attention's {what} configs failed here ({type(e).__name__}: "
            f"{text[0] if text else ''}); the others run from now on",
            RuntimeWarning,
        )
        _run_tuned(kind, q, meta, grid, args, tma and _TMA_STATE["ok"], ws_tensors)


def _tma_scratch(size: int, alignment: int, stream) -> Tensor:
    """triton's allocator for the kernels' global scratch (where in-kernel TMA descriptors live)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


_TMA_STATE = {"ok": hasattr(tl, "make_tensor_descriptor")}
_WS_STATE = {"ok": "warp_specialize" in inspect.signature(tl.range.__init__).parameters}


def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    rng: Tensor,
) -> tuple[Tensor, Tensor]:
    """out (B, Hq, L, Dv) in q's dtype and lse (B, Hq, L) fp32 from q (B, Hq, L, D), k (B, Hk, S, D),
    v (B, Hk, S, Dv), attn_mask None or (B, Hq, L, S) (any strides), rng int64 (seed, offset) on the CPU."""
    B, Hq, L, _ = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if B * Hq * L == 0 or S == 0:
        # Nothing to launch; with no keys every row is dead: out 0, lse -inf.
        return (
            torch.zeros(B, Hq, L, v.shape[-1], dtype=q.dtype, device=q.device),
            torch.full((B, Hq, L), float("-inf"), dtype=torch.float32, device=q.device),
        )
    out = torch.empty(B, Hq, L, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    mask, mask_kind, mask_strides = _mask_args(attn_mask, q)
    rng_t, dropout_scale, threshold = _dropout_args(dropout_p, rng, q)
    meta = _shared_meta(q, v, L, S, is_causal, mask_kind, dropout_p)
    args = (
        q,
        k,
        v,
        mask,
        out,
        lse,
        rng_t,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *mask_strides,
        *out.stride()[:3],
        Hq,
        L,
        S,
        Hq // Hk,
        scale * LOG2E,
        dropout_scale,
        threshold,
    )
    meta["FOLD_SCALE"] = bool(scale > 0) and mask_kind != 2

    def grid(config):
        return (triton.cdiv(L, config["BLOCK_M"]), Hq, B)

    _run_tuned("fwd", q, meta, grid, args, _tma_ok("fwd", k, v), (q,))
    return out, lse


def attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    rng: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) shaped like (q, k, v) from dout (B, Hq, L, Dv) with stride(-1) == 1 and the forward's
    out and lse; dK and dV of a kv head sum over the query heads of its group."""
    B, Hq, L, _ = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0 or dout.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Contiguous gradients whatever q/k/v's strides: the contract (and the fake) every backend shares.
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    delta = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
    mask, mask_kind, mask_strides = _mask_args(attn_mask, q)
    rng_t, dropout_scale, threshold = _dropout_args(dropout_p, rng, q)
    meta = _shared_meta(q, v, L, S, is_causal, mask_kind, dropout_p)
    block_dv = meta["BLOCK_DV"]
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *dout.stride()[:3])
    fp32 = q.dtype == torch.float32
    if not fp32:
        _launch(_attn_bwd_delta_kernel)[(triton.cdiv(L, 64), Hq, B)](
            out,
            dout,
            delta,
            *out.stride()[:3],
            *dout.stride()[:3],
            Hq,
            L,
            DV=v.shape[-1],
            BLOCK_DV=block_dv,
            BLOCK_M=64,
            num_warps=4,
        )
    dkdv_args = (
        q,
        k,
        v,
        mask,
        dout,
        lse,
        delta,
        dk,
        dv,
        rng_t,
        *common,
        *dk.stride()[:3],
        *dv.stride()[:3],
        Hq,
        L,
        S,
        Hq // Hk,
        scale * LOG2E,
        scale,
        dropout_scale,
        threshold,
    )
    # dK/dV stream Q and dO, dQ streams K and V: each kernel's TMA configs need only those aligned.
    dkdv_tma = _tma_ok("dkdv", q, dout)
    dq_args = (
        q,
        k,
        v,
        mask,
        dout,
        lse,
        delta,
        dq,
        rng_t,
        *common,
        *dq.stride()[:3],
        Hq,
        L,
        S,
        Hq // Hk,
        scale * LOG2E,
        scale,
        dropout_scale,
        threshold,
    )

    def dq_grid(config):
        return (triton.cdiv(L, config["BLOCK_M"]), Hq, B)

    if fp32:
        # delta = rowsum(P * dP) from the kernels' own P and dP (_attn_bwd_dq_kernel), before dK/dV need it
        _run_tuned("dq", q, {**meta, "DELTA_ONLY": True}, dq_grid, dq_args, False)

    def dkdv_grid(config):
        return (triton.cdiv(S, config["BLOCK_N"]), Hk, B)

    # The warp-specialised configs also read the lse and delta rows through descriptors, and what the plain TMA
    # configs load through pointers: K and V (dK/dV), Q and dO (dQ).
    dq_tma = _tma_ok("dq", k, v)
    rows_ok = (dkdv_tma or dq_tma) and L % 4 == 0 and lse.is_contiguous() and lse.data_ptr() % 16 == 0
    _run_tuned("dkdv", q, meta, dkdv_grid, dkdv_args, dkdv_tma, (k, v) if rows_ok else None)
    dq_meta = {**meta, "DELTA_ONLY": False}
    _run_tuned("dq", q, dq_meta, dq_grid, dq_args, dq_tma, (q, dout) if rows_ok else None)
    return dq, dk, dv


def dropout_mask(batch: int, heads: int, L: int, S: int, dropout_p: float, rng: Tensor, device) -> Tensor:
    """The keep mask (batch, heads, L, S), bool, that the kernels apply for this dropout_p and rng."""
    keep = torch.empty(batch, heads, L, S, dtype=torch.int8, device=device)
    if keep.numel():
        _, _, threshold = _dropout_args(dropout_p, rng, keep)
        block = 64
        _dropout_mask_kernel[(triton.cdiv(L, block), triton.cdiv(S, block), batch * heads)](
            keep,
            rng.to(device),
            L,
            S,
            threshold,
            BLOCK_M=block,
            BLOCK_N=block,
        )
    return keep.bool()


def unsupported(
    op: str, attn_mask=None, dropout=None, head_dim=None, value_dim=None, dtype=None, grad=None
) -> str | None:
    """Why this backend refuses the call, or None. Masks, dropout and GQA all run in the kernels, and the
    backward has no atomics, so deterministic mode needs nothing else."""
    for name, dim in (("head_dim", head_dim), ("value_dim", value_dim)):
        if dim is not None and not 1 <= dim <= MAX_HEAD_DIM:
            return f"{name} {dim} is outside the kernels' range 1..{MAX_HEAD_DIM}; use backend='reference'"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the kernels take float16, bfloat16 or float32, got {dtype}; use backend='reference'"
    return None


# ---------------------------------------------------------------------------------------- compile cases
_CONSTEXPRS = (
    "D",
    "DV",
    "BLOCK_D",
    "BLOCK_DV",
    "IS_CAUSAL",
    "MASK_KIND",
    "HAS_DROPOUT",
    "PRECISION",
    "FOLD_SCALE",
    "USE_TMA",
    "WARP_SPEC",
    "DELTA_ONLY",
    "BLOCK_M",
    "BLOCK_N",
)
_FLOAT_ARGS = ("qk_scale", "sm_scale", "dropout_scale")
_DATA_POINTERS = ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DVt")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(fn, dt: str, mask_kind: int, dropout: bool) -> dict[str, str]:
    types = {
        "Lse": "*fp32",
        "Delta": "*fp32",
        "Mask": "*i1" if mask_kind == 1 else f"*{dt}",
        "Rng": "*i64" if dropout else f"*{dt}",
        "Keep": "*i8",
        "drop_threshold": "i64" if dropout else "i32",
        "threshold": "i64",
    }
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in _DATA_POINTERS:
            sig[name] = f"*{dt}"
        else:
            sig[name] = "i32"
    return sig


def _aligned(fn, signature: dict[str, str]) -> dict:
    """triton.compile attrs as the launcher sees typical calls: 16-byte aligned pointers and q/k/v/o strides
    that are multiples of 16 (head dims of 16 and up); the mask's strides (often 0 or odd) stay unspecialised.
    """
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or (name.startswith("stride_") and not name.startswith("stride_m"))
    }


def _compile_case(
    kind: str,
    dtype: torch.dtype,
    head_dim: int,
    causal: bool,
    config=None,
    mask_kind: int = 0,
    dropout: bool = False,
    value_dim: int | None = None,
    delta_only: bool = False,
) -> dict:
    fn, table = {
        "fwd": (_attn_fwd_kernel, _FWD),
        "dkdv": (_attn_bwd_dkdv_kernel, _DKDV),
        "dq": (_attn_bwd_dq_kernel, _DQ),
    }[kind]
    dv = value_dim or head_dim
    block_d, block_dv = _block(head_dim), _block(dv)
    config = config or table[_table_key(dtype.itemsize, max(block_d, block_dv))][0]
    dt = _DTYPE_NAMES[dtype]
    constexprs = dict(
        D=head_dim,
        DV=dv,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        IS_CAUSAL=causal,
        MASK_KIND=mask_kind,
        HAS_DROPOUT=dropout,
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        BLOCK_M=config[0],
        BLOCK_N=config[1],
    )
    constexprs["USE_TMA"] = _uses_tma(config)
    constexprs["WARP_SPEC"] = _warp_specialized(config)
    if kind == "fwd":
        constexprs["FOLD_SCALE"] = mask_kind != 2
    if kind == "dq":
        constexprs["DELTA_ONLY"] = delta_only
    name = (
        f"attn_{kind}_{dt}_d{head_dim}{'' if dv == head_dim else f'_dv{dv}'}_{'causal' if causal else 'full'}"
        f"_m{config[0]}n{config[1]}w{config[2]}s{config[3]}{'_tma' if _uses_tma(config) else ''}"
        f"{'_ws' if _warp_specialized(config) else ''}"
        f"{['', '_boolmask', '_floatmask'][mask_kind]}{'_dropout' if dropout else ''}"
        f"{'_delta' if delta_only else ''}"
    )
    signature = _signature(fn, dt, mask_kind, dropout)
    return dict(
        name=name,
        fn=fn,
        signature=signature,
        constexprs=constexprs,
        attrs=_aligned(fn, signature),
        num_warps=config[2],
        num_stages=config[3],
    )


def _delta_case(dtype: torch.dtype, value_dim: int) -> dict:
    dt = _DTYPE_NAMES[dtype]
    fn = _attn_bwd_delta_kernel
    signature = _signature(fn, dt, 0, False)
    return dict(
        name=f"attn_delta_{dt}_dv{value_dim}",
        fn=fn,
        signature=signature,
        attrs=_aligned(fn, signature),
        constexprs=dict(DV=value_dim, BLOCK_DV=_block(value_dim), BLOCK_M=64),
        num_warps=4,
        num_stages=1,
    )


def _first_warp_specialized(configs: list) -> tuple:
    return next(c for c in configs if _warp_specialized(c))


def _compile_cases() -> list[dict]:
    """A covering set small enough for the CPU suite (compiling one attention kernel for sm_90a takes 5-40 s
    on a laptop core): every head dim, each kernel, fp16 and bf16, causal and not, both mask kinds, dropout,
    fp32 and Dv != D each appear at least once, with the default (first) config of their list."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [
        _compile_case("fwd", bf16, 128, True),  # the benchmark's configuration
        _compile_case("fwd", bf16, 128, True, config=_TMA_FWD[128][0]),  # and its first TMA candidates
        _compile_case("dkdv", bf16, 128, True, config=_TMA_DKDV[128][0]),
        _compile_case("dq", bf16, 128, True, config=_TMA_DQ[128][0]),
        *(
            [
                _compile_case("fwd", bf16, 128, True, config=_first_warp_specialized(_TMA_FWD[128])),
                _compile_case("fwd", fp16, 64, False, config=_first_warp_specialized(_TMA_FWD[64])),
                _compile_case("dq", bf16, 128, True, config=_first_warp_specialized(_TMA_DQ[128])),
                _compile_case("dkdv", bf16, 128, True, config=_first_warp_specialized(_TMA_DKDV[128])),
            ]
            if _WS_STATE["ok"]  # a triton without tl.range(warp_specialize=...) never runs them
            else []
        ),
        _compile_case("dkdv", bf16, 128, True),
        _compile_case("dq", bf16, 128, True),
        _compile_case("fwd", fp16, 64, False),
        _compile_case("dkdv", fp16, 64, False),
        _compile_case("dq", bf16, 64, True),
        _compile_case("fwd", bf16, 16, True),  # the smallest head dim: dots with K = 16
        _compile_case("dkdv", fp16, 32, True),
        _compile_case("dq", fp16, 80, False),  # padded head dims
        _compile_case("fwd", bf16, 96, True),
        _compile_case("fwd", bf16, 256, True),  # the largest head dim
        _compile_case("dq", bf16, 256, False),
        _compile_case("fwd", fp16, 64, False, mask_kind=1),
        _compile_case("dkdv", fp16, 64, False, mask_kind=2),
        _compile_case("dq", bf16, 64, False, mask_kind=1),
        _compile_case("fwd", bf16, 64, True, dropout=True),
        _compile_case("dkdv", bf16, 64, True, dropout=True),
        _compile_case("fwd", fp32, 32, True),  # ieee fp32 dots
        _compile_case("dq", fp32, 64, True, delta_only=True),  # the fp32 backward's delta pass
        _compile_case("fwd", fp16, 32, True, value_dim=64),
        _delta_case(bf16, 128),
    ]


def _all_compile_cases() -> list[dict]:
    """Every config autotune can pick: each candidate of each list at the head dim that keys it, for fp16 and
    bf16 causal and not, and fp32 causal (about 150 kernels, slow: for a --runslow compile test)."""
    cases = []
    for kind, table in (("fwd", _FWD), ("dkdv", _DKDV), ("dq", _DQ)):
        for dtype, causals in (
            (torch.float16, (False, True)),
            (torch.bfloat16, (False, True)),
            (torch.float32, (True,)),
        ):
            for head_dim in (64, 128, 256):
                for causal in causals:
                    for config in table[_table_key(dtype.itemsize, head_dim)]:
                        if _WS_STATE["ok"] or not _warp_specialized(config):
                            cases.append(_compile_case(kind, dtype, head_dim, causal, config=config))
    return cases + [
        _delta_case(dtype, dv) for dtype in (torch.float16, torch.bfloat16) for dv in (64, 80, 128)
    ]


COMPILE_CASES = _compile_cases()
ALL_COMPILE_CASES = _all_compile_cases()
