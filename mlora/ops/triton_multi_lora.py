"""The multi-LoRA operator on Triton: same signatures and results as the reference.

forward:   h = drop(x)·Aᵀ per segment (shrink), then y = x·Wᵀ + bias + s·h·Bᵀ in one
           GEMM whose tiles add the LoRA expand as extra reduction steps.
backward:  one pass over dy gives dB (= s·dyᵀ·h per slot) and g = dy·B; then
           dx = dy·W + drop(s·g·A) in one GEMM, then one pass over x gives
           dA = s·gᵀ·drop(x) (optionally beside the GEMM on a side stream).

h (T × padded rank) is kept from forward for backward; g is T × padded rank in fp32.
The host work per call is kept flat in the number of jobs where it can be: plans are
found by the identity of the call, adapter address tables by the adapters' addresses,
and tensors are validated only when a table is built. See docs/kernels.md.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from mlora.ops.kernels import fused_gemm as gemm
from mlora.ops.kernels import seg_grads as grads
from mlora.ops.kernels import shrink as shrink_mod
from mlora.ops.kernels.interpret import INTERPRET
from mlora.ops.kernels.plan import (
    ItemPlan,
    SegmentPlan,
    item_plan,
    pointer_table,
    segment_plan,
)
from mlora.ops.multi_lora import LoraCall

PARTIAL_BUDGET_BYTES = 16 << 20  # fp32 partials of split slots, per gradient pass
# On CUDA, run the dA pass on a side stream beside the dx GEMM. Off: measured on an
# H100 (bench/ops, 2026-11-24) it saved nothing, the GEMM slowing by what it hid.
OVERLAP_GRAD_A = False
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_BY_CALL: OrderedDict[int, _CallState] = OrderedDict()
_BY_CALL_MAX = 2048  # a forward of every adapted linear of a model, then their backwards


@dataclass
class _CallState:
    """What one LoraCall needs on one device; forward and backward share the object."""

    call: LoraCall
    tokens: int
    device: torch.device
    ranks: tuple[int, ...]
    plan: SegmentPlan
    items: dict[int, ItemPlan] = field(default_factory=dict)


def _state(x: Tensor, lora_a: Sequence[Tensor], call: LoraCall) -> _CallState:
    """Per-call state, found by identity (cheap) before the per-layout cache (hashes segments)."""
    st = _BY_CALL.get(id(call))
    if st is not None and st.call is call and st.tokens == x.shape[0] and st.device == x.device:
        return st
    ranks = tuple(a.shape[0] for a in lora_a)
    plan = segment_plan(call.segments, call.scales, call.dropout, ranks, x.shape[0], x.device, shrink_mod.BLOCK_M)
    st = _CallState(call, x.shape[0], x.device, ranks, plan)
    _BY_CALL[id(call)] = st
    if len(_BY_CALL) > _BY_CALL_MAX:
        _BY_CALL.popitem(last=False)
    return st


def _items(st: _CallState, width: int) -> ItemPlan:
    if width not in st.items:
        st.items[width] = item_plan(st.call.segments, width, st.plan.rank_pad, st.device, grads.BLOCK_M,
                                    grads.BLOCK_D, _target_programs(st.device), PARTIAL_BUDGET_BYTES)
    return st.items[width]


def _precision(x: Tensor) -> str:
    """fp32 inputs follow torch's matmul setting (true fp32 unless TF32 is allowed)."""
    if x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=8)
def _target_programs(device: torch.device) -> int:
    """Reduction programs wanted: several per SM, so waves are short and bytes in flight many."""
    if device.type == "cuda" and not INTERPRET:
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _adapter_tables(x: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                    d_out: int) -> tuple[Tensor, Tensor, bool]:
    """Address tables of A and B, and whether every A is 16-byte aligned; layouts are
    checked in full when a table is built."""
    dtype = x.dtype
    if not all(t.dtype == dtype and t.is_contiguous() for t in (*lora_a, *lora_b)):
        raise ValueError(f"triton multi-LoRA needs contiguous adapters in {dtype}")

    def check() -> None:
        for a, b in zip(lora_a, lora_b):
            r = a.shape[0]
            if a.device != x.device or b.device != x.device or a.shape != (r, x.shape[1]) or b.shape != (d_out, r):
                raise ValueError(f"adapter shapes {tuple(a.shape)}, {tuple(b.shape)} on {a.device} do not fit "
                                 f"x {tuple(x.shape)} on {x.device} and d_out {d_out}")

    a_tab, a_aligned = pointer_table(lora_a, x.device, check)
    b_tab, _ = pointer_table(lora_b, x.device, check)
    return a_tab, b_tab, a_aligned


def _mask_table(masks: Sequence[Tensor | None], st: _CallState, width: int) -> tuple[Tensor, bool, list[Tensor]]:
    """Addresses of the sorted segments' keep-masks (0: no dropout), and the tensors to keep alive."""
    call, plan = st.call, st.plan
    if not any(call.has_masks):
        return pointer_table([None] * plan.n_segments, st.device)[0], False, []
    kept: list[Tensor | None] = []
    for k in plan.order:
        seg, mask = call.segments[k], masks[k]
        if mask is None or call.dropout[seg.slot] == 0.0:
            kept.append(None)
            continue
        if mask.shape != (seg.end - seg.start, width) or mask.device != st.device:
            raise ValueError(f"dropout mask of {seg} must be [{seg.end - seg.start}, {width}] on {st.device}")
        kept.append(mask.contiguous())
    alive = [m for m in kept if m is not None]
    return pointer_table(kept, st.device)[0], bool(alive), alive


def _check_base(x: Tensor, weight: Tensor) -> None:
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"triton multi-LoRA needs W in {x.dtype} on {x.device}, got {weight.dtype} on {weight.device}")


def forward_keep_shrink(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    call: LoraCall,
    use_tma: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """(y, h): the reference forward's y, and h = drop(x)·Aᵀ [T, R] for backward."""
    _check_base(x, weight)
    x, weight = x.contiguous(), weight.contiguous()
    st = _state(x, lora_a, call)
    a_tab, b_tab, aligned = _adapter_tables(x, lora_a, lora_b, weight.shape[0])
    precision = _precision(x)
    mask_tab, dropout, _alive = _mask_table(masks, st, x.shape[1])
    h = shrink_mod.shrink(x, a_tab, mask_tab, st.plan, dropout, precision, aligned)
    y = gemm.fused_gemm(x, weight, bias, h, b_tab, mask_tab, st.plan,
                        w_kn=False, dropout=False, precision=precision, use_tma=use_tma)
    return y, h


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    call: LoraCall,
    use_tma: bool | None = None,
) -> Tensor:
    """Same as reference_forward."""
    return forward_keep_shrink(x, weight, bias, lora_a, lora_b, masks, call, use_tma)[0]


@functools.lru_cache(maxsize=64)
def _offsets(ranks: tuple[int, ...], width: int, device: torch.device) -> tuple[Tensor, tuple[int, ...]]:
    """Each slot's element offset into a flat buffer of [rank, width] blocks."""
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r * width)
    host = torch.tensor(offs[:-1] or [0], dtype=torch.int64)
    dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    return dev, tuple(offs)


def _split(flat: Tensor, ranks: tuple[int, ...], ends: tuple[int, ...], rows_first: bool, width: int) -> list[Tensor]:
    """Per-slot views of a flat gradient buffer: [rank, width] (dA) or [width, rank] (dB)."""
    if len(set(ranks)) == 1:  # one view call for all slots
        r = ranks[0]
        return list(flat.view(len(ranks), r, width).unbind(0) if rows_first else flat.view(len(ranks), width, r).unbind(0))
    return [flat[ends[i] : ends[i + 1]].view((r, width) if rows_first else (width, r)) for i, r in enumerate(ranks)]


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    call: LoraCall,
    need_dx: bool,
    h: Tensor | None = None,
    use_tma: bool | None = None,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """Same as reference_backward; pass forward's h to skip recomputing it."""
    _check_base(x, weight)
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    tokens, d_in = x.shape
    d_out = dy.shape[1]
    st = _state(x, lora_a, call)
    plan, ranks = st.plan, st.ranks
    a_tab, b_tab, aligned = _adapter_tables(x, lora_a, lora_b, d_out)
    precision = _precision(x)
    mask_tab, dropout, _alive = _mask_table(masks, st, d_in)
    if h is None:
        h = shrink_mod.shrink(x, a_tab, mask_tab, plan, dropout, precision, aligned)

    off_a, ends_a = _offsets(ranks, d_in, x.device)
    off_b, ends_b = _offsets(ranks, d_out, x.device)
    alloc = torch.empty if all(plan.slot_used) else torch.zeros  # a slot without tokens gets zeros
    flat_a = alloc(ends_a[-1], dtype=x.dtype, device=x.device)
    flat_b = alloc(ends_b[-1], dtype=x.dtype, device=x.device)
    d_a = _split(flat_a, ranks, ends_a, True, d_in)
    d_b = _split(flat_b, ranks, ends_b, False, d_out)

    g = torch.zeros(tokens, plan.rank_pad, dtype=torch.float32, device=x.device)
    if plan.n_segments:
        grads.seg_grads(h, dy, flat_b, off_b, plan, _items(st, d_out), transposed=True,
                        mask_tab=mask_tab, dropout=False, precision=precision, g=g, b_tab=b_tab)

    def grad_a() -> None:
        if plan.n_segments:
            grads.seg_grads(g, x, flat_a, off_a, plan, _items(st, d_in), transposed=False,
                            mask_tab=mask_tab, dropout=dropout, precision=precision)

    def grad_x() -> Tensor:
        return gemm.fused_gemm(dy, weight, None, g, a_tab, mask_tab, plan, w_kn=True, dropout=dropout,
                               precision=precision, use_tma=use_tma, v_aligned=aligned)

    if not need_dx:
        grad_a()
        return None, d_a, d_b
    side = _side_stream(x.device) if plan.n_segments and OVERLAP_GRAD_A else None
    if side is None:
        dx = grad_x()
        grad_a()
        return dx, d_a, d_b
    # The dA pass only reads memory; run it beside the compute-bound dx GEMM. Every
    # later use on the main stream is ordered after it by the final wait_stream, so
    # the buffers it reads may return to the main stream's pool when this returns.
    main = torch.cuda.current_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        grad_a()
    dx = grad_x()
    main.wait_stream(side)
    return dx, d_a, d_b


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]
