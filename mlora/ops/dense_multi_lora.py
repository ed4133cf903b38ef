"""The multi-LoRA operator as a handful of dense GEMMs (the PyTorch path on every device).

A per-segment loop launches ~20 kernels per job per linear, so with many jobs the GPU
waits on Python. Here all slots' adapters are concatenated along the rank:
A_cat [Σr, d_in], B_cat [d_out, Σr], and a [T, Σr] matrix S holds s_j where token t's
slot owns column c, else 0. Then

    forward:  H = drop(x)·A_catᵀ,  Hs = H ⊙ S,  y = x·Wᵀ + b + Hs·B_catᵀ
    backward: G = (dy·B_cat) ⊙ S,  dx = dy·W + drop'(G·A_cat),
              dA_cat = Gᵀ·drop(x),  dB_cat = dyᵀ·Hs

S zeroes every other slot's columns, so each token only touches its own adapter and
the token sums in dA_cat and dB_cat reduce over each slot's own tokens: exactly the
per-segment math, in 7 GEMMs whatever the number of jobs. The extra work is
O(T·d·Σr) instead of O(T·d·r_j): negligible next to the base GEMM while Σr ≪ d, which
is why the Triton kernels (segment-aware) take over on CUDA.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mlora.ops.multi_lora import LoraCall


def slot_scale_matrix(call: LoraCall, ranks: Sequence[int], tokens: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """S [T, Σr]: s_slot on the columns of the token's own slot, 0 elsewhere."""
    slot_of_token = torch.full((tokens,), -1, dtype=torch.int64)
    for seg in call.segments:
        slot_of_token[seg.start : seg.end] = seg.slot
    cols = [(slot, call.scales[slot]) for slot, r in enumerate(ranks) for _ in range(r)]
    slot_of_col = torch.tensor([c[0] for c in cols], dtype=torch.int64)
    scale_of_col = torch.tensor([c[1] for c in cols], dtype=dtype)
    slot_of_token, slot_of_col, scale_of_col = (t.to(device, non_blocking=True) for t in (slot_of_token, slot_of_col, scale_of_col))
    return (slot_of_token[:, None] == slot_of_col[None, :]).to(dtype) * scale_of_col[None, :]


def dropout_multiplier(call: LoraCall, masks: Sequence[Tensor | None], x: Tensor) -> Tensor | None:
    """[T, d_in] multiplier (keep / (1-p), 1 outside dropped segments), or None if no dropout."""
    if not any(m is not None and call.dropout[s.slot] > 0 for s, m in zip(call.segments, masks)):
        return None
    mult = torch.ones_like(x)
    for seg, mask in zip(call.segments, masks):
        p = call.dropout[seg.slot]
        if mask is not None and p > 0 and seg.end > seg.start:
            mult[seg.start : seg.end] = mask.to(x.dtype) * (1.0 / (1.0 - p))
    return mult


def concat(lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A_cat [Σr, d_in] and B_cat [d_out, Σr], contiguous, in the compute dtype: two copies
    and two casts whatever the number of slots (none for one slot already in dtype).
    Both operator paths take the adapters this way."""
    a_cat = torch.cat(list(lora_a), dim=0) if len(lora_a) != 1 else lora_a[0]
    b_cat = torch.cat(list(lora_b), dim=1) if len(lora_b) != 1 else lora_b[0]
    return a_cat.to(dtype).contiguous(), b_cat.to(dtype).contiguous()


def forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a_cat: Tensor,
    b_cat: Tensor,
    masks: Sequence[Tensor | None],
    call: LoraCall,
    scale: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """y, and what backward needs: Hs [T, Σr] and the dropout multiplier."""
    mult = dropout_multiplier(call, masks, x)
    xd = x if mult is None else x * mult
    hs = (xd @ a_cat.t()) * scale
    y = torch.nn.functional.linear(x, weight, bias)
    y.addmm_(hs, b_cat.t())
    return y, hs, mult


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    a_cat: Tensor,
    b_cat: Tensor,
    ranks: Sequence[int],
    scale: Tensor,
    hs: Tensor,
    mult: Tensor | None,
    need_dx: bool,
    grad_dtype: torch.dtype,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """dx and every slot's dA, dB (views into two [Σr, ·] results, in grad_dtype)."""
    g = (dy @ b_cat) * scale
    xd = x if mult is None else x * mult
    d_a_cat = (g.t() @ xd).to(grad_dtype)
    d_b_cat = (dy.t() @ hs).to(grad_dtype)
    dx = None
    if need_dx:
        dx = dy @ weight
        if mult is None:
            dx.addmm_(g, a_cat)
        else:
            dx += (g @ a_cat) * mult
    return dx, list(d_a_cat.split(list(ranks), dim=0)), list(d_b_cat.split(list(ranks), dim=1))
