"""The SwiGLU's backward and the gate and up projections' dy passes as one pass.

In a Llama MLP's backward, act = silu(gate)·up hands d_act to a kernel that writes
d_gate and d_up, and then each projection's dy pass reads its gradient back for dB and
g = dy·B (`seg_grads`): at a 7B layer's shapes (T = 8192, 11008 wide) that is 206 µs of
elementwise kernel and 2 × 94 µs of dy passes, five tensors written or read twice over.
Here one program per (work item, column tile) computes the d_gate and d_up tiles of its
rows from d_act, gate and up, writes them (the dx GEMM reads them), and accumulates both
members' dB and adds their g shares on the way, as the dy pass does for one member.

Same sums as `fused_block`'s SwiGLU backward followed by the two dy passes: d_gate and
d_up are rounded to the input dtype before the products, as when they were read back.
Only where every token is in a segment (the programs visit segment rows only).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from mlora.ops.kernels import seg_grads
from mlora.ops.kernels.interpret import INTERPRET
from mlora.ops.kernels.plan import ItemPlan, SegmentPlan
from mlora.ops.kernels.seg_grads import REDUCE_BLOCK, PassConfig, reduce_partials_kernel
from mlora.ops.multi_lora import Segment


@triton.jit
def swiglu_dy_kernel(
    dh_ptr, gate_ptr, up_ptr, dg_ptr, du_ptr, h0_ptr, h1_ptr, g0_ptr, g1_ptr, b0_cat, b1_cat,
    out0_ptr, out1_ptr, part0_ptr, part1_ptr,
    item_slot, item_lo, item_hi, item_part, piece_start, piece_end,
    out_off, slot_rank, slot_off, slot_scale,
    D, RT, LEFT_STRIDE, G_STRIDE,
    R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    D_MAJOR: tl.constexpr,
):
    item = tl.program_id(0)
    d0 = tl.program_id(1) * BLOCK_D
    slot = tl.load(item_slot + item)
    rank = tl.load(slot_rank + slot)
    dd = d0 + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    rr = tl.arange(0, R)
    r_ok = rr < rank
    b_offs = tl.load(slot_off + slot) + dd[:, None].to(tl.int64) * RT + rr[None, :]  # B_i's [BLOCK_D, R] tile
    b_ok = d_ok[:, None] & r_ok[None, :]
    b0 = tl.load(b0_cat + b_offs, mask=b_ok, other=0.0)
    b1 = tl.load(b1_cat + b_offs, mask=b_ok, other=0.0)
    dtype = dh_ptr.dtype.element_ty
    acc0 = tl.zeros((BLOCK_D, R) if D_MAJOR else (R, BLOCK_D), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_D, R) if D_MAJOR else (R, BLOCK_D), dtype=tl.float32)
    for p in range(tl.load(item_lo + item), tl.load(item_hi + item)):
        p0 = tl.load(piece_start + p)
        p1 = tl.load(piece_end + p)
        # The tiles feed elementwise math, not a dot, so Triton's pipeliner does not
        # prefetch them: the next row block's loads are issued before this one's math.
        dh, gate, up = _tiles(dh_ptr, gate_ptr, up_ptr, p0, p1, dd, d_ok, D, BLOCK_M)
        for m0 in range(p0, p1, BLOCK_M):
            dh_next, gate_next, up_next = _tiles(dh_ptr, gate_ptr, up_ptr, m0 + BLOCK_M, p1, dd, d_ok, D, BLOCK_M)
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < p1
            rows64 = rows.to(tl.int64)
            tile = rows64[:, None] * D + dd[None, :]
            tile_ok = row_ok[:, None] & d_ok[None, :]
            dh = dh.to(tl.float32)
            gate = gate.to(tl.float32)
            up = up.to(tl.float32)
            sig = tl.sigmoid(gate)
            d_up = (dh * (gate * sig)).to(dtype)  # as fused_block's _swiglu_bwd
            d_gate = (dh * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype)
            tl.store(dg_ptr + tile, d_gate, mask=tile_ok)
            tl.store(du_ptr + tile, d_up, mask=tile_ok)
            left = rows64[:, None] * LEFT_STRIDE + rr[None, :]
            h0 = tl.load(h0_ptr + left, mask=row_ok[:, None], other=0.0).to(dtype)
            h1 = tl.load(h1_ptr + left, mask=row_ok[:, None], other=0.0).to(dtype)
            if D_MAJOR:
                acc0 = tl.dot(tl.trans(d_gate), h0, acc0, input_precision=PRECISION)
                acc1 = tl.dot(tl.trans(d_up), h1, acc1, input_precision=PRECISION)
            else:
                acc0 = tl.dot(tl.trans(h0), d_gate, acc0, input_precision=PRECISION)
                acc1 = tl.dot(tl.trans(h1), d_up, acc1, input_precision=PRECISION)
            g_rows = rows64[:, None] * G_STRIDE + rr[None, :]
            g_ok = row_ok[:, None] & r_ok[None, :]
            tl.atomic_add(g0_ptr + g_rows, tl.dot(d_gate, b0, input_precision=PRECISION), mask=g_ok, sem="relaxed")
            tl.atomic_add(g1_ptr + g_rows, tl.dot(d_up, b1, input_precision=PRECISION), mask=g_ok, sem="relaxed")
            dh, gate, up = dh_next, gate_next, up_next
    scale = tl.load(slot_scale + slot)
    acc0 = acc0 * scale
    acc1 = acc1 * scale
    part = tl.load(item_part + item)
    if D_MAJOR:
        d_idx, r_idx, tile_ok = dd[:, None], rr[None, :], d_ok[:, None] & r_ok[None, :]
    else:
        d_idx, r_idx, tile_ok = dd[None, :], rr[:, None], r_ok[:, None] & d_ok[None, :]
    if part < 0:  # dB_i is [D, rank]
        at = tl.load(out_off + slot) + d_idx.to(tl.int64) * rank + r_idx
        tl.store(out0_ptr + at, acc0.to(out0_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(out1_ptr + at, acc1.to(out1_ptr.dtype.element_ty), mask=tile_ok)
    else:  # partials are [R, D], summed by seg_grads.reduce_partials_kernel
        at = part.to(tl.int64) * R * D + r_idx * D + d_idx
        tl.store(part0_ptr + at, acc0, mask=d_idx < D)
        tl.store(part1_ptr + at, acc1, mask=d_idx < D)


@triton.jit
def _tiles(dh_ptr, gate_ptr, up_ptr, m0, p1, dd, d_ok, D, BLOCK_M: tl.constexpr):
    """d_act, gate and up at rows [m0, m0 + BLOCK_M) ∩ [.., p1), zeros elsewhere."""
    rows = m0 + tl.arange(0, BLOCK_M)
    tile = rows.to(tl.int64)[:, None] * D + dd[None, :]
    ok = (rows < p1)[:, None] & d_ok[None, :]
    return (tl.load(dh_ptr + tile, mask=ok, other=0.0), tl.load(gate_ptr + tile, mask=ok, other=0.0),
            tl.load(up_ptr + tile, mask=ok, other=0.0))


def enabled() -> bool:
    """MLORA_SWIGLU_PASS=0 runs the SwiGLU's backward and the dy passes apart (benchmarks compare both)."""
    return os.environ.get("MLORA_SWIGLU_PASS", "1") != "0"


def covers_every_token(segments: Sequence[Segment], tokens: int) -> bool:
    """The pass writes d_gate and d_up on segment rows only: usable where they are all rows
    (segments never overlap: `LoraCall.validate`)."""
    return tokens > 0 and sum(s.end - s.start for s in segments) == tokens


def pass_config(element_size: int, rank_pad: int) -> PassConfig:
    """The dy pass's launch shape at half its rows: each row block holds three loaded tiles
    (d_act, gate, up) and two results where the dy pass holds one."""
    cfg = seg_grads.dy_pass(element_size, rank_pad)
    return cfg if INTERPRET else dataclasses.replace(cfg, block_m=max(16, cfg.block_m // 2))


def swiglu_dy_pass(
    d_act: Tensor,
    gate: Tensor,
    up: Tensor,
    h: tuple[Tensor, Tensor],
    g: tuple[Tensor, Tensor],
    b_cat: tuple[Tensor, Tensor],
    out: tuple[Tensor, Tensor],
    out_off: Tensor,
    plan: SegmentPlan,
    items: ItemPlan,
    cfg: PassConfig,
    precision: str,
) -> tuple[Tensor, Tensor]:
    """(d_gate, d_up) of act = silu(gate)·up, and on the way each member's dB into its flat
    buffer `out[m]` and g = dy·B added into `g[m]` (by atomics), as `seg_grads.seg_grads`
    with g does per member. h and g are column slices of the shared call's h and g (rows
    contiguous); every tensor of [T, D] contiguous. Tokens must all lie in segments."""
    for t in (*h, *g):
        if t.stride(-1) != 1:
            raise ValueError(f"swiglu_dy_pass: h's and g's rows must be contiguous, got strides {t.stride()}")
    if h[0].stride(0) != h[1].stride(0) or g[0].stride(0) != g[1].stride(0):
        raise ValueError("swiglu_dy_pass: the members' h (and g) must be slices of one tensor")
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    width = gate.shape[1]
    r = plan.rank_pad
    parts = torch.empty(2, max(items.n_partials * r * width, 1), dtype=torch.float32, device=gate.device)
    swiglu_dy_kernel[(items.n_items, triton.cdiv(width, cfg.block_d))](
        d_act, gate, up, d_gate, d_up, h[0], h[1], g[0], g[1], b_cat[0], b_cat[1], out[0], out[1], parts[0], parts[1],
        items.item_slot, items.item_lo, items.item_hi, items.item_part, items.piece_start, items.piece_end,
        out_off, plan.slot_rank, plan.slot_off, plan.slot_scale,
        width, max(plan.rank_total, 1), h[0].stride(0), g[0].stride(0),
        R=r, PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, D_MAJOR=cfg.d_major,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    for m in range(2 if items.n_reduce else 0):
        reduce_partials_kernel[(items.n_reduce, triton.cdiv(r * width, REDUCE_BLOCK))](
            parts[m], out[m], items.red_slot, items.red_lo, items.red_hi, out_off, plan.slot_rank,
            width, R=r, OUT_T=True, BLOCK=REDUCE_BLOCK, num_warps=4, num_stages=1 if INTERPRET else 3,
        )
    return d_gate, d_up
