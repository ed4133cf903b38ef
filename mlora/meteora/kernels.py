"""Triton kernels for the MeteoRA delta over (token, choice) pairs sorted by adapter.

The T·k pairs are sorted by their adapter (a stable sort, on the device, no host
sync), so each adapter's pairs form one contiguous segment. Segments are cut into
tiles of BLOCK_M rows that never straddle two adapters; a tile table (adapter, first
row, end row) is built with tensor ops, sized cdiv(T·k, BLOCK_M) + K, its spare
entries empty. Three kernels, each used twice:

- shrink:  out[p] = src[token[p]] · W_eᵀ          (h = x·Aᵀ forward, g = dy·B backward)
- expand:  out[dst[p]] = ws[p] · (h[p] · W_eᵀ)     (y pairs forward, dx pairs backward)
- weight grad: G_e = Σ_{p in segment e} (ws[p]·left[p])ᵀ · right[token[p]]   (dA, dB)

ws[p] = weight · scale of the pair. Only [T·k, r] intermediates (h, g, fp32) are kept
between kernels; the per-pair outputs [T·k, d] are summed over k into [T, d] at once.
Ranks may differ: adapters are zero-padded to the largest rank, whose padded rows and
columns contribute, and receive, exactly zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 64


def _fix_interpreter_scalars() -> None:
    """Let loop bounds read at run time work under TRITON_INTERPRET=1 with NumPy ≥ 2.4.

    Triton 3.6's interpreter holds scalars as 1-element arrays and turns them into
    Python ints with int(array), which NumPy 2.4 refuses for arrays of ndim > 0; every
    `range(start, end)` over a loaded or passed-in bound then fails on CPU. Its
    __index__ patch is replaced by one that takes `.item()`. Interpreter only: compiled
    kernels never see this code.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mlora_scalar_fix", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mlora_scalar_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _fix_interpreter_scalars()


@dataclass(frozen=True)
class PairPlan:
    """Pairs sorted by adapter and the tiles that cover them."""

    order: Tensor  # [P] sorted position → flat pair index t·k + j
    token: Tensor  # [P] token of each sorted pair
    expert: Tensor  # [P] adapter of each sorted pair
    seg_start: Tensor  # [K] first sorted position of each adapter
    seg_end: Tensor  # [K]
    tile_expert: Tensor  # [n_tiles]
    tile_start: Tensor  # [n_tiles] (start == end for spare tiles)
    tile_end: Tensor  # [n_tiles]

    @property
    def n_tiles(self) -> int:
        return self.tile_expert.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.order, self.token, self.expert, self.seg_start, self.seg_end,
                self.tile_expert, self.tile_start, self.tile_end)


def plan_pairs(idx: Tensor, n_experts: int, block_m: int = BLOCK_M) -> PairPlan:
    """Sort the pairs of idx [T, k] by adapter and tile each adapter's segment."""
    k = idx.shape[1]
    flat = idx.reshape(-1).long()
    expert, order = torch.sort(flat, stable=True)
    experts = torch.arange(n_experts, device=idx.device)
    seg_start = torch.searchsorted(expert, experts)
    seg_end = torch.searchsorted(expert, experts, right=True)
    tiles_per = (seg_end - seg_start + block_m - 1) // block_m
    tile_cum = tiles_per.cumsum(0)
    n_tiles = triton.cdiv(flat.numel(), block_m) + n_experts
    tiles = torch.arange(n_tiles, device=idx.device)
    owner = torch.searchsorted(tile_cum, tiles, right=True)
    valid = owner < n_experts
    owner = owner.clamp(max=n_experts - 1)
    start = seg_start[owner] + (tiles - (tile_cum[owner] - tiles_per[owner])) * block_m
    end = torch.minimum(start + block_m, seg_end[owner])
    zero = torch.zeros_like(start)
    return PairPlan(order, order // k, expert, seg_start, seg_end, owner,
                    torch.where(valid, start, zero), torch.where(valid, end, zero))


@triton.jit
def _shrink_kernel(
    src_ptr, w_ptr, out_ptr, token_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    D, R,
    stride_st, stride_sd, stride_we, stride_wr, stride_wd, stride_op, stride_or,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
):
    """out[p, r] = Σ_d src[token[p], d] · W[e, r, d] for the rows of one tile (fp32 out)."""
    tile = tl.program_id(0)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = start + tl.arange(0, BM)
    row_mask = rows < end
    tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    r_mask = rr < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    if end > start:  # spare tiles skip the loop
        for d0 in range(0, D, BK):
            dd = d0 + tl.arange(0, BK)
            d_mask = dd < D
            src = tl.load(src_ptr + tok[:, None] * stride_st + dd[None, :] * stride_sd,
                          mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            w = tl.load(w_ptr + e * stride_we + rr[None, :] * stride_wr + dd[:, None] * stride_wd,
                        mask=d_mask[:, None] & r_mask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(src, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(src, w, acc)
    tl.store(out_ptr + rows[:, None] * stride_op + rr[None, :] * stride_or, acc,
             mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    h_ptr, ws_ptr, w_ptr, out_ptr, dst_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    N, R,
    stride_hp, stride_hr, stride_we, stride_wn, stride_wr, stride_ot, stride_on,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
):
    """out[dst[p], n] = ws[p] · Σ_r h[p, r] · W[e, n, r]; h is cast to W's dtype first."""
    tile = tl.program_id(0)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = start + tl.arange(0, BM)
    row_mask = rows < end
    dst = tl.load(dst_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    ws = tl.load(ws_ptr + rows, mask=row_mask, other=0.0)
    nn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_mask = nn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if end > start:  # spare tiles skip the loop
        for r0 in range(0, R, BR):
            rr = r0 + tl.arange(0, BR)
            r_mask = rr < R
            h = tl.load(h_ptr + rows[:, None] * stride_hp + rr[None, :] * stride_hr,
                        mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            w = tl.load(w_ptr + e * stride_we + rr[:, None] * stride_wr + nn[None, :] * stride_wn,
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(h.to(w.dtype), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(h.to(w.dtype), w, acc)
    acc = acc * ws[:, None]
    tl.store(out_ptr + dst[:, None] * stride_ot + nn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _weight_grad_kernel(
    left_ptr, ws_ptr, right_ptr, token_ptr, seg_start_ptr, seg_end_ptr, out_ptr,
    R, N,
    stride_lp, stride_lr, stride_rt, stride_rn, stride_oe, stride_or, stride_on,
    BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
):
    """out[e, r, n] = Σ_{p in segment e} ws[p] · left[p, r] · right[token[p], n]."""
    e = tl.program_id(0).to(tl.int64)
    rr = tl.program_id(1) * BR + tl.arange(0, BR)
    nn = tl.program_id(2) * BN + tl.arange(0, BN)
    r_mask = rr < R
    n_mask = nn < N
    start = tl.load(seg_start_ptr + e)
    end = tl.load(seg_end_ptr + e)
    acc = tl.zeros((BR, BN), dtype=tl.float32)
    for m0 in range(start, end, BM):
        rows = m0 + tl.arange(0, BM)
        row_mask = rows < end
        tok = tl.load(token_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        ws = tl.load(ws_ptr + rows, mask=row_mask, other=0.0)
        left = tl.load(left_ptr + rows[:, None] * stride_lp + rr[None, :] * stride_lr,
                       mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        right = tl.load(right_ptr + tok[:, None] * stride_rt + nn[None, :] * stride_rn,
                        mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        left = (left * ws[:, None]).to(right.dtype)
        if IEEE:
            acc = tl.dot(tl.trans(left), right, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(left), right, acc)
    tl.store(out_ptr + e * stride_oe + rr[:, None] * stride_or + nn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])


def _block_r(rank: int) -> int:
    """tl.dot needs every block dimension ≥ 16; ranks above 64 loop over r in chunks."""
    return max(16, min(64, triton.next_power_of_2(rank)))


def shrink(src: Tensor, w: Tensor, plan: PairPlan) -> Tensor:
    """[P, R] fp32: row p is src[token[p]] · W[e]ᵀ, for W viewed as [K, R, D]."""
    n_pairs, rank, depth = plan.token.shape[0], w.shape[1], w.shape[2]
    out = torch.empty(n_pairs, rank, dtype=torch.float32, device=src.device)
    br = _block_r(rank)
    grid = (plan.n_tiles, triton.cdiv(rank, br))
    _shrink_kernel[grid](
        src, w, out, plan.token, plan.tile_expert, plan.tile_start, plan.tile_end,
        depth, rank,
        src.stride(0), src.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BM=BLOCK_M, BR=br, BK=BLOCK_K, IEEE=src.dtype == torch.float32,
    )
    return out


def expand(h: Tensor, ws: Tensor, w: Tensor, plan: PairPlan, dtype: torch.dtype) -> Tensor:
    """[P, N] in dtype, row order[p] = ws[p] · h[p] · W[e]ᵀ, for W viewed as [K, N, R]."""
    n_pairs, width, rank = plan.token.shape[0], w.shape[1], w.shape[2]
    out = torch.empty(n_pairs, width, dtype=dtype, device=h.device)
    grid = (plan.n_tiles, triton.cdiv(width, BLOCK_N))
    _expand_kernel[grid](
        h, ws, w, out, plan.order, plan.tile_expert, plan.tile_start, plan.tile_end,
        width, rank,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BM=BLOCK_M, BN=BLOCK_N, BR=_block_r(rank), IEEE=w.dtype == torch.float32,
    )
    return out


def weight_grad(left: Tensor, ws: Tensor, right: Tensor, plan: PairPlan, out: Tensor) -> Tensor:
    """Fill out, viewed as [K, R, N], with Σ_segment (ws·left)ᵀ · right[token]."""
    n_experts, rank, width = out.shape
    br = _block_r(rank)
    grid = (n_experts, triton.cdiv(rank, br), triton.cdiv(width, BLOCK_N))
    _weight_grad_kernel[grid](
        left, ws, right, plan.token, plan.seg_start, plan.seg_end, out,
        rank, width,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BM=BLOCK_M, BR=br, BN=BLOCK_N, IEEE=right.dtype == torch.float32,
    )
    return out


def _stack_padded(mats: Sequence[Tensor], dim: int) -> Tensor:
    """Stack matrices whose size along `dim` (the rank) differs, zero-padding to the largest."""
    rank = max(m.shape[dim] for m in mats)
    if all(m.shape[dim] == rank for m in mats):
        return torch.stack(list(mats)).contiguous()
    shape = list(mats[0].shape)
    shape[dim] = rank
    out = mats[0].new_zeros(len(mats), *shape)
    for i, m in enumerate(mats):
        out[i].narrow(dim, 0, m.shape[dim]).copy_(m)
    return out


def forward(
    x: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], scales: Sequence[float], idx: Tensor, weights: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """delta [T, d_out] and what backward needs: stacked A/B, h, ws and the plan."""
    n_tokens, k = idx.shape
    x = x.contiguous()
    a_all = _stack_padded(lora_a, 0)  # [K, R, d_in]
    b_all = _stack_padded(lora_b, 1)  # [K, d_out, R]
    ranks = torch.tensor([a.shape[0] for a in lora_a])
    if n_tokens == 0:
        y = x.new_zeros(0, b_all.shape[1])
        return y, (a_all, b_all, ranks)
    plan = plan_pairs(idx, len(lora_a))
    scale_t = torch.tensor(list(scales), dtype=torch.float32, device=x.device)
    ws = (weights.reshape(-1).float()[plan.order] * scale_t[plan.expert]).contiguous()
    h = shrink(x, a_all, plan)
    pairs = expand(h, ws, b_all, plan, x.dtype)
    y = pairs.view(n_tokens, k, -1).sum(1, dtype=torch.float32).to(x.dtype) if k > 1 else pairs
    return y, (a_all, b_all, ranks, h, ws, scale_t, *plan.tensors())


def backward(
    dy: Tensor, x: Tensor, weights: Tensor, scales: Sequence[float], saved: Sequence[Tensor], need_dx: bool, need_ab: bool
) -> tuple[Tensor | None, Tensor, list[Tensor], list[Tensor]]:
    """dx, dweights, dA_e, dB_e (the adapter lists are empty unless need_ab)."""
    a_all, b_all, ranks, *rest = saved
    n_tokens, k = weights.shape
    rank_list = [int(r) for r in ranks]
    if n_tokens == 0:
        d_a = [a_all.new_zeros(r, a_all.shape[2]) for r in rank_list] if need_ab else []
        d_b = [b_all.new_zeros(b_all.shape[1], r) for r in rank_list] if need_ab else []
        return (torch.zeros_like(x) if need_dx else None), torch.zeros_like(weights), d_a, d_b
    h, ws, scale_t, *plan_t = rest
    plan = PairPlan(*plan_t)
    x = x.contiguous()
    g = shrink(dy, b_all.transpose(1, 2), plan)  # [P, R]: dy[token] · B_e
    dw_sorted = scale_t[plan.expert] * (g * h).sum(-1)
    dw = torch.empty_like(dw_sorted).scatter_(0, plan.order, dw_sorted).view(n_tokens, k).to(weights.dtype)
    dx = None
    if need_dx:
        pairs = expand(g, ws, a_all.transpose(1, 2), plan, x.dtype)  # W viewed [K, d_in, R]
        dx = pairs.view(n_tokens, k, -1).sum(1, dtype=torch.float32).to(x.dtype) if k > 1 else pairs
    d_a: list[Tensor] = []
    d_b: list[Tensor] = []
    if need_ab:
        grad_a = weight_grad(g, ws, x, plan, torch.empty_like(a_all))  # [K, R, d_in]
        grad_b = weight_grad(h, ws, dy, plan, torch.empty_like(b_all).transpose(1, 2)).transpose(1, 2)
        d_a = [grad_a[e, :r] for e, r in enumerate(rank_list)]
        d_b = [grad_b[e, :, :r] for e, r in enumerate(rank_list)]
    return dx, dw, d_a, d_b
