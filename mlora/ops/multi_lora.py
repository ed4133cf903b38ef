"""The multi-LoRA linear operator: one frozen GEMM plus every job's low-rank update.

For T tokens split into segments (slot i, token range [start, end)):

    y = x·Wᵀ (+ bias) + Σ_segments s_i · (drop(x_seg)·A_iᵀ)·B_iᵀ

One autograd Function owns the math; its forward and backward dispatch to a backend:
the plain PyTorch code below (the CPU path and the oracle every kernel is tested
against) or the Triton kernels on CUDA. The frozen weight gets no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segment:
    """A contiguous token range [start, end) that uses adapter `slot` of the call."""

    slot: int
    start: int
    end: int


@dataclass(frozen=True)
class LoraCall:
    """Everything about one call that is not a tensor: layout and hyper-parameters."""

    segments: tuple[Segment, ...]
    scales: tuple[float, ...]  # per slot: alpha / r (or alpha / sqrt(r) for rsLoRA)
    dropout: tuple[float, ...]  # per slot: dropout probability p
    has_masks: tuple[bool, ...]  # per segment: a dropout mask tensor was passed

    @property
    def n_slots(self) -> int:
        return len(self.scales)

    def validate(self, tokens: int) -> None:
        """Refuse overlapping or out-of-range segments before any kernel runs."""
        last_end = 0
        for seg in sorted(self.segments, key=lambda s: s.start):
            if not 0 <= seg.slot < self.n_slots:
                raise ValueError(f"segment {seg} names slot {seg.slot}, call has {self.n_slots}")
            if seg.start < last_end or seg.end < seg.start or seg.end > tokens:
                raise ValueError(f"segment {seg} overlaps another or leaves [0, {tokens})")
            last_end = seg.end


def _dropped(x_seg: Tensor, mask: Tensor | None, p: float) -> Tensor:
    if mask is None or p == 0.0:
        return x_seg
    return x_seg * mask.to(x_seg.dtype) * (1.0 / (1.0 - p))


def reference_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    call: LoraCall,
) -> Tensor:
    """Plain PyTorch forward: the base GEMM, then each segment's shrink and expand."""
    y = torch.nn.functional.linear(x, weight, bias)
    for seg, mask in zip(call.segments, masks):
        if seg.end == seg.start:
            continue
        xd = _dropped(x[seg.start : seg.end], mask, call.dropout[seg.slot])
        h = xd @ lora_a[seg.slot].t()
        y[seg.start : seg.end] += call.scales[seg.slot] * (h @ lora_b[seg.slot].t())
    return y


def reference_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    call: LoraCall,
    need_dx: bool,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """Plain PyTorch backward: dx (through W and every adapter), dA_i and dB_i."""
    dx = dy @ weight if need_dx else None
    d_a = [torch.zeros_like(a) for a in lora_a]
    d_b = [torch.zeros_like(b) for b in lora_b]
    for seg, mask in zip(call.segments, masks):
        if seg.end == seg.start:
            continue
        i, s, p = seg.slot, call.scales[seg.slot], call.dropout[seg.slot]
        dy_seg = dy[seg.start : seg.end]
        xd = _dropped(x[seg.start : seg.end], mask, p)
        h = xd @ lora_a[i].t()  # recomputed: T_seg × r is cheaper to redo than to keep
        g = s * (dy_seg @ lora_b[i])  # T_seg × r
        d_a[i] += g.t() @ xd
        d_b[i] += s * (dy_seg.t() @ h)
        if dx is not None:
            dx[seg.start : seg.end] += _dropped(g @ lora_a[i], mask, p)
    return dx, d_a, d_b


BACKENDS = ("auto", "torch", "loop", "triton")


def resolve_backend(backend: str) -> str:
    """The path one eager call takes: 'auto' is the dense PyTorch path.

    Eagerly the Triton path is host-bound (about seven launches per linear, each with
    the launcher's Python: a 1.1B step took 323 ms against the dense path's 172-235 ms
    on an H200, bench/README.md), so eager steps stay dense. Steps recorded as CUDA
    graphs pick their own backend (`graphed_backend`). 'loop' is the plain per-segment
    reference above: the oracle in tests.
    """
    if backend == "auto":
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown multi-LoRA backend {backend!r}: use {', '.join(BACKENDS)}")
    return backend


def graphed_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The path a step recorded as a CUDA graph takes: 'auto' is Triton where it was
    measured faster, bf16 / fp16 on Hopper (sm_90), else `resolve_backend`.

    Replayed, the host's launch cost is gone and the fused kernels' fewer memory passes
    show: graphed steps of 4 jobs × 8,192 tokens ran 5.2-6.3 % (1.1B) and 1.2-2.7 % (7B)
    faster than the dense path's on H200s, alternating on one machine (bench/README.md,
    "Triton in recorded steps"). fp32 (no tensor-core path without TF32) and other
    GPUs were not measured (Blackwell's shared memory and instructions differ), so they
    keep the dense path. If the kernels fail there anyway, the graph runner falls back.
    """
    if backend == "auto" and dtype in (torch.bfloat16, torch.float16) and _triton_runs_on(device):
        return "triton"
    return resolve_backend(backend)


def _triton_runs_on(device: torch.device) -> bool:
    """A Hopper CUDA device (where the kernels were tuned and measured), with Triton installed."""
    import importlib.util

    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and importlib.util.find_spec("triton") is not None)


class _MultiLoraFunction(torch.autograd.Function):
    """Adapters may be fp32 master weights under a bf16 x: they are cast for the math
    here and their gradients cast back, so no autograd cast nodes pile up per linear."""

    @staticmethod
    def forward(ctx, x, weight, bias, call, backend, cache, *tensors):  # type: ignore[override]
        n = call.n_slots
        param_a, param_b = tensors[:n], tensors[n : 2 * n]
        masks = _unpack_masks(call, tensors[2 * n :])
        ctx.call, ctx.backend = call, backend
        ctx.param_dtypes = [t.dtype for t in (*param_a, *param_b)]
        ctx.ranks = [a.shape[0] for a in param_a]
        if backend == "torch":
            from mlora.ops import dense_multi_lora

            scale = _cached_scale(cache, call, ctx.ranks, x)
            a_cat, b_cat = dense_multi_lora.concat(param_a, param_b, x.dtype)
            y, hs, mult = dense_multi_lora.forward(x, weight, bias, a_cat, b_cat, masks, call, scale)
            ctx.has_mult = mult is not None
            ctx.save_for_backward(x, weight, a_cat, b_cat, scale, hs, *([mult] if mult is not None else []))
            return y
        if backend == "triton":
            from mlora.ops import triton_multi_lora as tm

            ranks = tuple(ctx.ranks)
            a_cat, b_cat = tm.concat(param_a, param_b, x.dtype)  # each slot padded to a multiple of 8 ranks
            mask_rows = tm.stack_masks(masks, x, ranks, call)
            # h = drop(x)·Aᵀ (T × padded rank) is kept: cheaper than another pass over x
            y, h = tm.forward_cat(x, weight, bias, a_cat, b_cat, ranks, mask_rows, call, keep=cache)
            ctx.cache = cache
            # the adapters' copies are intermediates, kept on ctx rather than saved, so that backward can
            # let each go once read for the last time (`backward_cat`); saved, autograd held them to its end
            ctx.cats = [a_cat, b_cat]
            ctx.save_for_backward(x, weight, h, *([mask_rows] if mask_rows is not None else []))
            return y
        lora_a, lora_b = _cast(param_a, x.dtype), _cast(param_b, x.dtype)
        y = reference_forward(x, weight, bias, lora_a, lora_b, masks, call)
        ctx.save_for_backward(x, weight, *tensors)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        call: LoraCall = ctx.call
        n = call.n_slots
        dy = dy.contiguous()
        need_dx = ctx.needs_input_grad[0]
        n_masks = sum(call.has_masks)
        if ctx.backend == "torch":
            from mlora.ops import dense_multi_lora

            x, weight, a_cat, b_cat, scale, hs, *mult = ctx.saved_tensors
            dx, d_a, d_b = dense_multi_lora.backward(
                dy, x, weight, a_cat, b_cat, ctx.ranks, scale, hs, mult[0] if mult else None, need_dx, ctx.param_dtypes[0]
            )
            return (dx, None, None, None, None, None, *d_a, *d_b, *([None] * n_masks))
        if ctx.backend == "triton":
            from mlora.ops import triton_multi_lora as tm

            x, weight, h, *mask_rows = ctx.saved_tensors
            if not ctx.cats:
                raise RuntimeError("the Triton multi-LoRA operator frees its adapter copies in backward: "
                                   "backward through it twice (retain_graph=True) is not supported")
            cats, ctx.cats = ctx.cats, None
            dx, d_a, d_b = tm.backward_cat(dy, x, weight, cats, tuple(ctx.ranks),
                                           mask_rows[0] if mask_rows else None, call, need_dx, h=h,
                                           grad_dtype=ctx.param_dtypes[0], keep=ctx.cache)
        else:
            x, weight, *tensors = ctx.saved_tensors
            lora_a, lora_b = _cast(tensors[:n], x.dtype), _cast(tensors[n : 2 * n], x.dtype)
            masks = _unpack_masks(call, tensors[2 * n :])
            dx, d_a, d_b = reference_backward(dy, x, weight, lora_a, lora_b, masks, call, need_dx)
        grads = [g if g.dtype == dt else g.to(dt) for g, dt in zip((*d_a, *d_b), ctx.param_dtypes)]
        return (dx, None, None, None, None, None, *grads, *([None] * n_masks))


def _cast(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Cast only what differs: a no-op .to() still costs a dispatch per adapter."""
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _cached_scale(cache: dict | None, call: LoraCall, ranks_list: Sequence[int], x: Tensor) -> Tensor:
    """The dense path's slot-scale matrix; every layer of a batch with the same jobs shares it."""
    from mlora.ops.dense_multi_lora import slot_scale_matrix

    ranks = tuple(ranks_list)
    key = (call.segments, call.scales, ranks, x.shape[0], x.dtype, x.device)
    if cache is None:
        return slot_scale_matrix(call, ranks, x.shape[0], x.dtype, x.device)
    if key not in cache:
        cache[key] = slot_scale_matrix(call, ranks, x.shape[0], x.dtype, x.device)
    return cache[key]


def _unpack_masks(call: LoraCall, mask_tensors: Sequence[Tensor]) -> list[Tensor | None]:
    it = iter(mask_tensors)
    return [next(it) if has else None for has in call.has_masks]


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    scales: Sequence[float],
    segments: Sequence[Segment],
    dropout: Sequence[float] | None = None,
    dropout_masks: Sequence[Tensor | None] | None = None,
    backend: str = "auto",
    cache: dict | None = None,
) -> Tensor:
    """y = x·Wᵀ + bias + Σ_segments s·(drop(x_seg)·Aᵀ)·Bᵀ for x of shape [T, d_in].

    `lora_a[i]` is [r_i, d_in] and `lora_b[i]` is [d_out, r_i] (PEFT's layout); ranks
    may differ per slot. `dropout_masks[k]`, if given, is a bool [len(segment k), d_in]
    keep-mask for segment k, applied with the slot's probability as inverted dropout.
    Tokens outside every segment get the base output only. Adapters may be kept in
    another dtype (fp32 master weights); the math runs in x's dtype. `cache` (owned by
    the caller, cleared per batch) lets layers share per-batch layout tensors.
    """
    if x.dim() != 2:
        raise ValueError(f"multi_lora_linear takes x of shape [T, d_in], got {tuple(x.shape)}")
    n = len(lora_a)
    if len(lora_b) != n or len(scales) != n:
        raise ValueError("lora_a, lora_b and scales must have one entry per slot")
    masks = list(dropout_masks) if dropout_masks is not None else [None] * len(segments)
    if len(masks) != len(segments):
        raise ValueError("dropout_masks must have one entry (or None) per segment")
    call = LoraCall(
        segments=tuple(segments),
        scales=tuple(float(s) for s in scales),
        dropout=tuple(float(p) for p in (dropout if dropout is not None else [0.0] * n)),
        has_masks=tuple(m is not None for m in masks),
    )
    call.validate(x.shape[0])
    chosen = resolve_backend(backend)
    mask_tensors = [m for m in masks if m is not None]
    return _MultiLoraFunction.apply(x, weight, bias, call, chosen, cache, *lora_a, *lora_b, *mask_tensors)
