"""The residual stream's adds folded into the RMSNorms that follow them (Triton).

A Llama-layout decoder block adds the attention's output to the residual stream and
norms the sum, then the same around the MLP: as Hugging Face runs it each add is its
own pass (read two, write one) and, backward, autograd adds the norm's input gradient
to the residual's gradient in another. In a graphed bf16 step of a 7B Llama those adds
took ~10 ms of ~414 (bench/README.md, "what is left of a 7B step"). Here one kernel
reads the residual and the block's output, writes their sum (the next residual) and
its normed value; backward, one kernel writes the norm's input gradient with the
residual's gradient already added. The sum is rounded to the input dtype before it is
normed, as Hugging Face rounds it (so it equals Hugging Face's sum bit for bit); the
norm is `fused_block.rms_norm`'s math.

`run_layers` runs a stage's decoder blocks this way: each block's second add is carried
into the next block's first norm (or the stage's final norm). The blocks' attention and
MLP are the modules' own (so their fused forwards and multi-LoRA linears run as ever).
A stage cut inside a block (`model.block_parts`) runs only the held half of it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mlora.model.block_parts import ATTENTION, BOTH, TWO_PART_BLOCKS, part_norm
from mlora.ops.fused_block import _warps, rms_norm

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton run the blocks' own forward
    triton = None

FUSABLE_LAYERS = TWO_PART_BLOCKS
Held = Sequence[tuple[str, ...]] | None  # per block, the parts that run (default: both)


if triton is not None:
    from mlora.ops.fused_block import _rms_bwd  # with HAS_DS: the norm's and the sum's gradients in one pass

    @triton.jit
    def _add_rms_fwd(R, D, W, S, Y, RSTD, stride_r, stride_d, stride_s, stride_y, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(D + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        s = (r + d).to(S.dtype.element_ty)  # as torch's add: rounded to the input dtype
        tl.store(S + row * stride_s + cols, s, mask=mask)
        x = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        normed = (x * rstd).to(S.dtype.element_ty)
        w = tl.load(W + cols, mask=mask, other=0.0)
        y = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)


def _rows(t: Tensor, n: int) -> Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, residual: Tensor, delta: Tensor, weight: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # a sum nobody reads (the last one) gets no gradient pass
        shape, n = residual.shape, residual.shape[-1]
        r2, d2 = _rows(residual, n), _rows(delta, n)
        s = torch.empty(r2.shape, dtype=residual.dtype, device=residual.device)
        y = torch.empty(r2.shape, dtype=torch.promote_types(residual.dtype, weight.dtype), device=residual.device)
        rstd = torch.empty(r2.shape[0], dtype=torch.float32, device=residual.device)
        block = triton.next_power_of_2(n)
        _add_rms_fwd[(r2.shape[0],)](r2, d2, weight, s, y, rstd, r2.stride(0), d2.stride(0), s.stride(0), y.stride(0),
                                     n, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape = shape
        return s.view(shape), y.view(shape)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, ds: Tensor | None, dy: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        if dy is None:
            return ds, ds, None, None
        s, weight, rstd = ctx.saved_tensors
        n = s.shape[1]
        dy2 = _rows(dy, n)
        ds2 = _rows(ds, n) if ds is not None else dy2  # any pointer: not read without HAS_DS
        dx = torch.empty_like(s)
        block = triton.next_power_of_2(n)
        _rms_bwd[(s.shape[0],)](ds2, dy2, s, weight, rstd, dx, ds2.stride(0), dy2.stride(0), s.stride(0),
                                dx.stride(0), n, HAS_DS=ds is not None, BLOCK=block, num_warps=_warps(block))
        dx = dx.view(ctx.shape)
        return dx, dx, None, None  # the sum's gradient reaches both addends


def add_rms_norm(residual: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(s, weight · s / rms(s)) for s = residual + delta, in one kernel each way."""
    if residual.shape != delta.shape or residual.dtype != delta.dtype:
        raise ValueError(f"add_rms_norm takes a residual and a delta of one shape and dtype, got "
                         f"{tuple(residual.shape)} {residual.dtype} and {tuple(delta.shape)} {delta.dtype}")
    if weight.requires_grad:
        raise ValueError("the fused RMSNorm is for frozen weights (it computes no weight gradient)")
    return _AddRMSNorm.apply(residual, delta, weight, eps)


def _frozen_rms(norm: Any) -> bool:
    weight = getattr(norm, "weight", None)
    return (type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")
            and isinstance(weight, Tensor) and not weight.requires_grad)


def _parts(layers: Sequence[nn.Module], held: Held) -> list[tuple[nn.Module, str]]:
    return [(layer, part) for layer, parts in zip(layers, held or [BOTH] * len(layers)) for part in parts]


def fusable(layers: Sequence[nn.Module], final_norm: nn.Module | None, held: Held = None) -> bool:
    """Whether `run_layers` computes these blocks (and norm) as their own forwards do."""
    if triton is None:
        return False
    blocks_ok = all(type(layer).__name__ in FUSABLE_LAYERS for layer in layers) and all(
        _frozen_rms(part_norm(layer, part)) for layer, part in _parts(layers, held)
    )
    return blocks_ok and (final_norm is None or _frozen_rms(final_norm))


def unhooked(layers: Sequence[nn.Module], final_norm: nn.Module | None = None, held: Held = None) -> bool:
    """No forward hooks on the blocks or their norms (nor global ones): `run_layers` calls
    neither, so it is used only when no hook would be skipped."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    skipped = [*layers, *(part_norm(layer, part) for layer, part in _parts(layers, held))]
    skipped += [final_norm] if final_norm is not None else []
    return not any(m._forward_hooks or m._forward_pre_hooks for m in skipped)


def run_layers(
    layers: Sequence[nn.Module], hidden: Tensor, final_norm: nn.Module | None, held: Held = None,
    **layer_kwargs: Any,
) -> Tensor:
    """The blocks' forward, each residual add fused into the norm after it.

    Returns what the blocks return, normed by `final_norm` if one is given. Only for
    blocks `fusable` accepts and with no hooks on them (`unhooked`); `held`: per block,
    the parts that run (a stage cut inside a block); `layer_kwargs` go to each block's
    attention as the block passes them.
    """
    pending: Tensor | None = None  # the last part's output, not yet added to the stream
    for layer, part in _parts(layers, held):
        norm = part_norm(layer, part)
        if pending is None:
            normed = rms_norm(hidden, norm.weight, norm.variance_epsilon)
        else:
            hidden, normed = add_rms_norm(hidden, pending, norm.weight, norm.variance_epsilon)
        if part == ATTENTION:
            pending, _ = layer.self_attn(hidden_states=normed, **layer_kwargs)
        else:
            pending = layer.mlp(normed)
    if final_norm is None:
        return hidden if pending is None else hidden + pending
    if pending is None:
        return rms_norm(hidden, final_norm.weight, final_norm.variance_epsilon)
    return add_rms_norm(hidden, pending, final_norm.weight, final_norm.variance_epsilon)[1]
