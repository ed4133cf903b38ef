"""The LoRA expand inside a GEMM tile, for `fused_gemm`'s kernels.

A [BLOCK_M, BLOCK_N] output tile adds Σ_j s_j·u[rows ∈ j]·V_j over the segments j its
rows meet (lo..hi-1, from the plan's tok_lo / tok_hi): up to PAIRED_RANK the first two
as one product of depth 2R (`pair_operands`), the rest, and every one above it, in turn
(`segment_loop`); with dropout, masked element-wise (`masked_expand`). The pair's
table entries (`pair_tables`, or `segment_table`'s scalars) and its tiles
(`pair_tiles`) are apart, so a flattened loop can read the first in a tile's first
step and the second after its last; `segment_tiles` gives one segment's operands (the
flattened dx at R = 32 runs the pair as two products). `load` reads their operands by
tl.load, or by inline PTX where a flattened loop's software pipeliner must not take
them in. See docs/kernels.md, "The fused GEMM".
"""

from __future__ import annotations

import triton
import triton.language as tl

from mlora.ops.kernels.interpret import INTERPRET

PAIRED_RANK: tl.constexpr = tl.constexpr(32)
# the interpreter runs no PTX: `load` reads by tl.load there, hidden or not
INTERPRETING: tl.constexpr = tl.constexpr(INTERPRET)


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
                               V_ALIGNED, False)
        if lo < hi:
            acc = tl.dot(u2, v2, acc, input_precision=PRECISION)
        first = lo + 2
    return segment_loop(acc, first, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off,
                        seg_rank, seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R, W_KN, DROPOUT, PRECISION,
                        V_ALIGNED)


@triton.jit
def pair_operands(lo, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off, seg_rank,
                  seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R: tl.constexpr, W_KN: tl.constexpr,
                  DROPOUT: tl.constexpr, V_ALIGNED: tl.constexpr, HIDDEN: tl.constexpr):
    """The tile's first two segments as the operands of one product of depth 2R: u's
    columns [0, R) hold segment lo's scaled rows and [R, 2R) segment lo+1's (zero
    elsewhere), V the two adapters' rows stacked. Their table entries are fetched side
    by side, so a tile waits on three dependent round trips to memory whether it meets
    one segment or two (a segment that is not there has its loads masked off), and
    one wgmma chain serves both. HIDDEN: loads by inline PTX (`load`), without dropout."""
    start, end, rank, off, scale = pair_tables(lo, hi, seg_start, seg_end, seg_off, seg_rank, seg_scale, seg_keep,
                                               seg_mask_row, R, DROPOUT, HIDDEN)
    return pair_tiles(lo, hi, start, end, rank, off, scale, 0, 0, 0, 0, rows, rows64, cols64, col_ok, N, u_ptr,
                      v_cat, seg_off, seg_rank, RT, U_STRIDE, dtype, R, W_KN, V_ALIGNED, HIDDEN, False)


@triton.jit
def pair_tables(lo, hi, seg_start, seg_end, seg_off, seg_rank, seg_scale, seg_keep, seg_mask_row, R: tl.constexpr,
                DROPOUT: tl.constexpr, HIDDEN: tl.constexpr):
    """The pair's table entries, [2R] each (start, end, rank, offset, scale of segment lo
    in the first R, of lo + 1 in the rest; zero where that segment is not there)."""
    cc = tl.arange(0, 2 * R)
    second = cc >= R  # this column of u (row of V) belongs to segment lo + 1
    j = lo + second.to(tl.int32)
    live = j < hi
    start = load(seg_start + j, live, 0, HIDDEN)
    end = load(seg_end + j, live, 0, HIDDEN)
    rank = load(seg_rank + j, live, 0, HIDDEN)
    off = load(seg_off + j, live, 0, HIDDEN).to(tl.int64)
    scale = load(seg_scale + j, live, 0.0, HIDDEN)
    if DROPOUT:
        scale *= tl.where(tl.load(seg_mask_row + j, mask=live, other=-1) >= 0,
                          tl.load(seg_keep + j, mask=live, other=1.0), 1.0)
    return start, end, rank, off, scale


@triton.jit
def pair_tiles(lo, hi, start, end, rank, off, scale, b_off0, b_rank0, b_off1, b_rank1, rows, rows64, cols64, col_ok, N,
               u_ptr, v_cat, seg_off, seg_rank, RT, U_STRIDE, dtype, R: tl.constexpr, W_KN: tl.constexpr,
               V_ALIGNED: tl.constexpr, HIDDEN: tl.constexpr, B_TABLES: tl.constexpr):
    """u and V of the pair from its tables (`pair_tables`). The forward's aligned B
    blocks take their segments' offset and rank as scalars: given (B_TABLES, from
    `segment_table` of lo and lo + 1) or read here."""
    rr = tl.arange(0, 2 * R) % R
    in_seg = (rows[:, None] >= start[None, :]) & (rows[:, None] < end[None, :])
    u = load(u_ptr + rows64[:, None] * U_STRIDE + rr[None, :], in_seg, 0.0, HIDDEN)
    u = (u.to(tl.float32) * scale[None, :]).to(dtype)
    if W_KN:  # V = A_j: rows off.. of A_cat [RT, N]
        v_row = v_cat + (off + rr) * N
        if V_ALIGNED:
            v_row = tl.multiple_of(v_row, 16)
        v = load(v_row[:, None] + cols64[None, :], (rr < rank)[:, None] & col_ok[None, :], 0.0, HIDDEN)
    else:  # V = B_jᵀ: columns off.. of B_cat [N, RT]
        if V_ALIGNED and B_TABLES:  # the blocks' scalars read already
            r8 = tl.arange(0, R) // 8
            v = stack_pair(b_tile(b_off0, r8 < b_rank0 // 8, cols64, col_ok, v_cat, RT, R, HIDDEN),
                           b_tile(b_off1, r8 < b_rank1 // 8, cols64, col_ok, v_cat, RT, R, HIDDEN), R)
        elif V_ALIGNED:
            v = pair_b_aligned(lo, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R, HIDDEN)
        else:
            v = load(v_cat + (off + rr)[:, None] + cols64[None, :] * RT, (rr < rank)[:, None] & col_ok[None, :], 0.0,
                     HIDDEN)
    return u, v


@triton.jit
def load(ptrs, mask, other, HIDDEN: tl.constexpr, IN_PLACE: tl.constexpr = False, MULTIPLE_OF: tl.constexpr = 1):
    """tl.load(ptrs, mask, other) of 16- or 32-bit values; HIDDEN: the same by inline PTX,
    one element a load, which the software pipeliner does not take into a flattened
    loop (it pipelines every tl.load there, the epilogue's too, volatile ones as well).
    The PTX is marked pure, so the compiler may sink it to where its value is used;
    IN_PLACE keeps it where it is written (a load before a K loop then waits behind the
    loop instead of after it). The interpreter, which runs no PTX, reads by tl.load
    either way. MULTIPLE_OF: the values are multiples of it, said on the tl.load itself
    (Triton 3.6 drops a `tl.multiple_of` put on this function's result, and B's 16-byte
    reads went with it: the forward at R = 128 spilled 1,296 bytes)."""
    if HIDDEN and not INTERPRETING:
        kind: tl.constexpr = ptrs.dtype.element_ty
        addr = ptrs.to(tl.int64, bitcast=True)
        if kind.primitive_bitwidth == 16:
            bits = tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b16 $0, 0; @p ld.global.b16 $0, [$1]; }", "=h,l,r",
                [addr, mask.to(tl.int32)], dtype=tl.int16, is_pure=not IN_PLACE, pack=1)
        else:
            bits = tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b32 $0, 0; @p ld.global.b32 $0, [$1]; }", "=r,l,r",
                [addr, mask.to(tl.int32)], dtype=tl.int32, is_pure=not IN_PLACE, pack=1)
        value = tl.where(mask, bits.to(kind, bitcast=True), other)
    else:
        value = tl.load(ptrs, mask=mask, other=other)
    if MULTIPLE_OF > 1:
        value = tl.multiple_of(value, MULTIPLE_OF)
    return value


@triton.jit
def pair_b_aligned(lo, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R: tl.constexpr, HIDDEN: tl.constexpr):
    """The pair's V in the forward (slots at multiples of 8 ranks): each segment's
    [R, BLOCK_N] block of B_jᵀ loaded on its own, so its offset and rank are scalars the
    compiler knows are multiples of 8, and the rank-contiguous columns of B_cat load 16
    bytes at a time (one [2R, BLOCK_N] gather loaded them 2 bytes at a time: 64 loads of
    64-bit addresses per thread at R = 128, and the forward spilled), then stacked."""
    first = b_block(lo, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R, HIDDEN)
    second = b_block(lo + 1, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R, HIDDEN)
    return stack_pair(first, second, R)


@triton.jit
def stack_pair(first, second, R: tl.constexpr):
    """Two [R, BLOCK_N] blocks as one [2R, BLOCK_N]."""
    return tl.reshape(tl.permute(tl.join(first, second), (2, 0, 1)), (2 * R, first.shape[1]))


@triton.jit
def b_block(j, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R: tl.constexpr, HIDDEN: tl.constexpr):
    """Segment j's B_jᵀ (columns off.. of B_cat [N, RT]) as [R, BLOCK_N], zero if j is past
    the tile's last segment; its (padded) rank, offset and Σr are multiples of 8."""
    rr = tl.arange(0, R)
    live = j < hi
    off = load(seg_off + j, live, 0, HIDDEN, MULTIPLE_OF=8)
    rank_ok = rr // 8 < load(seg_rank + j, live, 0, HIDDEN) // 8  # rr < rank, seen as constant by eights
    return b_tile(off, rank_ok, cols64, col_ok, v_cat, RT, R, HIDDEN)


@triton.jit
def segment_table(j, hi, seg_start, seg_end, seg_off, seg_rank, seg_scale, HIDDEN: tl.constexpr):
    """Segment j's start, end, padded rank, offset and scale as scalars (zeros if j is past
    the tile's last segment), read where written (IN_PLACE): the flattened GEMM reads
    its pair's in a tile's first step and carries them to its last (`pair_tiles`)."""
    live = j < hi
    return (load(seg_start + j, live, 0, HIDDEN, True), load(seg_end + j, live, 0, HIDDEN, True),
            load(seg_rank + j, live, 0, HIDDEN, True), load(seg_off + j, live, 0, HIDDEN, True, MULTIPLE_OF=8),
            load(seg_scale + j, live, 0.0, HIDDEN, True))


@triton.jit
def segment_tiles(j, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off, seg_rank,
                  seg_scale, RT, U_STRIDE, dtype, R: tl.constexpr, W_KN: tl.constexpr, V_ALIGNED: tl.constexpr,
                  HIDDEN: tl.constexpr):
    """Segment j's u [BLOCK_M, R] (its rows of u, scaled; zero elsewhere) and V [R,
    BLOCK_N] (A_j, or B_jᵀ), zero if j is past the tile's last segment: one of the pair's
    two products, for the flattened GEMM at R = 32, where the pair's operands at once
    spilled in its loop. `segment_loop`'s body reads the same, in another order; shared
    (tried), the flattened dx spilled 360 bytes and the tiled dx's PTX changed, so apart."""
    live = j < hi
    start = load(seg_start + j, live, 0, HIDDEN)
    end = load(seg_end + j, live, 0, HIDDEN)
    rr = tl.arange(0, R)
    in_seg = (rows >= start) & (rows < end)
    u = load(u_ptr + rows64[:, None] * U_STRIDE + rr[None, :], in_seg[:, None], 0.0, HIDDEN)
    u = (u.to(tl.float32) * load(seg_scale + j, live, 0.0, HIDDEN)).to(dtype)
    if W_KN:  # V = A_j: rows off.. of A_cat [RT, N]
        off = load(seg_off + j, live, 0, HIDDEN).to(tl.int64)
        v = load(v_cat + (off + rr)[:, None] * N + cols64[None, :],
                 (rr < load(seg_rank + j, live, 0, HIDDEN))[:, None] & col_ok[None, :], 0.0, HIDDEN)
    elif V_ALIGNED:
        v = b_block(j, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R, HIDDEN)
    else:  # V = B_jᵀ: columns off.. of B_cat [N, RT]
        off = load(seg_off + j, live, 0, HIDDEN).to(tl.int64)
        v = load(v_cat + off + rr[:, None] + cols64[None, :] * RT,
                 (rr < load(seg_rank + j, live, 0, HIDDEN))[:, None] & col_ok[None, :], 0.0, HIDDEN)
    return u, v


@triton.jit
def b_tile(off, rank_ok, cols64, col_ok, v_cat, RT, R: tl.constexpr, HIDDEN: tl.constexpr):
    """B_jᵀ as [R, BLOCK_N] from its offset (a multiple of 8) and which of its R rows are
    within its rank (`b_block`)."""
    rr = tl.arange(0, R)
    return load(v_cat + off + cols64[None, :] * (RT // 8 * 8) + rr[:, None], rank_ok[:, None] & col_ok[None, :], 0.0,
                HIDDEN)


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
            v = b_block(j, hi, cols64, col_ok, v_cat, seg_off, seg_rank, RT, R, False)
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
