"""The multi-LoRA operator on Triton: same signatures and results as the reference.

forward:   h = drop(x)·Aᵀ per segment (shrink), then y = x·Wᵀ + bias + s·h·Bᵀ in one
           GEMM whose tiles add the LoRA expand as extra reduction steps.
backward:  one pass over dy gives dB (= s·dyᵀ·h per slot) and g = dy·B; then
           dx = dy·W + drop(s·g·A) in one GEMM; then one pass over x gives dA = s·gᵀ·drop(x).

h (T × padded rank) is kept from forward for backward; g is T × padded rank in fp32.
See docs/kernels.md for the design and mlora/ops/kernels/ for the kernels.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from mlora.ops.kernels import fused_gemm as gemm
from mlora.ops.kernels import seg_grads as grads
from mlora.ops.kernels import shrink as shrink_mod
from mlora.ops.kernels.interpret import INTERPRET
from mlora.ops.kernels.plan import ItemPlan, SegmentPlan, item_plan, pointer_table, segment_plan
from mlora.ops.multi_lora import LoraCall

PARTIAL_BUDGET_BYTES = 8 << 20  # fp32 partials of split slots, per gradient pass
OVERLAP_GRAD_A = True  # on CUDA, run the dA pass on a side stream beside the dx GEMM
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _precision(x: Tensor) -> str:
    """fp32 inputs follow torch's matmul setting (true fp32 unless TF32 is allowed)."""
    if x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _plan(x: Tensor, lora_a: Sequence[Tensor], call: LoraCall) -> SegmentPlan:
    ranks = tuple(a.shape[0] for a in lora_a)
    return segment_plan(call.segments, call.scales, call.dropout, ranks, x.shape[0], x.device, shrink_mod.BLOCK_M)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda" and not INTERPRET:
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _items(x: Tensor, call: LoraCall, plan: SegmentPlan, width: int) -> ItemPlan:
    return item_plan(call.segments, width, plan.rank_pad, x.device, grads.BLOCK_M, grads.BLOCK_D,
                     _target_programs(x.device), PARTIAL_BUDGET_BYTES)


def _mask_table(masks: Sequence[Tensor | None], call: LoraCall, plan: SegmentPlan, width: int,
                device: torch.device) -> tuple[Tensor, bool, list[Tensor]]:
    """Addresses of the sorted segments' keep-masks (0: no dropout), and the kept tensors."""
    kept: list[Tensor | None] = []
    for k in plan.order:
        seg, mask = call.segments[k], masks[k]
        if mask is None or call.dropout[seg.slot] == 0.0:
            kept.append(None)
            continue
        if mask.shape != (seg.end - seg.start, width) or mask.device != device:
            raise ValueError(f"dropout mask of {seg} must be [{seg.end - seg.start}, {width}] on {device}")
        kept.append(mask.contiguous())
    alive = [m for m in kept if m is not None]
    return pointer_table(kept, device), bool(alive), alive


def _check(x: Tensor, weight: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor]) -> None:
    for t in (weight, *lora_a, *lora_b):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"triton multi-LoRA needs every tensor in {x.dtype} on {x.device}, got {t.dtype} on {t.device}")


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
    _check(x, weight, lora_a, lora_b)
    x, weight = x.contiguous(), weight.contiguous()
    lora_a = [a.contiguous() for a in lora_a]
    lora_b = [b.contiguous() for b in lora_b]
    plan = _plan(x, lora_a, call)
    precision = _precision(x)
    mask_tab, dropout, _alive = _mask_table(masks, call, plan, x.shape[1], x.device)
    h = shrink_mod.shrink(x, pointer_table(lora_a, x.device), mask_tab, plan, dropout, precision)
    y = gemm.fused_gemm(x, weight, bias, h, pointer_table(lora_b, x.device), mask_tab, plan,
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
    _check(x, weight, lora_a, lora_b)
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    lora_a = [a.contiguous() for a in lora_a]
    lora_b = [b.contiguous() for b in lora_b]
    tokens, d_in = x.shape
    d_out = dy.shape[1]
    plan = _plan(x, lora_a, call)
    precision = _precision(x)
    mask_tab, dropout, _alive = _mask_table(masks, call, plan, d_in, x.device)
    a_tab = pointer_table(lora_a, x.device)
    b_tab = pointer_table(lora_b, x.device)
    ranks = tuple(a.shape[0] for a in lora_a)
    if h is None:
        h = shrink_mod.shrink(x, a_tab, mask_tab, plan, dropout, precision)

    off_a, ends_a = _offsets(ranks, d_in, x.device)
    off_b, ends_b = _offsets(ranks, d_out, x.device)
    alloc = torch.empty if all(plan.slot_used) else torch.zeros  # a slot without tokens gets zeros
    flat_a = alloc(ends_a[-1], dtype=x.dtype, device=x.device)
    flat_b = alloc(ends_b[-1], dtype=x.dtype, device=x.device)
    d_a = [flat_a[ends_a[i] : ends_a[i + 1]].view(r, d_in) for i, r in enumerate(ranks)]
    d_b = [flat_b[ends_b[i] : ends_b[i + 1]].view(d_out, r) for i, r in enumerate(ranks)]

    g = torch.zeros(tokens, plan.rank_pad, dtype=torch.float32, device=x.device)
    if plan.n_segments:
        grads.seg_grads(h, dy, flat_b, off_b, plan, _items(x, call, plan, d_out), transposed=True,
                        mask_tab=mask_tab, dropout=False, precision=precision, g=g, b_tab=b_tab)

    def grad_a() -> None:
        if plan.n_segments:
            grads.seg_grads(g, x, flat_a, off_a, plan, _items(x, call, plan, d_in), transposed=False,
                            mask_tab=mask_tab, dropout=dropout, precision=precision)

    if not need_dx:
        grad_a()
        return None, d_a, d_b
    side = _side_stream(x.device) if plan.n_segments and OVERLAP_GRAD_A else None
    if side is None:
        dx = gemm.fused_gemm(dy, weight, None, g, a_tab, mask_tab, plan,
                             w_kn=True, dropout=dropout, precision=precision, use_tma=use_tma)
        grad_a()
        return dx, d_a, d_b
    # The dA pass only reads memory; run it beside the compute-bound dx GEMM. Every
    # later use on the main stream is ordered after it by the final wait_stream, so
    # the buffers it reads may return to the main stream's pool when this returns.
    main = torch.cuda.current_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        grad_a()
    dx = gemm.fused_gemm(dy, weight, None, g, a_tab, mask_tab, plan,
                         w_kn=True, dropout=dropout, precision=precision, use_tma=use_tma)
    main.wait_stream(side)
    return dx, d_a, d_b


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]
