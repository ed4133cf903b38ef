"""Segment-grouped shrink: h[t] = drop(x[t])·A_slot(t)ᵀ for every covered token t.

h is [T, R] (R = the padded rank), in x's dtype like the reference's x_seg @ Aᵀ; A_slot
is rows [off, off + r) of the concatenated A_cat, the mask rows of the stacked masks. Each
program owns BLOCK_M rows of one segment (tiles never straddle segments here, so x is
read exactly once) and loops over d_in. Rows outside every segment are never
written: nothing reads them. Reading x dominates: this is a memory-bound pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mlora.ops.kernels.interpret import INTERPRET
from mlora.ops.kernels.plan import SegmentPlan

BLOCK_M = 16 if INTERPRET else 32
BLOCK_K = 16 if INTERPRET else 128
NUM_WARPS = 4
NUM_STAGES = 1 if INTERPRET else 4


@triton.jit
def shrink_kernel(
    x_ptr, h_ptr, a_cat, mask_ptr,
    seg_slot, seg_start, seg_end, tile_seg, tile_row, seg_mask_row, slot_rank, slot_off, slot_keep,
    K,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):
    tile = tl.program_id(0)
    j = tl.load(tile_seg + tile)
    row0 = tl.load(tile_row + tile)
    slot = tl.load(seg_slot + j)
    s0 = tl.load(seg_start + j)
    s1 = tl.load(seg_end + j)
    rank = tl.load(slot_rank + slot)
    a_ptr = a_cat + tl.load(slot_off + slot).to(tl.int64) * K
    if ALIGNED:  # rows of 16-byte multiples: A rows load 16 bytes at a time
        a_ptr = tl.multiple_of(a_ptr, 16)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < s1
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, R)
    r_ok = rr < rank
    mask_row = tl.load(seg_mask_row + j) if DROPOUT else -1
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    if mask_row >= 0:  # its own copy of the loop: the mask's load pipelined, not under a branch
        keep = tl.load(slot_keep + slot)
        acc = _rows(acc, x_ptr, a_ptr, mask_ptr, mask_row - s0, keep, rows64, row_ok, rr, r_ok, K,
                    True, PRECISION, BLOCK_K)
    else:
        acc = _rows(acc, x_ptr, a_ptr, mask_ptr, 0, 1.0, rows64, row_ok, rr, r_ok, K, False, PRECISION, BLOCK_K)
    tl.store(h_ptr + rows64[:, None] * R + rr[None, :], acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _rows(
    acc, x_ptr, a_ptr, mask_ptr, mask_base, keep, rows64, row_ok, rr, r_ok, K,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc + drop(x[rows])·Aᵀ over d_in; the mask row of token t is t + mask_base."""
    dtype = x_ptr.dtype.element_ty
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        tile_ok = row_ok[:, None] & k_ok[None, :]
        xt = tl.load(x_ptr + rows64[:, None] * K + kk[None, :], mask=tile_ok, other=0.0)
        if MASKED:
            kept = tl.load(mask_ptr + (rows64 + mask_base)[:, None] * K + kk[None, :], mask=tile_ok, other=0)
            xt = tl.where(kept != 0, xt.to(tl.float32) * keep, 0.0).to(dtype)
        at = tl.load(a_ptr + rr[None, :] * K + kk[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    return acc


def shrink(x: Tensor, a_cat: Tensor, masks: Tensor, plan: SegmentPlan, dropout: bool, precision: str) -> Tensor:
    """h [T, R] in x's dtype; rows of uncovered tokens are left unwritten.

    a_cat: [Σr, d_in]; masks: the stacked int8 keep-masks [rows, d_in] (any tensor when
    dropout is False)."""
    h = torch.empty(x.shape[0], plan.rank_pad, dtype=x.dtype, device=x.device)
    if plan.n_shrink_tiles == 0:
        return h
    shrink_kernel[(plan.n_shrink_tiles,)](
        x, h, a_cat, masks,
        plan.seg_slot, plan.seg_start, plan.seg_end, plan.shrink_seg, plan.shrink_row, plan.seg_mask_row,
        plan.slot_rank, plan.slot_off, plan.slot_keep,
        x.shape[1],
        R=plan.rank_pad, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, DROPOUT=dropout, PRECISION=precision,
        ALIGNED=(x.shape[1] * x.element_size()) % 16 == 0 and a_cat.data_ptr() % 16 == 0,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return h
