"""The MeteoRA mixture delta: Σ over each token's k chosen adapters of w · s · (x·Aᵀ)·Bᵀ.

For x [T, d_in], idx [T, k] (chosen adapters) and weights [T, k] (their softmax weights):

    delta[t] = Σ_j weights[t, j] · s_e · (x_t · A_eᵀ) · B_eᵀ,   e = idx[t, j]

Three ways to compute it:

- `reference_delta`: MeteoRA's training path, a Python loop over the K adapters, each
  taking its tokens by a mask; differentiable by autograd. The oracle.
- `bmm_delta`: MeteoRA's "bmm-torch" path: gather every (token, choice)'s A and B, then
  two batched matmuls. Its memory is O(T·k·d·r): kept as the benchmark's baseline.
- `meteora_delta`: one autograd Function with an explicit backward (gradients for x,
  the weights, and A/B when they require grad), dispatching to
  - "dense": every adapter's A and B concatenated along the rank (Σr columns): h for
    all K adapters in one GEMM, masked to each token's chosen adapters and weights,
    expanded in one GEMM; the backward likewise (6 GEMMs in all, cuBLAS). Extra work
    O(T·d·Σr), memory O(T·Σr): small while Σr ≪ d (K = 28, r = 8: Σr = 224 against
    d = 4096), which is MeteoRA's regime;
  - "triton": kernels that sort the T·k (token, choice) pairs by adapter into
    contiguous segments and run segment shrink/expand kernels with a per-row weight:
    work O(T·k·d·r) and memory O(T·k·r) whatever K, for many or wide adapters;
  - "loop": the per-adapter loop, explicitly differentiated.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

BACKENDS = ("auto", "loop", "dense", "triton")
DENSE_MAX_COLUMNS = 1024  # Σ ranks up to which the all-adapters GEMMs beat per-pair kernels


def _check(x: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], scales: Sequence[float], idx: Tensor, weights: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"meteora_delta takes x of shape [T, d_in], got {tuple(x.shape)}")
    n = len(lora_a)
    if n == 0 or len(lora_b) != n or len(scales) != n:
        raise ValueError("lora_a, lora_b and scales must have one entry per adapter (at least one)")
    d_out = lora_b[0].shape[0]
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != x.shape[1] or b.shape[1] != a.shape[0] or b.shape[0] != d_out:
            raise ValueError(
                f"adapter {i}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit x {tuple(x.shape)} "
                f"(want A [r, {x.shape[1]}], B [{d_out}, r])"
            )
    if idx.dim() != 2 or idx.shape[0] != x.shape[0] or weights.shape != idx.shape:
        raise ValueError(f"idx {tuple(idx.shape)} and weights {tuple(weights.shape)} must both be [T={x.shape[0]}, k]")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be an integer tensor, got {idx.dtype}")
    if not idx.is_cuda and idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < n:
        raise ValueError(f"idx names adapters outside 0..{n - 1}")


def _weight_dtype(weights: Tensor) -> torch.dtype:
    """Routing weights and their gradients are worked in fp32 at least (fp64 in fp64 tests)."""
    return torch.promote_types(weights.dtype, torch.float32)


def reference_delta(
    x: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], scales: Sequence[float], idx: Tensor, weights: Tensor
) -> Tensor:
    """The per-adapter loop MeteoRA trains with, in x's dtype; autograd gives every gradient."""
    _check(x, lora_a, lora_b, scales, idx, weights)
    out = x.new_zeros(x.shape[0], lora_b[0].shape[0])
    for e, (a, b) in enumerate(zip(lora_a, lora_b)):
        rows, slot = torch.where(idx == e)
        if rows.numel() == 0:
            continue
        w = weights[rows, slot].to(x.dtype) * scales[e]
        h = x[rows] @ a.to(x.dtype).t()
        out = out.index_add(0, rows, w[:, None] * (h @ b.to(x.dtype).t()))
    return out


def bmm_delta(
    x: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], scales: Sequence[float], idx: Tensor, weights: Tensor
) -> Tensor:
    """Gather each (token, choice)'s A and B, then batched matmuls (MeteoRA's bmm-torch).

    Needs equal ranks. The gathered [T, k, r, d] weights make it O(T·k·d·r) in memory.
    """
    _check(x, lora_a, lora_b, scales, idx, weights)
    if len({a.shape[0] for a in lora_a}) != 1:
        raise ValueError("bmm_delta needs adapters of one rank")
    a_all = torch.stack([a.to(x.dtype) for a in lora_a])  # [K, r, d_in]
    b_all = torch.stack([b.to(x.dtype) for b in lora_b])  # [K, d_out, r]
    s = torch.tensor(scales, dtype=_weight_dtype(weights), device=x.device)
    t, k = idx.shape
    flat = idx.reshape(-1).long()
    xs = x.repeat_interleave(k, dim=0).unsqueeze(1)  # [T·k, 1, d_in]
    h = torch.bmm(xs, a_all[flat].transpose(1, 2))  # [T·k, 1, r]
    y = torch.bmm(h, b_all[flat].transpose(1, 2)).squeeze(1)  # [T·k, d_out]
    w = (weights.reshape(-1) * s[flat]).to(x.dtype)
    return (w[:, None] * y).view(t, k, -1).sum(1)


def _loop_forward(x: Tensor, a: Sequence[Tensor], b: Sequence[Tensor], scales: Sequence[float], idx: Tensor, weights: Tensor) -> Tensor:
    with torch.no_grad():
        return reference_delta(x, a, b, scales, idx, weights)


def _loop_backward(
    dy: Tensor, x: Tensor, a: Sequence[Tensor], b: Sequence[Tensor], scales: Sequence[float],
    idx: Tensor, weights: Tensor, need_dx: bool, need_ab: bool,
) -> tuple[Tensor | None, Tensor, list[Tensor], list[Tensor]]:
    """dx, dweights, dA_e, dB_e by the same loop: h and g = dy·B_e are recomputed per adapter."""
    dx = torch.zeros_like(x) if need_dx else None
    wdt = _weight_dtype(weights)
    dw = torch.zeros(weights.shape, dtype=wdt, device=x.device)
    d_a = [torch.zeros_like(t) for t in a] if need_ab else []
    d_b = [torch.zeros_like(t) for t in b] if need_ab else []
    for e in range(len(a)):
        rows, slot = torch.where(idx == e)
        if rows.numel() == 0:
            continue
        s = scales[e]
        xe, dye = x[rows], dy[rows]
        h = xe @ a[e].t()  # [n_e, r]
        g = dye @ b[e]  # [n_e, r]
        dw[rows, slot] = s * (g.to(wdt) * h.to(wdt)).sum(-1)
        ws = (weights[rows, slot].to(wdt) * s).to(x.dtype)[:, None]
        if dx is not None:
            dx.index_add_(0, rows, (ws * g) @ a[e])
        if need_ab:
            d_a[e] = (ws * g).t() @ xe
            d_b[e] = dye.t() @ (ws * h)
    return dx, dw.to(weights.dtype), d_a, d_b


def _dense_coef(idx: Tensor, weights: Tensor, scale_t: Tensor, n_adapters: int) -> Tensor:
    """[T, K] (fp32 at least): w·s of each chosen adapter of each token, 0 for the others."""
    wdt = _weight_dtype(weights)
    coef = torch.zeros(idx.shape[0], n_adapters, dtype=wdt, device=idx.device)
    return coef.scatter_add_(1, idx.long(), weights.to(wdt) * scale_t[idx.long()].to(wdt))


def _dense_forward(x: Tensor, a_cat: Tensor, b_cat: Tensor, col: Tensor, coef: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """delta, h [T, Σr] (every adapter's x·Aᵀ) and the column mask m [T, Σr] (w·s or 0)."""
    h = x @ a_cat.t()
    m = coef[:, col].to(x.dtype)
    return (h * m) @ b_cat.t(), h, m


def _dense_backward(
    dy: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, col: Tensor, h: Tensor, m: Tensor,
    idx: Tensor, scale_t: Tensor, n_adapters: int, need_dx: bool, need_ab: bool,
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """dx, d(weights) [T, k] fp32, dA_cat, dB_cat."""
    g = dy @ b_cat  # [T, Σr]
    # d(delta)/d(w_tj) = s_e · Σ_r g_r h_r over the chosen adapter e's columns
    wdt = torch.promote_types(x.dtype, torch.float32)
    per_col = g.to(wdt) * h.to(wdt)
    per_adapter = torch.zeros(x.shape[0], n_adapters, dtype=wdt, device=x.device).index_add_(1, col, per_col)
    dw = per_adapter.gather(1, idx.long()) * scale_t[idx.long()].to(wdt)
    gs = g * m
    dx = gs @ a_cat if need_dx else None
    d_a = gs.t() @ x if need_ab else None
    d_b = dy.t() @ (h * m) if need_ab else None
    return dx, dw, d_a, d_b


@functools.lru_cache(maxsize=64)
def _dense_tables(ranks: tuple[int, ...], scales: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Each concatenated rank column's adapter, and each adapter's scale, on the device.

    Built once per (ranks, scales, device): every gated linear of every step shares
    them, instead of copying two small host tensors per call.
    """
    col = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)).to(device)
    return col, torch.tensor(list(scales), dtype=torch.float64).to(device)


class _MeteoraFunction(torch.autograd.Function):
    """Adapters may be fp32 masters under a bf16 x: cast here, gradients cast back."""

    @staticmethod
    def forward(ctx, x, idx, weights, scales, backend, *ab):  # type: ignore[override]
        n = len(scales)
        a = [t.to(x.dtype) for t in ab[:n]]
        b = [t.to(x.dtype) for t in ab[n:]]
        ctx.scales, ctx.backend, ctx.param_dtypes = scales, backend, [t.dtype for t in ab]
        ctx.need_ab = any(ctx.needs_input_grad[5:])
        if backend == "triton":
            from mlora.meteora import kernels

            y, saved = kernels.forward(x, a, b, scales, idx, weights)
            ctx.save_for_backward(x, idx, weights, *saved)
        elif backend == "dense":
            ranks = [t.shape[0] for t in a]
            col, scale_t = _dense_tables(tuple(ranks), tuple(scales), x.device)
            a_cat, b_cat = torch.cat(a, 0), torch.cat(b, 1)
            coef = _dense_coef(idx, weights, scale_t, n)
            y, h, m = _dense_forward(x, a_cat, b_cat, col, coef)
            ctx.ranks = ranks
            ctx.save_for_backward(x, idx, weights, a_cat, b_cat, col, scale_t, h, m)
        else:
            y = _loop_forward(x, a, b, scales, idx, weights)
            ctx.save_for_backward(x, idx, weights, *ab)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, idx, weights, *rest = ctx.saved_tensors
        dy = dy.contiguous()
        need_dx = ctx.needs_input_grad[0]
        if ctx.backend == "triton":
            from mlora.meteora import kernels

            dx, dw, d_a, d_b = kernels.backward(dy, x, weights, ctx.scales, rest, need_dx, ctx.need_ab)
        elif ctx.backend == "dense":
            a_cat, b_cat, col, scale_t, h, m = rest
            dx, dw, d_a_cat, d_b_cat = _dense_backward(
                dy, x, a_cat, b_cat, col, h, m, idx, scale_t, len(ctx.scales), need_dx, ctx.need_ab
            )
            dw = dw.to(weights.dtype)
            d_a = list(d_a_cat.split(ctx.ranks, 0)) if d_a_cat is not None else []
            d_b = list(d_b_cat.split(ctx.ranks, 1)) if d_b_cat is not None else []
        else:
            n = len(ctx.scales)
            a = [t.to(x.dtype) for t in rest[:n]]
            b = [t.to(x.dtype) for t in rest[n:]]
            dx, dw, d_a, d_b = _loop_backward(dy, x, a, b, ctx.scales, idx, weights, need_dx, ctx.need_ab)
        if ctx.need_ab:
            grads = [g.to(dt) for g, dt in zip((*d_a, *d_b), ctx.param_dtypes)]
        else:
            grads = [None] * len(ctx.param_dtypes)
        return (dx, None, dw if ctx.needs_input_grad[2] else None, None, None, *grads)


def _triton_available(x: Tensor) -> bool:
    if not x.is_cuda:
        return False
    try:
        from mlora.meteora import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(x: Tensor, backend: str, columns: int = 0) -> str:
    """'auto': the dense GEMMs while Σ ranks (`columns`) ≤ DENSE_MAX_COLUMNS and ≤ d_in / 2,
    else the Triton pair kernels on CUDA (the loop on the CPU). 'triton' on the CPU needs
    TRITON_INTERPRET=1. Measured on an H200 in bench/README.md (MeteoRA section)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MeteoRA backend {backend!r}: use {', '.join(BACKENDS)}")
    if backend == "auto":
        if columns <= DENSE_MAX_COLUMNS and 2 * columns <= x.shape[1]:
            return "dense"
        return "triton" if _triton_available(x) else "loop"
    return backend


def meteora_delta(
    x: Tensor,
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    scales: Sequence[float],
    idx: Tensor,
    weights: Tensor,
    backend: str = "auto",
) -> Tensor:
    """delta [T, d_out] = Σ_j weights[:, j] · s_e · (x·A_eᵀ)·B_eᵀ with e = idx[:, j].

    `lora_a[e]` is [r_e, d_in] and `lora_b[e]` is [d_out, r_e] (PEFT's layout); ranks
    may differ. Gradients flow to x, to weights (hence to the gate) and to A/B when
    they require grad (MeteoRA keeps them frozen; the train_loras option does not).
    """
    _check(x, lora_a, lora_b, scales, idx, weights)
    chosen = resolve_backend(x, backend, sum(a.shape[0] for a in lora_a))
    return _MeteoraFunction.apply(x, idx, weights, tuple(float(s) for s in scales), chosen, *lora_a, *lora_b)
