"""Fused RMSNorm and SwiGLU for the frozen base's blocks (Triton, forward and backward).

In a bf16 training step of a 7B Llama, the frozen base's elementwise work costs a third
of the GPU time: every RMSNorm is eight separate passes over the hidden states in fp32
(cast, square, mean, rsqrt, scale, cast, weight) with as many again backward, and the
MLP's silu(gate)·up is several passes over the widest tensors. Here each is one kernel
forward and one backward, with the same math as Hugging Face's modules (statistics in
fp32, the normalised value rounded to the input dtype before the weight, silu rounded
before the product). The base is frozen, so no weight gradient is computed.

`fuse_block_ops(model)` points every RMSNorm and SwiGLU MLP of a model at these, and
every attention of a known kind at `fused_rope.fused_attention_forward` (q and k rotated
in one kernel); each call falls back to the module's own forward off CUDA (and so in CPU
tests and under the Triton interpreter the model computes exactly what it did before).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use the modules' own code
    triton = None


if triton is not None:

    @triton.jit
    def _rms_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        normed = (x * rstd).to(X.dtype.element_ty)  # as HF: rounded to the input dtype
        w = tl.load(W + cols, mask=mask, other=0.0)
        y = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_bwd(DS, DY, X, W, RSTD, DX, stride_ds, stride_dy, stride_x, stride_dx, N,
                 HAS_DS: tl.constexpr, BLOCK: tl.constexpr):
        """dx of y = w · x/rms(x) (the weight frozen), plus DS when HAS_DS: the gradient a
        sum s = residual + delta gets from its other reader (`fused_residual`)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        dn = dy * w
        n = x * rstd
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / N))
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_fwd(G, U, H, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)  # as HF: silu rounded first
        tl.store(H + offs, (act * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(DH, G, U, DG, DU, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        act = g * sig
        tl.store(DU + offs, (dh * act).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


_ELEMENTWISE_BLOCK = 1024


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        shape, n = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        _rms_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        n = x2.shape[1]
        dy2 = dy.reshape(-1, n)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        block = triton.next_power_of_2(n)
        _rms_bwd[(x2.shape[0],)](dy2, dy2, x2, weight, rstd, dx, dy2.stride(0), dy2.stride(0), x2.stride(0),
                                 dx.stride(0), n, HAS_DS=False, BLOCK=block, num_warps=_warps(block))
        return dx.view(ctx.shape), None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:  # type: ignore[override]
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](gate, up, h, n, BLOCK=_ELEMENTWISE_BLOCK)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](dh, gate, up, d_gate, d_up, n, BLOCK=_ELEMENTWISE_BLOCK)
        return d_gate, d_up


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight · (x / rms(x)) as Hugging Face's Llama RMSNorm, in one kernel each way."""
    if weight.requires_grad:
        raise ValueError("the fused RMSNorm is for frozen weights (it computes no weight gradient)")
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up in one kernel each way."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu takes gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    return _SwiGLU.apply(gate, up)


def usable(x: Tensor) -> bool:
    """Compiled kernels only: on CUDA, with Triton installed."""
    return triton is not None and x.is_cuda


def _fused_norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if usable(hidden_states) and not self.weight.requires_grad:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _fused_mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    if usable(x):
        from mlora.model.lora_linear import project_shared  # gate and up read one input: one LoRA call

        return self.down_proj(swiglu(*project_shared(x, (self.gate_proj, self.up_proj))))
    return type(self).forward(self, x)


def fuse_block_ops(model: nn.Module) -> dict[str, int]:
    """Point the RMSNorms, SiLU-gated MLPs and attentions of a model's modules at the
    fused kernels.

    Only the instances' forward changes (names and state dicts stay); modules of other
    kinds (another activation, a norm with an offset, an attention whose forward
    `fused_rope` does not know) keep their own. Returns how many of each were fused.
    """
    from mlora.ops.fused_rope import fuse_attention

    counts = {"rms_norm": 0, "swiglu": 0, "attention": 0}
    for module in model.modules():
        kind = type(module).__name__
        if fuse_attention(module):
            counts["attention"] += 1
        elif kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            module.forward = types.MethodType(_fused_norm_forward, module)
            counts["rms_norm"] += 1
        elif kind.endswith("MLP") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            if _is_silu(getattr(module, "act_fn", None), getattr(module, "config", None)):
                module.forward = types.MethodType(_fused_mlp_forward, module)
                counts["swiglu"] += 1
    return counts


def _is_silu(act: Any, config: Any) -> bool:
    name = getattr(config, "hidden_act", None)
    return isinstance(act, nn.SiLU) or name in ("silu", "swish")
