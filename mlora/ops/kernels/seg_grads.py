"""Per-slot token reductions for the adapter gradients.

    dA_i  = s_i · Σ_{t ∈ slot i} g[t]ᵀ · drop(x[t])        (left = g,  right = x)
    dB_iᵀ = s_i · Σ_{t ∈ slot i} h[t]ᵀ · dy[t]             (left = h,  right = dy)

One program per (work item, column tile of BLOCK_D): it loops over its item's token
pieces in BLOCK_M rows, accumulating a [R, BLOCK_D] fp32 tile (or its transpose,
[BLOCK_D, R] = rightᵀ·left: `PassConfig.d_major`, bf16 at R ≤ 16), so no atomics are
needed for the gradients and their result does not depend on scheduling. The dB
pass reads dy anyway, so at rank 16 it also computes g = dy·B_i on the way (`g_mode`):
each column tile adds its [BLOCK_M, R] share of the reduction over d_out into g with
relaxed fp32 atomics (the only atomics in the operator: g's summation order may vary
between runs at fp32 rounding; on sm_90 two elements an instruction, `_red_add_pairs`),
or, under torch's deterministic algorithms, stores it as that tile's fp32 partial of g,
which `reduce_g` then sums over the tiles in order.
Above rank 16 both cost more than reading dy again (above 32 with the paired atomics):
g is then a shrink of dy by B (`shrink.shrink_b`) and this pass computes dB alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mlora.ops.kernels.interpret import INTERPRET
from mlora.ops.kernels.plan import ItemPlan, SegmentPlan


@dataclass(frozen=True)
class PassConfig:
    """Launch shape of one reduction pass. per_sm: programs the item plan aims at, per SM.
    d_major: accumulate the transposed gradient, [BLOCK_D, R] = rightᵀ·left, so the
    streamed tile (dy, or x) is the left operand of its products (in the dy pass also of
    g = dy·B): Hopper's wgmma reads it from shared memory, transposed or not, where the
    [R, BLOCK_D] form (M = R, too small for wgmma) loads it into registers for mma.sync."""

    block_m: int
    block_d: int
    warps: int
    stages: int
    per_sm: int
    d_major: bool = False


INTERPRET_PASS = PassConfig(block_m=16, block_d=16, warps=4, stages=1, per_sm=4)


G_IN_DY_PASS_MAX_RANK = 16
# With g's atomics in pairs (`paired_red`, 16-bit), up to R = 32: H200, 4096 wide, K = 1 / 4 / 64,
# 50.8 / 49.5 / 63.5 us against dB alone plus a shrink of dy 57.2 / 58.3 / 68.6 (bench/README.md)
G_PAIRED_MAX_RANK = 32
D_MAJOR_MAX_RANK = 16  # the dy pass's d-major form was measured at R = 16 only (bench/README.md, 2026-12-03)
# The x pass's at R = 32 and 64 too (4 jobs, 4096 wide, H200): 27.1 / 32.8 us against 38.6 / 50.1
# for [R, BLOCK_D] at the same shapes (bench/README.md, 2026-12-04; the shared-input call's stacks)
X_D_MAJOR_MAX_RANK = 64
G_PARTIALS_MAX_BYTES = 64 << 20


def g_mode(rank_pad: int, tokens: int, d_out: int, block_d: int, deterministic: bool = False,
           paired: bool = False) -> str:
    """How g = dy·B is computed: "atomics" or "partials" (in the dy pass), or "shrink".

    In the dy pass each column tile holds a [T, R] share of g. Added up by atomics
    (T·R per column tile, scalar fp32 reductions at L2) they cost more than the pass's
    reads above R = 16: H200, 4096², T = 8192, K = 1 / 64 jobs (bench/ops/tune_passes.py
    --rank R), dB + g by atomics against dB alone plus a shrink of dy, in us: R = 16
    43 / 58 against 48 / 61; R = 32 74 / 105 against 54 / 72; R = 64 153 / 177 against
    65 / 84; R = 128 219 / 275 against 88 / 144. The atomics' order, hence g at fp32
    rounding, may vary between runs; with `deterministic` (torch's
    `use_deterministic_algorithms`) the shares are stored as partials ([d_out / BLOCK_D,
    T, R] fp32) and summed in order by `reduce_g`, or, past `G_PARTIALS_MAX_BYTES`,
    g is the shrink. Partials cost more than atomics: R = 16, dy pass 45 / 62 us
    against 42 / 58, the operator 1.17-1.26x the base GEMMs against 1.14-1.22x.
    `paired` (16-bit, g's atomics two at a time: `paired_red`): atomics up to
    G_PAIRED_MAX_RANK, except under `deterministic` (partials lost to the shrink there)."""
    if rank_pad > G_IN_DY_PASS_MAX_RANK:
        return "atomics" if paired and not deterministic and rank_pad <= G_PAIRED_MAX_RANK else "shrink"
    if not deterministic:
        return "atomics"
    if g_partials_bytes(rank_pad, tokens, d_out, block_d) <= G_PARTIALS_MAX_BYTES:
        return "partials"
    return "shrink"


def g_partials_bytes(rank_pad: int, tokens: int, d_out: int, block_d: int) -> int:
    return triton.cdiv(d_out, block_d) * tokens * rank_pad * 4


# The 16-bit rank-16 dy pass in 128 columns (two programs per SM aimed at) rather than 256
# (one): on an H100, T = 8192, K = 1 / 4 / 16 / 64 jobs, 39.0 / 39.6 / 44.7 / 46.1 us against
# 39.6 / 40.0 / 49.7 / 50.8 at width 4096; at 11008 80.7 / 89.0 / 88.1 / 109.4 against 81.5 /
# 79.5 / 97.0 / 115.0; an H200 the same way (bench/README.md, 2026-12-05, thirteenth session).
# Half-width blocks take half the shared memory, so twice as many stay resident to hide the
# short programs' pipeline fill and flush; at 11008 with few long segments, twice as many
# column tiles cost g twice the atomics.
NARROW_DY_MAX_WIDTH = 4096
NARROW_DY_MIN_SEGMENTS = 16


def narrow_dy(width: int, segments: int) -> bool:
    """Whether the 16-bit rank-16 dy pass takes 128-column tiles (see NARROW_DY_MAX_WIDTH)."""
    return width <= NARROW_DY_MAX_WIDTH or segments >= NARROW_DY_MIN_SEGMENTS


def dy_pass(element_size: int, rank_pad: int, paired: bool = False, *, width: int, segments: int) -> PassConfig:
    """The dB pass over dy [T, width] in `segments` segments, with g up to rank 16
    (`g_mode`; 32 when `paired`). Wide column tiles mean fewer g atomics (H200 sweep,
    bench/ops/tune_passes.py), except where the width is at most NARROW_DY_MAX_WIDTH or
    many short segments make many short programs (`narrow_dy`); B's [BLOCK_D, R] tile
    shares the block's shared memory, so wide ranks and fp32 take narrower tiles (all fit
    Hopper: tests/kernel_smem.py). dB alone at wide ranks: 8 warps (R = 128, K = 1 / 64
    jobs: 39 / 73 us, 4 warps and 2 stages 43 / 113)."""
    if INTERPRET:  # d-major where the GPU takes it for bf16 (R <= 16), so tests meet both forms
        return dataclasses.replace(INTERPRET_PASS, d_major=rank_pad <= D_MAJOR_MAX_RANK)
    if paired and element_size <= 2 and G_IN_DY_PASS_MAX_RANK < rank_pad <= G_PAIRED_MAX_RANK:
        # dB + g at R = 32: the best shape of 32 at K = 4 and 64, within 6 us of it at K = 1
        return PassConfig(block_m=64, block_d=128, warps=8, stages=3, per_sm=1, d_major=True)
    if rank_pad > G_IN_DY_PASS_MAX_RANK:
        return PassConfig(block_m=64 if element_size <= 2 else 32, block_d=128, warps=8, stages=3, per_sm=2)
    row_bytes = rank_pad * element_size
    if row_bytes <= 128 and element_size <= 2:  # d-major, 3 stages: 49.9 / 94.5 us against 52.6 /
        # 114.5 [R, BLOCK_D] with 2 stages at d_out 4096 / 11008 (4 jobs, H200). With g's atomics
        # in pairs, 4 warps and one program per SM: 34.8 / 67.2 us against 41.0 / 78.1 at 8 warps,
        # two per SM (the best of 64 shapes at 11008, within 0.5 us of the best at 4096)
        if narrow_dy(width, segments):
            return PassConfig(block_m=64, block_d=128, warps=4, stages=3, per_sm=2,
                              d_major=rank_pad <= D_MAJOR_MAX_RANK)
        return PassConfig(block_m=64, block_d=256, warps=4, stages=3, per_sm=1,
                          d_major=rank_pad <= D_MAJOR_MAX_RANK)
    if row_bytes <= 128:
        return PassConfig(block_m=64, block_d=256, warps=8, stages=2, per_sm=2)
    if row_bytes <= 256:
        return PassConfig(block_m=64, block_d=128, warps=4, stages=2, per_sm=2)
    return PassConfig(block_m=32, block_d=64, warps=4, stages=2, per_sm=2)


def x_pass(element_size: int, rank_pad: int, precision: str = "tf32") -> PassConfig:
    """The dA pass (one shape fits every rank and dtype; wide ranks one stage fewer: at
    R = 128, K = 64 jobs 130 us against 140, H200). True fp32 ("ieee": FMA products, the
    [R, BLOCK_D] accumulator in registers) narrows the tile as R grows: 128 columns
    spilled 0.3 / 5.4 / 10.9 KB a thread at R = 32 / 64 / 128 (tests/kernel_smem.py)."""
    if INTERPRET:
        return dataclasses.replace(INTERPRET_PASS, d_major=rank_pad <= X_D_MAJOR_MAX_RANK)
    block_d = max(16, 2048 // rank_pad) if precision == "ieee" else 128
    # d-major at R = 16 in bf16: 24.4 / 51.5 us against 25.5 / 56.5 at width 4096 / 11008
    d_major = element_size <= 2 and precision != "ieee" and rank_pad <= X_D_MAJOR_MAX_RANK
    return PassConfig(block_m=32, block_d=block_d, warps=4, stages=4 if rank_pad <= 32 else 3, per_sm=2,
                      d_major=d_major)


REDUCE_BLOCK = 64 if INTERPRET else 1024


@triton.jit
def seg_grad_kernel(
    left_ptr, right_ptr, out_ptr, part_ptr, g_ptr, b_cat, mask_ptr,
    item_slot, item_lo, item_hi, item_part, piece_start, piece_end, piece_seg,
    seg_start, seg_mask_row, out_off, slot_rank, slot_off, slot_scale, slot_keep,
    D, RT, G_ROWS, LEFT_STRIDE, G_STRIDE,
    R: tl.constexpr, OUT_T: tl.constexpr, DROPOUT: tl.constexpr, SHRINK_G: tl.constexpr,
    G_TILES: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    D_MAJOR: tl.constexpr, PAIRED_RED: tl.constexpr,
):
    item = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    slot = tl.load(item_slot + item)
    rank = tl.load(slot_rank + slot)
    dd = d0 + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    rr = tl.arange(0, R)
    r_ok = rr < rank
    keep = tl.load(slot_keep + slot) if DROPOUT else 1.0
    if SHRINK_G:  # B_i rows d0.. as a [BLOCK_D, R] tile: g[rows] += dy[rows, d-tile]·B_i[d-tile]
        b_ptr = b_cat + tl.load(slot_off + slot)  # B_i: columns off.. of B_cat [D, RT]
        b_tile = tl.load(b_ptr + dd[:, None].to(tl.int64) * RT + rr[None, :],
                         mask=d_ok[:, None] & r_ok[None, :], other=0.0)
    else:
        b_tile = tl.zeros((BLOCK_D, R), dtype=right_ptr.dtype.element_ty)
    if G_TILES:  # this column tile's own [G_ROWS, R] partial of g
        g_ptr += tl.program_id(1).to(tl.int64) * G_ROWS * G_STRIDE
    acc = tl.zeros((BLOCK_D, R) if D_MAJOR else (R, BLOCK_D), dtype=tl.float32)
    for p in range(tl.load(item_lo + item), tl.load(item_hi + item)):
        p0 = tl.load(piece_start + p)
        p1 = tl.load(piece_end + p)
        if DROPOUT:
            j = tl.load(piece_seg + p)
            mask_row = tl.load(seg_mask_row + j)
            mask_base = mask_row - tl.load(seg_start + j)  # the mask row of token t is t + mask_base
        else:
            mask_row = -1
            mask_base = 0
        # A piece with a mask runs its own copy of the loop, so the mask's load is
        # unconditional there and pipelined with x's (under a branch inside the loop it
        # was not: on an H200 the x pass with masks took 77-94 us at 4096², now 51-58).
        if mask_row >= 0:
            acc = _piece(acc, left_ptr, right_ptr, g_ptr, b_tile, mask_ptr, mask_base, keep, p0, p1, dd, d_ok,
                         rr, r_ok, D, LEFT_STRIDE, G_STRIDE, R, SHRINK_G, G_TILES, True, PRECISION, BLOCK_M, D_MAJOR,
                         PAIRED_RED)
        else:
            acc = _piece(acc, left_ptr, right_ptr, g_ptr, b_tile, mask_ptr, 0, keep, p0, p1, dd, d_ok,
                         rr, r_ok, D, LEFT_STRIDE, G_STRIDE, R, SHRINK_G, G_TILES, False, PRECISION, BLOCK_M,
                         D_MAJOR, PAIRED_RED)
    acc = acc * tl.load(slot_scale + slot)
    part = tl.load(item_part + item)
    if D_MAJOR:  # acc is [BLOCK_D, R]: index it by (column, rank)
        d_idx, r_idx, tile_ok = dd[:, None], rr[None, :], d_ok[:, None] & r_ok[None, :]
    else:  # acc is [R, BLOCK_D]
        d_idx, r_idx, tile_ok = dd[None, :], rr[:, None], r_ok[:, None] & d_ok[None, :]
    if part < 0:
        base = out_ptr + tl.load(out_off + slot)
        if OUT_T:  # dB_i is [D, rank]
            out_ptrs = base + d_idx.to(tl.int64) * rank + r_idx
        else:  # dA_i is [rank, D]
            out_ptrs = base + r_idx.to(tl.int64) * D + d_idx
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    else:  # partials are [R, D] either way
        part_ptrs = part_ptr + part.to(tl.int64) * R * D + r_idx * D + d_idx
        tl.store(part_ptrs, acc, mask=d_idx < D)


@triton.jit
def _piece(
    acc, left_ptr, right_ptr, g_ptr, b_tile, mask_ptr, mask_base, keep, p0, p1, dd, d_ok, rr, r_ok, D, LEFT_STRIDE,
    G_STRIDE, R: tl.constexpr, SHRINK_G: tl.constexpr, G_TILES: tl.constexpr, MASKED: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, D_MAJOR: tl.constexpr, PAIRED_RED: tl.constexpr,
):
    """acc + leftᵀ·drop(right) ([R, BLOCK_D]; D_MAJOR: acc + drop(right)ᵀ·left, [BLOCK_D, R])
    over the rows [p0, p1) of one piece; with SHRINK_G also right·B_i into g[rows]: stored
    as the column tile's partial (G_TILES) or added by atomics."""
    dtype = right_ptr.dtype.element_ty
    for m0 in range(p0, p1, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < p1
        rows64 = rows.to(tl.int64)
        tile_ok = row_ok[:, None] & d_ok[None, :]
        right = tl.load(right_ptr + rows64[:, None] * D + dd[None, :], mask=tile_ok, other=0.0)
        if MASKED:
            kept = tl.load(mask_ptr + (rows64 + mask_base)[:, None] * D + dd[None, :], mask=tile_ok, other=0)
            right = tl.where(kept != 0, right.to(tl.float32) * keep, 0.0).to(dtype)
        left = tl.load(left_ptr + rows64[:, None] * LEFT_STRIDE + rr[None, :], mask=row_ok[:, None], other=0.0)
        if D_MAJOR:
            acc = tl.dot(tl.trans(right), left.to(dtype), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(left.to(dtype)), right, acc, input_precision=PRECISION)
        if SHRINK_G:
            g_part = tl.dot(right, b_tile, input_precision=PRECISION)
            if G_TILES:  # every column past the rank is 0 (b_tile's): store whole rows
                tl.store(g_ptr + rows64[:, None] * G_STRIDE + rr[None, :], g_part, mask=row_ok[:, None])
            elif PAIRED_RED:
                _red_add_pairs(g_ptr + rows64[:, None] * G_STRIDE + rr[None, :], g_part,
                               row_ok[:, None] & r_ok[None, :])
            else:
                tl.atomic_add(g_ptr + rows64[:, None] * G_STRIDE + rr[None, :], g_part,
                              mask=row_ok[:, None] & r_ok[None, :], sem="relaxed")
    return acc


@triton.jit
def _red_add_pairs(ptrs, values, mask):
    """values added into ptrs by relaxed fp32 reductions at L2, two elements a thread holds
    side by side (the wgmma accumulator's column pairs) in one `red.v2` where their
    addresses are adjacent and 8-byte aligned, one at a time otherwise. `tl.atomic_add`
    emits one scalar `red` per element, and first moves the tile into another register
    layout through shared memory; this keeps the product's layout (sm_90: `red.v2.f32`).
    Operands: $0-$1 outputs (unused), $2-$3 addresses, $4-$5 values, $6-$7 masks."""
    tl.inline_asm_elementwise(
        """{
        .reg .pred pv, p0, p1, t;
        .reg .b64 e;
        setp.ne.b32 p0, $6, 0;
        setp.ne.b32 p1, $7, 0;
        add.s64 e, $2, 4;
        setp.eq.s64 pv, $3, e;
        and.b64 e, $2, 7;
        setp.eq.s64 t, e, 0;
        and.pred pv, pv, t;
        and.pred pv, pv, p0;
        and.pred pv, pv, p1;
        @pv red.relaxed.gpu.global.add.v2.f32 [$2], {$4, $5};
        not.pred pv, pv;
        and.pred t, pv, p0;
        @t red.relaxed.gpu.global.add.f32 [$2], $4;
        and.pred t, pv, p1;
        @t red.relaxed.gpu.global.add.f32 [$3], $5;
        mov.b32 $0, 0;
        mov.b32 $1, 0;
        }""",
        "=r,=r,l,l,f,f,r,r", [ptrs.to(tl.int64, bitcast=True), values, mask.to(tl.int32)], dtype=tl.int32,
        is_pure=False, pack=2)


@triton.jit
def reduce_partials_kernel(
    part_ptr, out_ptr, red_slot, red_lo, red_hi, out_off, slot_rank,
    D,
    R: tl.constexpr, OUT_T: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sum a split slot's fp32 partials in item order and write its gradient.

    Each program owns BLOCK consecutive elements of the flat [R, D] block, so the
    grid is wide even for one split slot, and its loads are contiguous.
    """
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_block = offs < R * D
    slot = tl.load(red_slot + i)
    rank = tl.load(slot_rank + slot)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(tl.load(red_lo + i), tl.load(red_hi + i)):
        acc += tl.load(part_ptr + p * (R * D) + offs, mask=in_block, other=0.0)
    r = offs // D
    d = offs % D
    base = out_ptr + tl.load(out_off + slot)
    if OUT_T:
        ptrs = base + d.to(tl.int64) * rank + r
    else:
        ptrs = base + r.to(tl.int64) * D + d
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_block & (r < rank))


@triton.jit
def reduce_g_kernel(part_ptr, g_ptr, n, tiles, BLOCK: tl.constexpr):
    """g = Σ over column tiles of their partials, in tile order: one flat [T·R] sum."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(tiles):
        acc += tl.load(part_ptr + c * n + offs, mask=ok, other=0.0)
    tl.store(g_ptr + offs, acc, mask=ok)


def pairs_fit(cfg: PassConfig, rank_pad: int) -> bool:
    """Whether g's [BLOCK_M, R] share gives every thread at least one wgmma fragment (4
    elements): with fewer, threads hold copies of one another's elements, and
    `_red_add_pairs` (unlike `tl.atomic_add`, which masks the copies) would add each copy
    (BLOCK_M = 32 at 8 warps gave g twice over on an H200)."""
    return cfg.block_m * rank_pad >= 4 * 32 * cfg.warps


@functools.lru_cache(maxsize=8)
def paired_red(device: torch.device, element_size: int) -> bool:
    """Whether the dy pass adds g two elements an instruction (`_red_add_pairs`): 16-bit
    inputs (g's share then comes from wgmma, whose fragments `pairs_fit` reasons about)
    compiled for sm_90 or later (`red.v2.f32`), unless MLORA_PAIRED_RED=0. On an H200 the
    7B layer's dy passes took 17-34 % less time (bench/README.md, 2026-12-04, third session)."""
    if (INTERPRET or device.type != "cuda" or element_size > 2
            or os.environ.get("MLORA_PAIRED_RED", "1") == "0"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def reduce_g(parts: Tensor) -> Tensor:
    """Sum the dy pass's [tiles, T, R] fp32 partials of g into g [T, R]; rows no item
    covers come out as whatever their partials held (never read, as with `shrink_b`)."""
    tiles, tokens, r = parts.shape
    g = torch.empty(tokens, r, dtype=torch.float32, device=parts.device)
    n = tokens * r
    if n:
        reduce_g_kernel[(triton.cdiv(n, REDUCE_BLOCK),)](parts, g, n, tiles, BLOCK=REDUCE_BLOCK, num_warps=4)
    return g


def seg_grads(
    left: Tensor,
    right: Tensor,
    out: Tensor,
    out_off: Tensor,
    plan: SegmentPlan,
    items: ItemPlan,
    cfg: PassConfig,
    transposed: bool,
    masks: Tensor,
    dropout: bool,
    precision: str,
    g: Tensor | None = None,
    b_cat: Tensor | None = None,
) -> None:
    """Write every used slot's gradient into its part of the flat buffer `out` (in its dtype).

    `items` must have been planned with cfg's block sizes. `g` and `b_cat` ([D, Σr])
    given: also compute g = right·B_slot (right is dy): a [T, R] g is added into by
    atomics, a [cdiv(D, cfg.block_d), T, R] one gets each column tile's partial (then
    `reduce_g`). `left` and g may be column slices of wider tensors (their rows
    contiguous, R columns read or added into). `masks`: the stacked int8 keep-masks,
    read only when dropout.
    """
    for name, t in (("left", left), ("g", g)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"seg_grads: {name}'s rows must be contiguous, got strides {t.stride()}")
    if items.n_items == 0:
        return
    width = right.shape[1]
    r = plan.rank_pad
    parts = torch.empty(max(items.n_partials * r * width, 1), dtype=torch.float32, device=right.device)
    shrink_g = g is not None
    tiles = g is not None and g.dim() == 3
    if tiles and g.shape[0] != triton.cdiv(width, cfg.block_d):
        raise ValueError(f"g's partials have {g.shape[0]} column tiles, the pass {triton.cdiv(width, cfg.block_d)}")
    seg_grad_kernel[(items.n_items, triton.cdiv(width, cfg.block_d))](
        left, right, out, parts, g if shrink_g else parts, b_cat if shrink_g else right, masks,
        items.item_slot, items.item_lo, items.item_hi, items.item_part,
        items.piece_start, items.piece_end, items.piece_seg,
        plan.seg_start, plan.seg_mask_row, out_off,
        plan.slot_rank, plan.slot_off, plan.slot_scale, plan.slot_keep,
        width, max(plan.rank_total, 1), g.shape[-2] if tiles else 0, left.stride(0), g.stride(-2) if shrink_g else r,
        R=r, OUT_T=transposed, DROPOUT=dropout, SHRINK_G=shrink_g, G_TILES=tiles, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, D_MAJOR=cfg.d_major,
        PAIRED_RED=shrink_g and not tiles and paired_red(right.device, right.element_size()) and pairs_fit(cfg, r),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    if items.n_reduce:
        reduce_partials_kernel[(items.n_reduce, triton.cdiv(r * width, REDUCE_BLOCK))](
            parts, out, items.red_slot, items.red_lo, items.red_hi, out_off, plan.slot_rank,
            width, R=r, OUT_T=transposed, BLOCK=REDUCE_BLOCK, num_warps=4, num_stages=1 if INTERPRET else 3,
        )
