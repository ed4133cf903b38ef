"""The multi-LoRA operator on Triton: same signatures and results as the reference.

forward:   h = drop(x)·Aᵀ per segment (shrink), then y = x·Wᵀ + bias + s·h·Bᵀ in one
           GEMM whose tiles add the LoRA expand as extra reduction steps (fused, the
           default), or the expand alone from Triton with cuBLAS adding x·Wᵀ onto it
           in its epilogue (split; `base_gemm`).
backward:  one pass over dy gives dB (= s·dyᵀ·h per slot) and g = dy·B (at ranks
           above 16, g is a second shrink of dy instead: see seg_grads.g_mode); then
           dx = dy·W + drop(s·g·A) the same way (fused or split), then one pass over x
           gives dA = s·gᵀ·drop(x) (optionally beside the GEMM on a side stream).

h (T × padded rank) is kept from forward for backward; g is T × padded rank in fp32.
The adapters arrive concatenated (A_cat [Σr, d_in], B_cat [d_out, Σr], each slot padded
to a multiple of 8 rows by `concat`) and the dropout masks stacked, so every table the
kernels read depends on the layout alone: plans are found by the identity of the call
(then by the layout), and no host work depends on a tensor's address, which lets a CUDA
graph record the operator. See docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from mlora.ops import dense_multi_lora
from mlora.ops.kernels import fused_gemm as gemm
from mlora.ops.kernels import seg_grads as grads
from mlora.ops.kernels import shrink as shrink_mod
from mlora.ops.kernels.interpret import INTERPRET
from mlora.ops.kernels.plan import ItemPlan, SegmentPlan, cdiv, item_plan, padded_rank, rank_block, segment_plan
from mlora.ops.multi_lora import LoraCall

PARTIAL_BUDGET_BYTES = 16 << 20  # fp32 partials of split slots, per gradient pass
# On CUDA, run the dA pass on a side stream beside the dx GEMM. Off: measured on an
# H100 (bench/ops, 2026-11-24) it saved nothing, the GEMM slowing by what it hid.
OVERLAP_GRAD_A = False
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_BY_CALL: OrderedDict[tuple[int, tuple[int, ...]], _CallState] = OrderedDict()
_BY_CALL_MAX = 2048  # a forward of every adapted linear of a model, then their backwards


@dataclass
class _CallState:
    """What one LoraCall needs on one device; forward and backward share the object.

    It holds every device table the kernels read, so whoever keeps it (a CUDA graph's
    cache) keeps those tables alive."""

    call: LoraCall
    tokens: int
    device: torch.device
    ranks: tuple[int, ...]
    plan: SegmentPlan
    items: dict[tuple[int, grads.PassConfig], ItemPlan] = field(default_factory=dict)
    offsets: dict[int, tuple[Tensor, tuple[int, ...]]] = field(default_factory=dict)


def _state(x: Tensor, ranks: tuple[int, ...], call: LoraCall, keep: dict | None) -> _CallState:
    """Per-call state, found by identity (cheap) before the per-layout cache (hashes segments).
    Keyed by the ranks too: a shared-input call plans its stacked slots beside the members'."""
    st = _BY_CALL.get((id(call), ranks))
    if not (st is not None and st.call is call and st.tokens == x.shape[0] and st.device == x.device
            and st.ranks == ranks):
        plan = segment_plan(call.segments, call.scales, call.dropout, call.has_masks, ranks, x.shape[0], x.device,
                            shrink_mod.block_m(rank_block(ranks)))
        st = _CallState(call, x.shape[0], x.device, ranks, plan)
        _BY_CALL[(id(call), ranks)] = st
        if len(_BY_CALL) > _BY_CALL_MAX:
            _BY_CALL.popitem(last=False)
    if keep is not None:
        keep.setdefault(("triton-plan", id(st)), st)
    return st


def _items(st: _CallState, width: int, cfg: grads.PassConfig) -> ItemPlan:
    key = (width, cfg)
    if key not in st.items:
        st.items[key] = item_plan(st.call.segments, width, st.plan.rank_pad, st.device, cfg.block_m, cfg.block_d,
                                  _target_programs(st.device, cfg.per_sm), PARTIAL_BUDGET_BYTES)
    return st.items[key]


def _offsets(st: _CallState, width: int) -> tuple[Tensor, tuple[int, ...]]:
    """Each slot's element offset into a flat buffer of [rank, width] blocks (device, host)."""
    if width not in st.offsets:  # held by the state too: a graph keeping the state keeps it
        st.offsets[width] = _offset_table(st.ranks, width, st.device)
    return st.offsets[width]


@functools.lru_cache(maxsize=64)
def _offset_table(ranks: tuple[int, ...], width: int, device: torch.device) -> tuple[Tensor, tuple[int, ...]]:
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r * width)
    host = torch.tensor(offs[:-1] or [0], dtype=torch.int64)
    dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    return dev, tuple(offs)


def _precision(x: Tensor) -> str:
    """fp32 inputs follow torch's matmul setting (true fp32 unless TF32 is allowed)."""
    if x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=8)
def _target_programs(device: torch.device, per_sm: int) -> int:
    """Reduction programs wanted: a few per SM (8 when interpreting: several items, small shapes)."""
    if device.type == "cuda" and not INTERPRET:
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def concat(lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A_cat [Σr', d_in] and B_cat [d_out, Σr'], contiguous, in the compute dtype, each
    slot at `padded_rank(r)` rows (columns), zeros past its rank. With every rank a
    multiple of 8 that is the dense path's concat (two copies, two casts)."""
    ranks = [a.shape[0] for a in lora_a]
    padded = [padded_rank(r) for r in ranks]
    if padded == ranks:
        return dense_multi_lora.concat(lora_a, lora_b, dtype)
    a0, b0 = lora_a[0], lora_b[0]
    a_cat = torch.zeros(sum(padded), a0.shape[1], dtype=dtype, device=a0.device)
    b_cat = torch.zeros(b0.shape[0], sum(padded), dtype=dtype, device=b0.device)
    at = 0
    for a, b, r, rp in zip(lora_a, lora_b, ranks, padded):
        a_cat[at:at + r].copy_(a)
        b_cat[:, at:at + r].copy_(b)
        at += rp
    return a_cat, b_cat


def _check(x: Tensor, weight: Tensor, a_cat: Tensor, b_cat: Tensor, d_out: int, ranks: tuple[int, ...]) -> None:
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"triton multi-LoRA needs W in {x.dtype} on {x.device}, got {weight.dtype} on {weight.device}")
    total = sum(padded_rank(r) for r in ranks)  # as `concat` lays them out
    for name, t, shape in (("A_cat", a_cat, (total, x.shape[1])), ("B_cat", b_cat, (d_out, total))):
        if t.dtype != x.dtype or t.device != x.device or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"triton multi-LoRA: {name} must be a contiguous {list(shape)} in {x.dtype} on {x.device} "
                             f"(ranks {list(ranks)}, each padded to a multiple of 8 by `concat`), got "
                             f"{list(t.shape)} in {t.dtype} on {t.device}")


def stack_masks(masks: Sequence[Tensor | None], x: Tensor, ranks: tuple[int, ...], call: LoraCall) -> Tensor | None:
    """The keep-masks of the segments whose slot has dropout, stacked in the plan's order
    as int8 [rows, d_in] (no copy for a single mask); None when there are none."""
    order = _state(x, ranks, call, None).plan.mask_order
    if not order:
        return None
    picked = []
    for k in order:
        seg, mask = call.segments[k], masks[k]
        if mask is None or tuple(mask.shape) != (seg.end - seg.start, x.shape[1]) or mask.device != x.device:
            got = None if mask is None else f"{list(mask.shape)} on {mask.device}"
            raise ValueError(f"dropout mask of {seg} must be [{seg.end - seg.start}, {x.shape[1]}] on {x.device}, "
                             f"got {got}")
        picked.append(mask.view(torch.int8) if mask.dtype in (torch.bool, torch.uint8) else (mask != 0).view(torch.int8))
    return (picked[0] if len(picked) == 1 else torch.cat(picked)).contiguous()


def forward_cat(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a_cat: Tensor,
    b_cat: Tensor,
    ranks: tuple[int, ...],
    mask_rows: Tensor | None,
    call: LoraCall,
    use_tma: bool | None = None,
    keep: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """(y, h) from concatenated adapters and stacked masks (`stack_masks`); h = drop(x)·Aᵀ
    [T, R] is what backward reads. `keep` (a dict the caller holds) keeps the plan alive."""
    x, weight = x.contiguous(), weight.contiguous()
    _check(x, weight, a_cat, b_cat, weight.shape[0], ranks)
    st = _state(x, ranks, call, keep)
    precision = _precision(x)
    dropout = mask_rows is not None
    masks = mask_rows if dropout else x
    h = shrink_mod.shrink(x, a_cat, masks, st.plan, dropout, precision)
    if _split_base():
        y = gemm.split_gemm(x, weight, bias, h, b_cat, masks, st.plan, w_kn=False, dropout=False, precision=precision)
    else:
        y = gemm.fused_gemm(x, weight, bias, h, b_cat, masks, st.plan,
                            w_kn=False, dropout=False, precision=precision, use_tma=use_tma)
    return y, h


BASE_GEMMS = ("fused", "split")


def base_gemm() -> str:
    """How the operator's two GEMMs run: "fused" (the default) runs the base product and
    the LoRA part in one Triton GEMM; "split" writes the LoRA part from the Triton kernel
    and lets cuBLAS add the base product onto it (`fused_gemm.split_gemm`).
    MLORA_TRITON_BASE picks one. Both give the same sums. On an H200 at its power limit
    they tied on the operator alone; split was 1-3.5 % faster in a skeleton of a training
    step (projections and attention only) but 1.6 % slower in the trainer's own 7B step,
    so fused stays the default (bench/README.md, 2026-12-03, fifth session)."""
    name = os.environ.get("MLORA_TRITON_BASE", "fused")
    if name not in BASE_GEMMS:
        raise ValueError(f"MLORA_TRITON_BASE={name!r}: use one of {', '.join(BASE_GEMMS)}")
    return name


@contextlib.contextmanager
def base_gemm_set(name: str | None) -> Iterator[None]:
    """MLORA_TRITON_BASE set to `name` inside the block (None: left as it is) and restored
    after: how benchmarks and the GPU checks run one base or the other in one process."""
    saved = os.environ.get("MLORA_TRITON_BASE")
    if name is not None:
        os.environ["MLORA_TRITON_BASE"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLORA_TRITON_BASE", None)
        else:
            os.environ["MLORA_TRITON_BASE"] = saved


def _split_base() -> bool:
    return base_gemm() == "split"


def backward_cat(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    cats: list[Tensor],
    ranks: tuple[int, ...],
    mask_rows: Tensor | None,
    call: LoraCall,
    need_dx: bool,
    h: Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
    use_tma: bool | None = None,
    keep: dict | None = None,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """dx and every slot's dA, dB (views of two flat buffers in grad_dtype, default x's);
    pass forward's h to skip recomputing it. `cats` is [A_cat, B_cat], emptied here:
    each is dropped once read for the last time (B_cat after the dy pass, A_cat after
    the dx GEMM) and dA's buffer taken only then, so where the caller keeps no other
    reference (the autograd Function) the adapters' copies are gone before the
    gradients they would sit beside (at K = 64, 4096², 16 MiB of the peak)."""
    a_cat, b_cat = cats
    cats.clear()
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    tokens, d_in = x.shape
    d_out = dy.shape[1]
    _check(x, weight, a_cat, b_cat, d_out, ranks)
    st = _state(x, ranks, call, keep)
    plan = st.plan
    precision = _precision(x)
    dropout = mask_rows is not None
    masks = mask_rows if dropout else x
    if h is None:
        h = shrink_mod.shrink(x, a_cat, masks, plan, dropout, precision)

    off_a, ends_a = _offsets(st, d_in)
    off_b, ends_b = _offsets(st, d_out)
    alloc = torch.empty if all(plan.slot_used) else torch.zeros  # a slot without tokens gets zeros
    out_dtype = grad_dtype or x.dtype
    flat_b = alloc(ends_b[-1], dtype=out_dtype, device=x.device)
    d_b = _split(flat_b, ranks, ends_b, False, d_out)

    g = _db_and_g(dy, h, b_cat, flat_b, off_b, st, masks, precision)
    del b_cat

    def grad_a(flat_a: Tensor) -> None:
        if plan.n_segments:
            cfg = grads.x_pass(x.element_size(), plan.rank_pad, precision)
            grads.seg_grads(g, x, flat_a, off_a, plan, _items(st, d_in, cfg), cfg, transposed=False,
                            masks=masks, dropout=dropout, precision=precision)

    def grad_x(a_cat: Tensor) -> Tensor:
        if _split_base():
            return gemm.split_gemm(dy, weight, None, g, a_cat, masks, plan, w_kn=True, dropout=dropout,
                                   precision=precision)
        return gemm.fused_gemm(dy, weight, None, g, a_cat, masks, plan, w_kn=True, dropout=dropout,
                               precision=precision, use_tma=use_tma)

    side = _side_stream(x.device) if need_dx and plan.n_segments and OVERLAP_GRAD_A else None
    if side is None:
        dx = grad_x(a_cat) if need_dx else None
        del a_cat
        flat_a = alloc(ends_a[-1], dtype=out_dtype, device=x.device)
        grad_a(flat_a)
        return dx, _split(flat_a, ranks, ends_a, True, d_in), d_b
    # The dA pass only reads memory; run it beside the compute-bound dx GEMM. Every
    # later use on the main stream is ordered after it by the final wait_stream, so
    # the buffers it reads may return to the main stream's pool when this returns.
    flat_a = alloc(ends_a[-1], dtype=out_dtype, device=x.device)
    main = torch.cuda.current_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        grad_a(flat_a)
    dx = grad_x(a_cat)
    del a_cat
    main.wait_stream(side)
    return dx, _split(flat_a, ranks, ends_a, True, d_in), d_b


def _db_and_g(dy: Tensor, h: Tensor, b_cat: Tensor, flat_b: Tensor, off_b: Tensor, st: _CallState, masks: Tensor,
              precision: str) -> Tensor:
    """The dy pass: every slot's dB into flat_b, and g = dy·B [T, R] in fp32, from the
    pass's atomics, its per-column-tile partials (torch's deterministic algorithms on),
    or a shrink of dy (`seg_grads.g_mode`).
    Rows of uncovered tokens are never read and may hold anything."""
    plan = st.plan
    tokens, d_out = dy.shape
    if not plan.n_segments:
        return torch.zeros(tokens, plan.rank_pad, dtype=torch.float32, device=dy.device)
    paired = grads.paired_red(dy.device, dy.element_size())  # g's atomics pay up to R = 32
    cfg = grads.dy_pass(dy.element_size(), plan.rank_pad, paired, width=d_out, segments=plan.n_segments)
    items = _items(st, d_out, cfg)
    mode = grads.g_mode(plan.rank_pad, tokens, d_out, cfg.block_d, torch.are_deterministic_algorithms_enabled(),
                        paired)
    if mode == "shrink":
        grads.seg_grads(h, dy, flat_b, off_b, plan, items, cfg, transposed=True, masks=masks, dropout=False,
                        precision=precision)
        return shrink_mod.shrink_b(dy, b_cat, plan, precision)
    if mode == "partials":
        g = torch.empty(cdiv(d_out, cfg.block_d), tokens, plan.rank_pad, dtype=torch.float32, device=dy.device)
    else:
        g = torch.zeros(tokens, plan.rank_pad, dtype=torch.float32, device=dy.device)
    grads.seg_grads(h, dy, flat_b, off_b, plan, items, cfg, transposed=True, masks=masks, dropout=False,
                    precision=precision, g=g, b_cat=b_cat)
    return grads.reduce_g(g) if mode == "partials" else g


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
    ranks = tuple(a.shape[0] for a in lora_a)
    a_cat, b_cat = concat(lora_a, lora_b, x.dtype)
    return forward_cat(x, weight, bias, a_cat, b_cat, ranks, stack_masks(masks, x, ranks, call), call, use_tma)


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
    """Same as reference_backward (gradients in x's dtype); pass forward's h to skip recomputing it."""
    ranks = tuple(a.shape[0] for a in lora_a)
    return backward_cat(dy, x, weight, list(concat(lora_a, lora_b, x.dtype)), ranks,
                        stack_masks(masks, x, ranks, call), call, need_dx, h=h, use_tma=use_tma)


def _split(flat: Tensor, ranks: tuple[int, ...], ends: tuple[int, ...], rows_first: bool, width: int) -> list[Tensor]:
    """Per-slot views of a flat gradient buffer: [rank, width] (dA) or [width, rank] (dB)."""
    if len(set(ranks)) == 1:  # one view call for all slots
        r = ranks[0]
        return list(flat.view(len(ranks), r, width).unbind(0) if rows_first else flat.view(len(ranks), width, r).unbind(0))
    return [flat[ends[i] : ends[i + 1]].view((r, width) if rows_first else (width, r)) for i, r in enumerate(ranks)]


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]
