"""The LoRA expand inside a GEMM tile, for `fused_gemm`'s kernels.

A [BLOCK_M, BLOCK_N] output tile adds Σ_j s_j·u[rows ∈ j]·V_j over the segments j its
rows meet (lo..hi-1, from the plan's tok_lo / tok_hi): up to PAIRED_RANK the first two
as one product of depth 2R (`pair_operands`), the rest, and every one above it, in turn
(`segment_loop`); with dropout, masked element-wise (`masked_expand`). See
docs/kernels.md, "The fused GEMM".
"""

from __future__ import annotations

import triton
import triton.language as tl

PAIRED_RANK: tl.constexpr = tl.constexpr(32)


@triton.jit
def expand(acc, lo, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off, seg_rank,
           seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R: tl.constexpr, W_KN: tl.constexpr,
           DROPOUT: tl.constexpr, PRECISION: tl.constexpr, V_ALIGNED: tl.constexpr):
    """acc + Σ_{segments lo..hi-1} (s_j·u[rows ∈ j])·V_j: up to PAIRED_RANK the first two
    as one product, the rest in turn."""
    first = lo
    if R <= PAIRED_RANK:
        u2, v2 = pair_operands(lo, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off,
                               seg_rank, seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R, W_KN, DROPOUT,
                               V_ALIGNED)
        if lo < hi:
            acc = tl.dot(u2, v2, acc, input_precision=PRECISION)
        first = lo + 2
    return segment_loop(acc, first, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off,
                        seg_rank, seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R, W_KN, DROPOUT, PRECISION,
                        V_ALIGNED)


@triton.jit
def pair_operands(lo, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off, seg_rank,
                  seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R: tl.constexpr, W_KN: tl.constexpr,
                  DROPOUT: tl.constexpr, V_ALIGNED: tl.constexpr):
    """The tile's first two segments as the operands of one product of depth 2R: u's
    columns [0, R) hold segment lo's scaled rows and [R, 2R) segment lo+1's (zero
    elsewhere), V the two adapters' rows stacked. Their table entries are fetched side
    by side, so a tile waits on three dependent round trips to memory whether it meets
    one segment or two (a segment that is not there has its loads masked off), and
    one wgmma chain serves both."""
    cc = tl.arange(0, 2 * R)
    second = cc >= R  # this column of u (row of V) belongs to segment lo + 1
    j = lo + second.to(tl.int32)
    live = j < hi
    start = tl.load(seg_start + j, mask=live, other=0)
    end = tl.load(seg_end + j, mask=live, other=0)
    rank = tl.load(seg_rank + j, mask=live, other=0)
    off = tl.load(seg_off + j, mask=live, other=0).to(tl.int64)
    scale = tl.load(seg_scale + j, mask=live, other=0.0)
    if DROPOUT:
        scale *= tl.where(tl.load(seg_mask_row + j, mask=live, other=-1) >= 0,
                          tl.load(seg_keep + j, mask=live, other=1.0), 1.0)
    rr = cc % R
    in_seg = (rows[:, None] >= start[None, :]) & (rows[:, None] < end[None, :])
    u = tl.load(u_ptr + rows64[:, None] * U_STRIDE + rr[None, :], mask=in_seg, other=0.0)
    u = (u.to(tl.float32) * scale[None, :]).to(dtype)
    if W_KN:  # V = A_j: rows off.. of A_cat [RT, N]
        v_row = v_cat + (off + rr) * N
        if V_ALIGNED:
            v_row = tl.multiple_of(v_row, 16)
        v = tl.load(v_row[:, None] + cols64[None, :], mask=(rr < rank)[:, None] & col_ok[None, :], other=0.0)
    elif V_ALIGNED:  # V = B_jᵀ, read 16 bytes at a time
        v = pair_b_aligned(lo, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R)
    else:  # V = B_jᵀ: columns off.. of B_cat [N, RT]
        v = tl.load(v_cat + (off + rr)[:, None] + cols64[None, :] * RT, mask=(rr < rank)[:, None] & col_ok[None, :],
                    other=0.0)
    return u, v


@triton.jit
def pair_b_aligned(lo, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R: tl.constexpr):
    """The pair's V in the forward (slots at multiples of 8 ranks): each segment's
    [R, BLOCK_N] block of B_jᵀ loaded on its own, so its offset and rank are scalars the
    compiler knows are multiples of 8, and the rank-contiguous columns of B_cat load 16
    bytes at a time (one [2R, BLOCK_N] gather loaded them 2 bytes at a time: 64 loads of
    64-bit addresses per thread at R = 128, and the forward spilled), then stacked."""
    first = b_block(lo, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R)
    second = b_block(lo + 1, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R)
    return tl.reshape(tl.permute(tl.join(first, second), (2, 0, 1)), (2 * R, first.shape[1]))


@triton.jit
def b_block(j, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R: tl.constexpr):
    """Segment j's B_jᵀ (columns off.. of B_cat [N, RT]) as [R, BLOCK_N], zero if j is past
    the tile's last segment; its (padded) rank, offset and Σr are multiples of 8."""
    rr = tl.arange(0, R)
    live = j < hi
    off = load_multiple_of_8(seg_off + j, live)
    rank_ok = rr // 8 < tl.load(seg_rank + j, mask=live, other=0) // 8  # rr < rank, seen as constant by eights
    return tl.load(v_cat + off + cols64[None, :] * (RT // 8 * 8) + rr[:, None], mask=rank_ok[:, None] & col_ok[None, :],
                   other=0.0)


@triton.jit
def load_multiple_of_8(ptr, mask):
    """tl.load(ptr, mask, 0) of a value known to be a multiple of 8, said on the load
    itself: Triton 3.6 (the GPU image's) drops a `tl.multiple_of` put on a helper's
    result, and B's 16-byte reads went with it (the forward at R = 128 spilled 1,296
    bytes; tests/kernel_smem.py counts such narrow loads)."""
    return tl.multiple_of(tl.load(ptr, mask=mask, other=0), 8)


@triton.jit
def segment_loop(acc, first, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off,
                 seg_rank, seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R: tl.constexpr, W_KN: tl.constexpr,
                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr, V_ALIGNED: tl.constexpr):
    """acc + one [BLOCK_M, R]·[R, BLOCK_N] product per segment first..hi-1, in turn: tiles
    holding a whole short segment meet more than two, and above PAIRED_RANK every
    segment comes here (two [BLOCK_M, R] and [R, BLOCK_N] pairs at R = 128 need more
    shared memory and registers than a Hopper block has)."""
    rr = tl.arange(0, R)
    for j in tl.range(first, hi, num_stages=1):  # not software-pipelined: the buffers would not fit
        s0 = tl.load(seg_start + j)
        s1 = tl.load(seg_end + j)
        rank = tl.load(seg_rank + j)
        off = tl.load(seg_off + j).to(tl.int64)
        scale = tl.load(seg_scale + j)
        if DROPOUT:
            scale *= tl.where(tl.load(seg_mask_row + j) >= 0, tl.load(seg_keep + j), 1.0)
        in_seg = (rows >= s0) & (rows < s1)
        u = tl.load(u_ptr + rows64[:, None] * U_STRIDE + rr[None, :], mask=in_seg[:, None], other=0.0)
        u = (u.to(tl.float32) * scale).to(dtype)
        if W_KN:  # V = A_j: rows off.. of A_cat [RT, N]
            v_ptr = v_cat + off * N
            if V_ALIGNED:
                v_ptr = tl.multiple_of(v_ptr, 16)
            v = tl.load(v_ptr + rr[:, None] * N + cols64[None, :], mask=(rr < rank)[:, None] & col_ok[None, :],
                        other=0.0)
        elif V_ALIGNED:  # V = B_jᵀ, read 16 bytes at a time
            v = b_block(j, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R)
        else:  # V = B_jᵀ: columns off.. of B_cat [N, RT]
            v = tl.load(v_cat + off + cols64[None, :] * RT + rr[:, None], mask=(rr < rank)[:, None] & col_ok[None, :],
                        other=0.0)
        acc = tl.dot(u, v, acc, input_precision=PRECISION)
    return acc


@triton.jit
def masked_expand(acc, lo, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, mask_ptr, seg_start, seg_end, seg_off,
                  seg_rank, seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R: tl.constexpr,
                  W_KN: tl.constexpr, PRECISION: tl.constexpr, V_ALIGNED: tl.constexpr):
    """The expand with dropout, into an accumulator that holds nothing else yet: each
    segment's product (1/(1-p) rides in u), then every element its keep-mask drops set
    to zero (segments own disjoint rows, so one mask serves them all)."""
    acc = expand(acc, lo, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off, seg_rank,
                 seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R, W_KN, True, PRECISION, V_ALIGNED)
    in_masks = mask_rows(lo, hi, rows64, seg_start, seg_end, seg_mask_row)
    kept = tl.load(mask_ptr + in_masks[:, None] * N + cols64[None, :],
                   mask=(in_masks >= 0)[:, None] & col_ok[None, :], other=1)
    return tl.where(kept != 0, acc, 0.0)


@triton.jit
def mask_rows(lo, hi, rows64, seg_start, seg_end, seg_mask_row):
    """Each row's row in the stacked keep-masks: that of the segment it is in, or -1
    where that segment has no mask (or the row is in none)."""
    out = tl.full(rows64.shape, -1, tl.int64)
    for j in range(lo, hi):
        s0 = tl.load(seg_start + j)
        first = tl.load(seg_mask_row + j)
        # a segment without a mask (first -1) is spelled as an empty row range: the
        # interpreter rejects a scalar condition inside a vector mask
        s1 = tl.where(first >= 0, tl.load(seg_end + j), s0)
        out = tl.where((rows64 >= s0) & (rows64 < s1), rows64 - s0 + first, out)
    return out
