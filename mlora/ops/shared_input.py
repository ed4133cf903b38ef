"""Projections that read one input (q, k, v; gate, up) as one multi-LoRA call on Triton.

Called one by one, each of a block's q, k and v projections reads its input twice besides
its GEMM (the shrink forward, the dA pass backward), and autograd then adds their three
input gradients with two more passes over [T, d_in]. Here every slot's A's of all the
members are stacked (member m at rows m·P of the slot, P the members' rank block), so one
shrink writes every member's h and one pass over x gives every member's dA. Each member
keeps its forward GEMM, which reads its P columns of the shared h, and its dy pass, which
adds its g into its P columns of one shared g; then one dx GEMM sums every member's dy·W in
its K loop (`fused_gemm(..., more=)`) and their LoRA parts as one expand of the stacked A
by that g, so dx is written once and no partial input gradient goes through memory.

Same sums as calling `multi_lora_linear` per member (dx is rounded once instead of once
per member). Used only where it applies (`fits`): Triton with the base product fused,
slot ranks with P ≤ 16 (g by the dy pass's atomics) and M·P ≤ 64, no dropout masks,
torch's deterministic algorithms off; `shared_input_enabled` turns it off.
See docs/kernels.md, "Projections sharing an input".
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from mlora.ops.multi_lora import LoraCall, Segment

MAX_STACKED_RANK = 64  # the shrink's and x pass's launch shapes were measured up to R = 64


def shared_input_enabled() -> bool:
    """MLORA_SHARED_INPUT=0 turns the shared call off (benchmarks compare both)."""
    return os.environ.get("MLORA_SHARED_INPUT", "1") != "0"


def fits(ranks: Sequence[int], members: int) -> bool:
    """Whether the members' adapters of these slot ranks can share one call: the slots'
    rank block P small enough that the dy pass adds g by atomics, and the stacked block
    M·P within the shapes the shrink and x pass were measured at."""
    from mlora.ops.kernels import seg_grads
    from mlora.ops.kernels.plan import rank_block

    if members < 2 or not ranks:
        return False
    p = rank_block(ranks)
    return p <= seg_grads.G_IN_DY_PASS_MAX_RANK and members * p <= MAX_STACKED_RANK


class _SharedInputFunction(torch.autograd.Function):
    """Inputs after (x, call, cache, M): M weights, M biases (or None), then for each
    member its n A's and n B's (fp32 masters or x's dtype; cast here, gradients cast back)."""

    @staticmethod
    def forward(ctx, x, call, cache, members, *tensors):  # type: ignore[override]
        from mlora.ops import triton_multi_lora as tm
        from mlora.ops.kernels import fused_gemm as gemm
        from mlora.ops.kernels import shrink as shrink_mod
        from mlora.ops.kernels.plan import padded_rank, rank_block

        n = call.n_slots
        x = x.contiguous()  # the kernels read rows of d_in elements
        weights = [w.contiguous() for w in tensors[:members]]
        biases, params = tensors[members : 2 * members], tensors[2 * members :]
        a_of = [params[2 * n * m : 2 * n * m + n] for m in range(members)]
        b_of = [params[2 * n * m + n : 2 * n * (m + 1)] for m in range(members)]
        ranks = tuple(a.shape[0] for a in a_of[0])
        p, pads, d_in = rank_block(ranks), [padded_rank(r) for r in ranks], x.shape[1]
        cats = [tm.concat(a_of[m], b_of[m], x.dtype) for m in range(members)]
        for w, (a_cat, b_cat) in zip(weights, cats):
            tm._check(x, w, a_cat, b_cat, w.shape[0], ranks)
        # slot j's stacked A: member m's rows at j·M·P + m·P, zeros past each rank (the
        # members' GEMMs read all P columns of their h)
        a_stack = (x.new_empty if set(pads) == {p} else x.new_zeros)(n, members, p, d_in)
        for m, (a_cat, _) in enumerate(cats):
            if len(set(pads)) == 1:
                a_stack[:, m, : pads[0]].copy_(a_cat.view(n, pads[0], d_in))
            else:  # A_cat's slots lie at their padded ranks, one after another
                at = 0
                for j, pr in enumerate(pads):
                    a_stack[j, m, :pr].copy_(a_cat[at : at + pr])
                    at += pr
        group_ranks = (members * p,) * n
        st_group = tm._state(x, group_ranks, call, cache)
        st = tm._state(x, ranks, call, cache)
        precision = tm._precision(x)
        h_all = shrink_mod.shrink(x, a_stack.view(n * members * p, d_in), x, st_group.plan, False, precision)
        ys = tuple(
            gemm.fused_gemm(x, w, bias, h_all[:, m * p : (m + 1) * p], cats[m][1], x, st.plan,
                            w_kn=False, dropout=False, precision=precision)
            for m, (w, bias) in enumerate(zip(weights, biases))
        )
        ctx.call, ctx.cache, ctx.members, ctx.ranks, ctx.p = call, cache, members, ranks, p
        ctx.param_dtypes = [t.dtype for t in params]
        ctx.save_for_backward(x, h_all, a_stack.view(n * members * p, d_in), *weights, *(b for _, b in cats))
        return ys

    @staticmethod
    def backward(ctx, *dys):  # type: ignore[override]
        from mlora.ops import triton_multi_lora as tm
        from mlora.ops.kernels import fused_gemm as gemm
        from mlora.ops.kernels import seg_grads as grads

        call: LoraCall = ctx.call
        members, ranks, p, n = ctx.members, ctx.ranks, ctx.p, call.n_slots
        x, h_all, a_stack, *rest = ctx.saved_tensors
        weights, b_cats = rest[:members], rest[members:]
        tokens, d_in = x.shape
        st = tm._state(x, ranks, call, ctx.cache)
        st_group = tm._state(x, (members * p,) * n, call, ctx.cache)
        precision = tm._precision(x)
        grad_dtype = ctx.param_dtypes[0]
        alloc = torch.empty if all(st.plan.slot_used) else torch.zeros  # a slot without tokens gets zeros
        dys = [dy.contiguous() for dy in dys]

        g_all = torch.zeros(tokens, st_group.plan.rank_pad, dtype=torch.float32, device=x.device)
        d_b: list[list[Tensor]] = []
        for m, dy in enumerate(dys):
            d_out = dy.shape[1]
            off_b, ends_b = tm._offsets(st, d_out)
            flat_b = alloc(ends_b[-1], dtype=grad_dtype, device=x.device)
            if st.plan.n_segments:
                cfg = grads.dy_pass(dy.element_size(), p, width=d_out, segments=st.plan.n_segments)
                grads.seg_grads(h_all[:, m * p : (m + 1) * p], dy, flat_b, off_b, st.plan, tm._items(st, d_out, cfg),
                                cfg, transposed=True, masks=x, dropout=False, precision=precision,
                                g=g_all[:, m * p : (m + 1) * p], b_cat=b_cats[m])
            d_b.append(tm._split(flat_b, ranks, ends_b, False, d_out))

        dx = None
        if ctx.needs_input_grad[0]:  # Σ_m dy_m·W_m + s·g·A_stack: one K loop over the members, one expand
            dx = gemm.fused_gemm(dys[0], weights[0], None, g_all, a_stack, x, st_group.plan, w_kn=True,
                                 dropout=False, precision=precision, more=list(zip(dys[1:], weights[1:])))

        off_a, ends_a = tm._offsets(st_group, d_in)
        flat_a = alloc(ends_a[-1], dtype=grad_dtype, device=x.device)
        if st_group.plan.n_segments:
            cfg = grads.x_pass(x.element_size(), st_group.plan.rank_pad, precision)
            grads.seg_grads(g_all, x, flat_a, off_a, st_group.plan, tm._items(st_group, d_in, cfg), cfg,
                            transposed=False, masks=x, dropout=False, precision=precision)
        stacked = flat_a.view(n, members, p, d_in)
        grads_out: list[Tensor] = []
        for m in range(members):
            grads_out += [stacked[j, m, : ranks[j]] for j in range(n)]
            grads_out += d_b[m]
        grads_out = [g if g.dtype == dt else g.to(dt) for g, dt in zip(grads_out, ctx.param_dtypes)]
        return (dx, None, None, None, *([None] * (2 * members)), *grads_out)


def shared_input_lora(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    lora_a: Sequence[Sequence[Tensor]],
    lora_b: Sequence[Sequence[Tensor]],
    scales: Sequence[float],
    segments: Sequence[Segment],
    cache: dict | None = None,
) -> tuple[Tensor, ...]:
    """Every member's `multi_lora_linear(x, weights[m], biases[m], lora_a[m], lora_b[m],
    scales, segments)` (no dropout) as one call on the Triton kernels; members share the
    slots, their scales and segments. Raises ValueError where `fits` does not hold."""
    members = len(weights)
    if not (len(biases) == len(lora_a) == len(lora_b) == members):
        raise ValueError("shared_input_lora takes one weight, bias, lora_a list and lora_b list per member")
    n = len(scales)
    if any(len(a) != n or len(b) != n for a, b in zip(lora_a, lora_b)):
        raise ValueError(f"every member needs one A and one B per slot ({n} slots)")
    ranks = [a.shape[0] for a in lora_a[0]]
    if any([a.shape[0] for a in member] != ranks for member in lora_a) or not fits(ranks, members):
        raise ValueError(f"members of ranks {[[a.shape[0] for a in member] for member in lora_a]} cannot share "
                         f"one call (every member the same slot ranks, each ≤ 16, at most {MAX_STACKED_RANK} "
                         f"stacked)")
    if x.dim() != 2 or any(w.shape[1] != x.shape[1] for w in weights):
        raise ValueError(f"shared_input_lora takes x [T, d_in] and weights [d_out, d_in], got {tuple(x.shape)} and "
                         f"{[tuple(w.shape) for w in weights]}")
    if torch.are_deterministic_algorithms_enabled():
        raise ValueError("shared_input_lora adds g by atomics: call the members one by one under torch's "
                         "deterministic algorithms")
    call = LoraCall(segments=tuple(segments), scales=tuple(float(s) for s in scales), dropout=(0.0,) * n,
                    has_masks=(False,) * len(segments))
    call.validate(x.shape[0])
    params = [t for a, b in zip(lora_a, lora_b) for t in (*a, *b)]
    return _SharedInputFunction.apply(x, call, cache, members, *weights, *biases, *params)
