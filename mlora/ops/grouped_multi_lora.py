"""Several multi-LoRA linears that read the same input, as one operator.

q/k/v of an attention block all read the same x, and so do gate/up of an MLP. Run as
separate multi-LoRA linears, each pays its own dispatch: on a 1B-parameter model the
host, not the GPU, sets the pace of a step. Here one autograd Function does the group:

    Y = x·W_catᵀ (+ bias)                    W_cat: the members' weights stacked
    H = x·A_allᵀ,  Hs = H ⊙ S                A_all: every (member, job) A stacked along
                                             the rank; S: the job's scale on its own
                                             tokens' columns, else 0 (as the dense path)
    Y_m += Hs[:, cols_m] · B_{m,cat}ᵀ         per member m, its (job) B's side by side

and the backward likewise, giving each member's output as its own tensor. The math
is the dense multi-LoRA path's (`dense_multi_lora`), member by member; no dropout
(the group is used only when no job of the batch has LoRA dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class GroupEntry:
    """One (member, job) adapter of the call: the job's token range and scale."""

    member: int
    start: int
    end: int
    scale: float


def _scale_matrix(entries: Sequence[GroupEntry], ranks: Sequence[int], tokens: int, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """S [T, Σr]: each entry's scale on its columns, for the tokens of its job."""
    s = torch.zeros(tokens, sum(ranks), dtype=dtype)
    col = 0
    for e, r in zip(entries, ranks):
        s[e.start : e.end, col : col + r] = e.scale
        col += r
    return s.to(device, non_blocking=True)


class _GroupedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, biases, entries, cache, *ab):  # type: ignore[override]
        n = len(entries)
        a = [t.to(x.dtype) for t in ab[:n]]
        b = [t.to(x.dtype) for t in ab[n:]]
        ranks = [t.shape[0] for t in a]
        key = ("grouped-scale", entries, tuple(ranks), x.shape[0], x.dtype)
        scale = cache.get(key) if cache is not None else None
        if scale is None:
            scale = _scale_matrix(entries, ranks, x.shape[0], x.dtype, x.device)
            if cache is not None:
                cache[key] = scale
        a_all = torch.cat(a, 0) if n else None
        hs = (x @ a_all.t()) * scale if n else None
        outs = []
        col = 0
        for m, (w, bias) in enumerate(zip(weights, biases)):
            y = torch.nn.functional.linear(x, w, bias)
            cols = [i for i, e in enumerate(entries) if e.member == m]
            if cols:
                width = sum(ranks[i] for i in cols)
                b_m = torch.cat([b[i] for i in cols], 1)
                y.addmm_(hs[:, col : col + width], b_m.t())
                col += width
            outs.append(y)
        ctx.entries, ctx.ranks, ctx.dtypes = entries, ranks, [t.dtype for t in ab]
        ctx.save_for_backward(x, scale, *(hs, a_all) if n else (), *weights, *b)
        ctx.n_members = len(weights)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):  # type: ignore[override]
        entries, ranks, n = ctx.entries, ctx.ranks, len(ctx.entries)
        saved = ctx.saved_tensors
        x, scale = saved[0], saved[1]
        rest = saved[2:]
        hs, a_all = (rest[0], rest[1]) if n else (None, None)
        rest = rest[2:] if n else rest
        weights, b = rest[: ctx.n_members], rest[ctx.n_members :]
        dys = [dy if dy is not None else torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
               for dy, w in zip(dys, weights)]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dys[0] @ weights[0]
            for dy, w in zip(dys[1:], weights[1:]):
                dx.addmm_(dy, w)
        if not n:
            return (dx, None, None, None, None)
        g_parts, db = [], [None] * n
        col = 0
        for m, dy in enumerate(dys):
            cols = [i for i, e in enumerate(entries) if e.member == m]
            if not cols:
                continue
            width = sum(ranks[i] for i in cols)
            b_m = torch.cat([b[i] for i in cols], 1)
            g_parts.append(dy @ b_m)
            db_m = dy.t() @ hs[:, col : col + width]  # [d_m, width]
            for i, piece in zip(cols, db_m.split([ranks[i] for i in cols], 1)):
                db[i] = piece
            col += width
        g = torch.cat(g_parts, 1) * scale
        if dx is not None:
            dx.addmm_(g, a_all)
        da = list((g.t() @ x).split(ranks, 0))
        grads = [t.to(dt) for t, dt in zip((*da, *db), ctx.dtypes)]
        return (dx, None, None, None, None, *grads)


def grouped_multi_lora(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    entries: Sequence[GroupEntry],
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    cache: dict | None = None,
) -> tuple[Tensor, ...]:
    """Each member's y_m = x·W_mᵀ (+ b_m) + Σ over its entries s·(x[seg]·Aᵀ)·Bᵀ, for x [T, d_in].

    `entries[i]` says which member adapter i (lora_a[i] [r, d_in], lora_b[i] [d_m, r])
    belongs to and which tokens it applies to; entries must be ordered by member.
    Adapters may be fp32 masters under a bf16 x (cast here, gradients cast back).
    """
    if x.dim() != 2:
        raise ValueError(f"grouped_multi_lora takes x of shape [T, d_in], got {tuple(x.shape)}")
    if len(lora_a) != len(entries) or len(lora_b) != len(entries):
        raise ValueError("one A and one B per entry")
    if [e.member for e in entries] != sorted(e.member for e in entries):
        raise ValueError("entries must be ordered by member")
    for e in entries:
        if not 0 <= e.member < len(weights) or not 0 <= e.start <= e.end <= x.shape[0]:
            raise ValueError(f"entry {e} does not fit {len(weights)} members and {x.shape[0]} tokens")
    return _GroupedFunction.apply(x, tuple(weights), tuple(biases), tuple(entries), cache, *lora_a, *lora_b)
