"""Rotary position embedding of q and k in one Triton kernel each way, and the attention
forward that uses it.

Hugging Face's `apply_rotary_pos_emb` is about ten passes over q and k forward (products
with cos and sin on a transposed view, a negation, a `cat`, an add) and as many backward:
in a graphed bf16 step of a 7B Llama they took ~60 of 457 ms of GPU time (H200,
bench/README.md), more than the attention itself. Here one kernel reads each token's
heads once and writes the rotated ones, rounding every product to the input dtype where
PyTorch's eager ops round it. Under the CPU interpreter in fp32 that is Hugging Face's
result bit for bit; compiled (H200) about a quarter of the elements differ by one ulp
(most likely a product and the sum rounded once, as an FMA): tests/test_fused_rope.py.
With it the graphed bf16 step took 414 ms instead of 472 at 7B and 88.8 instead of
101.7 at 1.1B.

`fused_attention_forward` is the Llama / Mistral / Qwen2 / Qwen3 attention forward with
that kernel in place of `apply_rotary_pos_emb` (projections, Qwen3's q/k norms and the
attention interface are the module's own). `fuse_attention(module)` points an attention
module at it; the module keeps its own forward off CUDA, with eager attention, or with a
KV cache.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton keep Hugging Face's code
    triton = None

# Attention classes whose forward `fused_attention_forward` reproduces (transformers 5.x).
FUSABLE_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


if triton is not None:

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, S, H, sx_b, sx_s, sx_h, sy_b, sy_s, sy_h, sc_b, sc_s,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
        """One token's BLOCK_H heads. Forward: y = x·cos + rotate_half(x)·sin; backward (x is
        dy): the transpose, dx = dy·cos + rotate_half^T(dy·sin). Each product is rounded to
        the input dtype before the sum, as eager PyTorch rounds it (the sum of two terms
        does not depend on their order, so this is also autograd's backward)."""
        t = tl.program_id(0).to(tl.int64)
        b, s = t // S, t % S
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HALF
        ok = (heads < H)[:, None] & d_ok[None, :]
        dtype = Y.dtype.element_ty
        x_at = X + b * sx_b + s * sx_s + heads.to(tl.int64)[:, None] * sx_h + d[None, :]
        x1 = tl.load(x_at, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_at + HALF, mask=ok, other=0.0).to(tl.float32)
        c_at = b * sc_b + s * sc_s + d
        c1 = tl.load(COS + c_at, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(COS + c_at + HALF, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(SIN + c_at, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(SIN + c_at + HALF, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        a1 = (x1 * c1).to(dtype).to(tl.float32)
        a2 = (x2 * c2).to(dtype).to(tl.float32)
        if BACKWARD:
            y1 = a1 + (x2 * s2).to(dtype).to(tl.float32)
            y2 = a2 - (x1 * s1).to(dtype).to(tl.float32)
        else:
            y1 = a1 - (x2 * s1).to(dtype).to(tl.float32)
            y2 = a2 + (x1 * s2).to(dtype).to(tl.float32)
        y_at = Y + b * sy_b + s * sy_s + heads.to(tl.int64)[:, None] * sy_h + d[None, :]
        tl.store(y_at, y1.to(dtype), mask=ok)
        tl.store(y_at + HALF, y2.to(dtype), mask=ok)


def _rope(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    """x [B, S, H, D] (any strides, D contiguous) rotated by cos, sin [B or 1, S, D]: a new
    contiguous [B, S, H, D] tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    bsz, seq, heads, dim = x.shape
    y = torch.empty((bsz, seq, heads, dim), dtype=x.dtype, device=x.device)
    half = dim // 2
    block_d = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // (2 * block_d)))
    sc_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    grid = (bsz * seq, triton.cdiv(heads, block_h))
    _rope_kernel[grid](x, cos, sin, y, seq, heads, x.stride(0), x.stride(1), x.stride(2),
                       y.stride(0), y.stride(1), y.stride(2), sc_b, cos.stride(1),
                       HALF=half, BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward,
                       num_warps=4 if block_h * block_d >= 1024 else 1)
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rope(q, cos, sin, False), _rope(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return (None if dq is None else _rope(dq, cos, sin, True),
                None if dk is None else _rope(dk, cos, sin, True), None, None)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Hugging Face's `apply_rotary_pos_emb` on q, k in [B, S, heads, D] layout (before the
    head transpose) with cos, sin as its rotary embedding returns them ([B or 1, S, D]).
    Returns [B, S, heads, D]; no gradient for cos and sin (they are not trained)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rotary takes q, k as [batch, seq, heads, even head_dim], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    want = (q.shape[1], q.shape[-1])
    if cos.shape != sin.shape or cos.dim() != 3 or (cos.shape[1], cos.shape[2]) != want \
            or cos.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"rotary takes cos, sin as [batch or 1, {want[0]}, {want[1]}], got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    return _Rotary.apply(q, k, cos.to(q.dtype), sin.to(q.dtype))


def fused_attention_forward(module: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                            attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """The forward of `FUSABLE_ATTENTION` without a KV cache, rotary through `rotary`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from mlora.model.lora_linear import project_shared  # q, k, v read one input: one LoRA call where it can

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    q, k, v = project_shared(hidden_states, (module.q_proj, module.k_proj, module.v_proj))
    q, k = q.view(hidden_shape), k.view(hidden_shape)
    if hasattr(module, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
        q, k = module.q_norm(q), module.k_norm(k)
    v = v.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = rotary(q, k, cos, sin)
    if hasattr(module, "sliding_window"):  # Qwen2 / Qwen3: per layer
        kwargs["sliding_window"] = module.sliding_window
    elif type(module).__name__ == "MistralAttention":
        kwargs["sliding_window"] = getattr(module.config, "sliding_window", None)
    attention = ALL_ATTENTION_FUNCTIONS[module.config._attn_implementation]
    out, weights = attention(module, q.transpose(1, 2), k.transpose(1, 2), v, attention_mask,
                             dropout=0.0 if not module.training else module.attention_dropout,
                             scaling=module.scaling, **kwargs)
    return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _fused_attention_method(self: nn.Module, hidden_states: Tensor, position_embeddings: Any = None,
                            attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if (triton is None or not hidden_states.is_cuda or args or cache is not None or position_embeddings is None
            or self.config._attn_implementation == "eager"):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    kwargs.pop("past_key_values", None)
    kwargs.pop("cache", None)
    return fused_attention_forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)


def fuse_attention(module: nn.Module) -> bool:
    """Point one attention module at `fused_attention_forward` if it is of a known kind."""
    if type(module).__name__ not in FUSABLE_ATTENTION or not hasattr(module, "head_dim"):
        return False
    module.forward = types.MethodType(_fused_attention_method, module)
    return True
