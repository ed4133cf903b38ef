"""Host-side plans: the segment layout of a call turned into small int32 device tables.

The layout (which slot owns which token range) is host metadata in `LoraCall`, so the
tables are built with NumPy, sent to the device in one copy, and cached per layout:
every adapted linear of a batch shares them, and kernels never sync with the host.
The adapters arrive concatenated along the rank (A_cat [Σr, d_in], B_cat [d_out, Σr])
and the dropout masks stacked in segment order, so kernels find a slot's adapter and a
segment's mask by offsets that depend on the layout alone: no table holds a tensor's
address, and a captured CUDA graph stays valid whatever those tensors' addresses are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mlora.ops.multi_lora import Segment


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


RANK_ALIGN = 8


def padded_rank(rank: int) -> int:
    """A slot's rows in A_cat (columns in B_cat): its rank rounded up to a multiple of 8,
    the rows past the rank zero. Every slot's offset, and Σ, are then multiples of 8 too,
    so kernels read the adapters 16 bytes at a time (docs/kernels.md, "Reading B")."""
    return cdiv(rank, RANK_ALIGN) * RANK_ALIGN


def rank_block(ranks: Sequence[int]) -> int:
    """Every slot's rank padded to one power of two ≥ 16 (tl.dot's smallest side)."""
    return max(16, 1 << (max(ranks, default=1) - 1).bit_length())


def _to_device(arrays: dict[str, np.ndarray], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Concatenate, copy once (pinned, non-blocking on CUDA), and hand back views."""
    names = list(arrays)
    flat = np.concatenate([arrays[n].ravel() for n in names]) if names else np.zeros(0)
    host = torch.from_numpy(np.ascontiguousarray(flat)).to(dtype)
    if device.type == "cuda":
        buf = host.pin_memory().to(device, non_blocking=True)
    else:
        buf = host.to(device)
    out, at = {}, 0
    for n in names:
        size = arrays[n].size
        out[n] = buf[at : at + size]
        at += size
    return out


@dataclass(frozen=True)
class SegmentPlan:
    """Tables for the non-empty segments of one call, sorted by start.

    tok_lo[t] / tok_hi[t]: the segments meeting rows [m0, m1) of a GEMM tile are the
    sorted indices [tok_lo[m0], tok_hi[m1]), whatever BLOCK_M the autotuner picks.
    shrink_seg / shrink_row: the shrink kernel's tiles, each inside one segment.
    slot_off: each slot's first row in A_cat (first column in B_cat); slots are laid out
    at `padded_rank` rows each. slot_rank is the rank, seg_rank the padded rank (the
    shrink's and the GEMM's operands: the padding is zeros).
    seg_mask_row: each segment's first row in the stacked dropout masks, or -1.
    """

    rank_pad: int
    order: tuple[int, ...]  # index into call.segments of each sorted non-empty segment
    slot_used: tuple[bool, ...]
    rank_total: int  # Σ padded ranks: A_cat's rows, B_cat's row stride
    shrink_block_m: int  # rows of the shrink's tiles
    mask_order: tuple[int, ...]  # index into call.segments of each mask, in stacking order
    seg_slot: Tensor
    seg_start: Tensor
    seg_end: Tensor
    tok_lo: Tensor
    tok_hi: Tensor
    shrink_seg: Tensor
    shrink_row: Tensor
    seg_mask_row: Tensor
    slot_rank: Tensor
    slot_off: Tensor
    slot_scale: Tensor  # fp32
    slot_keep: Tensor  # fp32: 1 / (1 - p)
    seg_off: Tensor  # the slot tables again, per sorted segment: the GEMM epilogue's
    seg_rank: Tensor  # operands are then one table read away from the tile, not two
    seg_scale: Tensor  # fp32
    seg_keep: Tensor  # fp32
    bounds: tuple[tuple[int, int], ...] = ()  # (start, end) of each sorted segment, on the host

    @property
    def n_segments(self) -> int:
        return len(self.order)

    def most_segments_per_tile(self, block_m: int, tokens: int) -> int:
        """The most segments any [block_m]-row tile of a GEMM over `tokens` rows meets
        (what tok_lo / tok_hi give the kernel), known on the host without a sync."""
        return _most_per_tile(self.bounds, block_m, tokens)

    @property
    def n_shrink_tiles(self) -> int:
        return self.shrink_seg.shape[0]


@functools.lru_cache(maxsize=256)
def _most_per_tile(bounds: tuple[tuple[int, int], ...], block_m: int, tokens: int) -> int:
    if not bounds or tokens <= 0:
        return 0
    starts = np.array([s for s, _ in bounds])
    ends = np.array([e for _, e in bounds])
    m0 = np.arange(0, tokens, block_m)
    lo = np.searchsorted(ends, m0, side="right")
    hi = np.searchsorted(starts, np.minimum(m0 + block_m, tokens), side="left")
    return int((hi - lo).max())


def _sorted_nonempty(segments: Sequence[Segment]) -> list[tuple[int, Segment]]:
    return sorted(((k, s) for k, s in enumerate(segments) if s.end > s.start), key=lambda ks: ks[1].start)


@functools.lru_cache(maxsize=64)
def segment_plan(
    segments: tuple[Segment, ...],
    scales: tuple[float, ...],
    dropout: tuple[float, ...],
    has_masks: tuple[bool, ...],
    ranks: tuple[int, ...],
    tokens: int,
    device: torch.device,
    shrink_block_m: int,
) -> SegmentPlan:
    """Build (or fetch) the device tables of one layout; see SegmentPlan.

    A segment's mask counts only when its slot has dropout; masks are stacked in the
    sorted segments' order.
    """
    live = _sorted_nonempty(segments)
    mask_rows, mask_order, at = [], [], 0
    for k, s in live:
        if has_masks[k] and dropout[s.slot] > 0.0:
            mask_rows.append(at)
            mask_order.append(k)
            at += s.end - s.start
        else:
            mask_rows.append(-1)
    starts = np.array([s.start for _, s in live], dtype=np.int64)
    ends = np.array([s.end for _, s in live], dtype=np.int64)
    positions = np.arange(tokens + 1)
    tiles = [(j, row) for j, (_, s) in enumerate(live) for row in range(s.start, s.end, shrink_block_m)]
    seg_slots = np.array([s.slot for _, s in live], dtype=np.int64)
    padded = [padded_rank(r) for r in ranks]
    slot_off = np.cumsum([0, *padded[:-1]], dtype=np.int64) if ranks else np.zeros(0, dtype=np.int64)
    slot_scale = np.array(scales, dtype=np.float64)
    slot_keep = np.array([1.0 / (1.0 - p) if p < 1.0 else 0.0 for p in dropout], dtype=np.float64)
    ints = _to_device(
        {
            "seg_slot": seg_slots,
            "seg_start": starts,
            "seg_end": ends,
            "tok_lo": np.searchsorted(ends, positions, side="right"),  # segments with end ≤ t
            "tok_hi": np.searchsorted(starts, positions, side="left"),  # segments with start < t
            "shrink_seg": np.array([j for j, _ in tiles], dtype=np.int64),
            "shrink_row": np.array([r for _, r in tiles], dtype=np.int64),
            "seg_mask_row": np.array(mask_rows, dtype=np.int64),
            "slot_rank": np.array(ranks, dtype=np.int64),
            "slot_off": slot_off,
            "seg_off": slot_off[seg_slots],
            "seg_rank": np.array(padded, dtype=np.int64)[seg_slots],
        },
        torch.int32,
        device,
    )
    floats = _to_device(
        {
            "slot_scale": slot_scale,
            "slot_keep": slot_keep,
            "seg_scale": slot_scale[seg_slots],
            "seg_keep": slot_keep[seg_slots],
        },
        torch.float32,
        device,
    )
    used = {s.slot for _, s in live}
    return SegmentPlan(
        rank_pad=rank_block(ranks),
        order=tuple(k for k, _ in live),
        slot_used=tuple(i in used for i in range(len(ranks))),
        rank_total=sum(padded),
        shrink_block_m=shrink_block_m,
        mask_order=tuple(mask_order),
        **ints,
        **floats,
        bounds=tuple((s.start, s.end) for _, s in live),
    )


@dataclass(frozen=True)
class ItemPlan:
    """Work items of the per-slot token reductions (dA, dB) for one output width.

    An item is one slot's run of token pieces (each piece inside one segment); one
    program per (item, column tile) loops over them. A slot with one item writes its
    gradient directly; a slot split over several items (to fill the GPU when few jobs
    hold many tokens) writes fp32 partials that a second kernel sums in a fixed order,
    so results are deterministic.
    """

    n_items: int
    n_partials: int
    item_slot: Tensor
    item_lo: Tensor
    item_hi: Tensor
    item_part: Tensor  # partial index, or -1: write the gradient directly
    piece_start: Tensor
    piece_end: Tensor
    piece_seg: Tensor  # sorted segment index (for its dropout mask)
    red_slot: Tensor
    red_lo: Tensor
    red_hi: Tensor

    @property
    def n_reduce(self) -> int:
        return self.red_slot.shape[0]


@functools.lru_cache(maxsize=64)
def item_plan(
    segments: tuple[Segment, ...],
    width: int,
    rank_pad: int,
    device: torch.device,
    block_m: int,
    block_d: int,
    target_programs: int,
    partial_budget_bytes: int,
) -> ItemPlan:
    """Split each slot's tokens into items so items × column tiles ≈ target_programs.

    The number of split items is capped so the fp32 partials stay under the budget.
    (Capping items × column tiles at target_programs instead, so that the 7B batch's
    4096-wide dy pass is 128 programs in one wave rather than 192, left the trainer's
    step where it was: bench/README.md, 2026-12-04, fifth session.)
    """
    live = _sorted_nonempty(segments)
    by_slot: dict[int, list[tuple[int, int, int]]] = {}
    for j, (_, s) in enumerate(live):
        by_slot.setdefault(s.slot, []).append((s.start, s.end, j))
    covered = sum(s.end - s.start for _, s in live)
    want = max(1, cdiv(target_programs, cdiv(width, block_d)))
    want = min(want, max(1, partial_budget_bytes // (rank_pad * width * 4)))
    chunk = cdiv(max(block_m, cdiv(covered, want)), block_m) * block_m

    items: list[tuple[int, int, int, int]] = []  # slot, piece lo, piece hi, partial
    pieces: list[tuple[int, int, int]] = []
    reduce: list[tuple[int, int, int]] = []
    n_partials = 0
    for slot in sorted(by_slot):
        runs = by_slot[slot]
        rows = sum(e - s for s, e, _ in runs)
        per_item = cdiv(cdiv(rows, cdiv(rows, chunk)), block_m) * block_m
        first_part = n_partials
        cut: list[list[tuple[int, int, int]]] = [[]]
        room = per_item
        for start, end, j in runs:
            while start < end:
                if room == 0:
                    cut.append([])
                    room = per_item
                take = min(room, end - start)
                cut[-1].append((start, start + take, j))
                start += take
                room -= take
        split = len(cut) > 1
        for group in cut:
            part = n_partials if split else -1
            n_partials += int(split)
            items.append((slot, len(pieces), len(pieces) + len(group), part))
            pieces.extend(group)
        if split:
            reduce.append((slot, first_part, n_partials))

    def col(rows: list[tuple], k: int) -> np.ndarray:
        return np.array([r[k] for r in rows], dtype=np.int64)

    t = _to_device(
        {
            "item_slot": col(items, 0),
            "item_lo": col(items, 1),
            "item_hi": col(items, 2),
            "item_part": col(items, 3),
            "piece_start": col(pieces, 0),
            "piece_end": col(pieces, 1),
            "piece_seg": col(pieces, 2),
            "red_slot": col(reduce, 0),
            "red_lo": col(reduce, 1),
            "red_hi": col(reduce, 2),
        },
        torch.int32,
        device,
    )
    return ItemPlan(n_items=len(items), n_partials=n_partials, **t)
