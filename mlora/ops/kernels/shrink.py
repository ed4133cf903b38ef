"""Segment-grouped shrink: h[t] = drop(x[t])·A_slot(t)ᵀ for every covered token t.

h is [T, R] (R = the padded rank), in x's dtype like the reference's x_seg @ Aᵀ; A_slot
is rows [off, off + r) of the concatenated A_cat, the mask rows of the stacked masks. Each
program owns BLOCK_M rows of one segment (tiles never straddle segments here, so x is
read exactly once) and loops over d_in. Rows outside every segment are never
written: nothing reads them. Reading x dominates: this is a memory-bound pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mlora.ops.kernels.fused_gemm import SMEM_BYTES, smem_budget
from mlora.ops.kernels.interpret import INTERPRET
from mlora.ops.kernels.plan import SegmentPlan


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_k: int
    warps: int
    stages: int


INTERPRET_CONFIG = ShrinkConfig(block_m=16, block_k=16, warps=4, stages=1)


def block_m(rank_pad: int) -> int:
    """Rows per program: the plan's tiles are cut to it (SegmentPlan.shrink_block_m)."""
    return launch_config(rank_pad, 2).block_m


def launch_config(rank_pad: int, element_size: int, budget: int = SMEM_BYTES) -> ShrinkConfig:
    return INTERPRET_CONFIG if INTERPRET else config(rank_pad, element_size, budget)


def config(rank_pad: int, element_size: int, budget: int = SMEM_BYTES) -> ShrinkConfig:
    """Launch shape by padded rank, with as many stages as fit `budget` bytes of shared
    memory. H200 sweeps at 4096², T = 8192, K = 1 / 64 jobs (bench/ops/tune_passes.py
    --rank R): R = 128 took 49 / 72 us with the R ≤ 32 shape and 29 / 40 with its own
    (A's [BLOCK_K, R] tile is then the large one: half the K step, twice the rows), R = 64
    27 / 36 and 24 / 31. With dropout these shapes are untimed."""
    if rank_pad <= 32:
        bm, bk, warps, stages = 32, 128, 4, 4
    elif rank_pad <= 64:
        bm, bk, warps, stages = 64, 128, 4, 3
    else:
        bm, bk, warps, stages = 64, 64, 8, 4
    per_stage = (bm * bk + bk * rank_pad) * element_size
    return ShrinkConfig(bm, bk, warps, max(1, min(stages, budget // per_stage)))


@triton.jit
def shrink_kernel(
    x_ptr, h_ptr, a_cat, mask_ptr,
    seg_slot, seg_start, seg_end, tile_seg, tile_row, seg_mask_row, seg_rank, slot_off, slot_keep,
    K, A_STRIDE,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr, A_T: tl.constexpr,
):
    """A_T False: A_slot is rows [off, off + r) of a_cat (row stride A_STRIDE = K); A_T
    True: it is B_slotᵀ, columns [off, off + r) of b_cat [K, Σr] (A_STRIDE = Σr)."""
    tile = tl.program_id(0)
    j = tl.load(tile_seg + tile)
    row0 = tl.load(tile_row + tile)
    slot = tl.load(seg_slot + j)
    s0 = tl.load(seg_start + j)
    s1 = tl.load(seg_end + j)
    rank = tl.load(seg_rank + j)  # padded: the rows past the slot's rank are zeros
    off = tl.load(slot_off + slot).to(tl.int64)
    if A_T:  # element (r, k) at b_cat[k, off + r]
        stride_r = 1
        stride_k = A_STRIDE
        if ALIGNED:  # padded ranks, offsets and Σr multiples of 8: 16-byte loads along r
            off = tl.multiple_of(off, 8)
            rank = tl.multiple_of(rank, 8)
            stride_k = A_STRIDE // 8 * 8
        a_ptr = a_cat + off
    else:  # element (r, k) at a_cat[off + r, k]
        stride_r = A_STRIDE
        stride_k = 1
        a_ptr = a_cat + off * A_STRIDE
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
        acc = _rows(acc, x_ptr, a_ptr, mask_ptr, mask_row - s0, keep, rows64, row_ok, rr, r_ok, K, stride_r,
                    stride_k, True, PRECISION, BLOCK_K)
    else:
        acc = _rows(acc, x_ptr, a_ptr, mask_ptr, 0, 1.0, rows64, row_ok, rr, r_ok, K, stride_r, stride_k, False,
                    PRECISION, BLOCK_K)
    tl.store(h_ptr + rows64[:, None] * R + rr[None, :], acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _rows(
    acc, x_ptr, a_ptr, mask_ptr, mask_base, keep, rows64, row_ok, rr, r_ok, K, stride_r, stride_k,
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
        at = tl.load(a_ptr + rr[None, :] * stride_r + kk[:, None] * stride_k,
                     mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    return acc


def shrink(x: Tensor, a_cat: Tensor, masks: Tensor, plan: SegmentPlan, dropout: bool, precision: str) -> Tensor:
    """h [T, R] in x's dtype; rows of uncovered tokens are left unwritten.

    a_cat: [Σr, d_in]; masks: the stacked int8 keep-masks [rows, d_in] (any tensor when
    dropout is False)."""
    h = torch.empty(x.shape[0], plan.rank_pad, dtype=x.dtype, device=x.device)
    aligned = (x.shape[1] * x.element_size()) % 16 == 0 and a_cat.data_ptr() % 16 == 0
    _launch(x, h, a_cat, masks, plan, False, dropout, precision, aligned)
    return h


def shrink_b(dy: Tensor, b_cat: Tensor, plan: SegmentPlan, precision: str) -> Tensor:
    """g = dy·B_slot [T, R] in fp32 (what the dx GEMM's expand and the dA pass read);
    rows of uncovered tokens are left unwritten. b_cat: [d_out, Σr], B_slot its columns
    [off, off + r): the same kernel reading B_slotᵀ where it reads A_slot."""
    g = torch.empty(dy.shape[0], plan.rank_pad, dtype=torch.float32, device=dy.device)
    # slots start at multiples of 8 columns (`plan.padded_rank`): 16-byte aligned
    _launch(dy, g, b_cat, dy, plan, True, False, precision, b_cat.data_ptr() % 16 == 0)
    return g


def _launch(x: Tensor, out: Tensor, a_cat: Tensor, masks: Tensor, plan: SegmentPlan, a_t: bool, dropout: bool,
            precision: str, aligned: bool) -> None:
    if plan.n_shrink_tiles == 0:
        return
    cfg = launch_config(plan.rank_pad, x.element_size(), smem_budget(x.device))
    if plan.shrink_block_m != cfg.block_m:
        raise ValueError(f"the plan's shrink tiles have {plan.shrink_block_m} rows, the kernel {cfg.block_m}")
    shrink_kernel[(plan.n_shrink_tiles,)](
        x, out, a_cat, masks,
        plan.seg_slot, plan.seg_start, plan.seg_end, plan.shrink_seg, plan.shrink_row, plan.seg_mask_row,
        plan.seg_rank, plan.slot_off, plan.slot_keep,
        x.shape[1], a_cat.shape[1],
        R=plan.rank_pad, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, DROPOUT=dropout, PRECISION=precision,
        ALIGNED=aligned, A_T=a_t, num_warps=cfg.warps, num_stages=cfg.stages,
    )
