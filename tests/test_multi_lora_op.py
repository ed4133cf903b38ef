"""The multi-LoRA operator against autograd over a naive per-job loop (PEFT's math)."""

from __future__ import annotations

import pytest
import torch

from mlora.ops import Segment, multi_lora_linear


def naive(x, weight, bias, a_list, b_list, scales, segments, dropout, masks):
    """What you would write by hand: one LoRA at a time, autograd does the rest."""
    out = torch.nn.functional.linear(x, weight, bias)
    for seg, mask in zip(segments, masks):
        if seg.end == seg.start:
            continue
        xs = x[seg.start : seg.end]
        if mask is not None:
            xs = xs * mask.to(xs.dtype) / (1 - dropout[seg.slot])
        delta = scales[seg.slot] * (xs @ a_list[seg.slot].t()) @ b_list[seg.slot].t()
        out = out.index_add(0, torch.arange(seg.start, seg.end), delta)
    return out


def random_case(seed: int, with_bias: bool, with_dropout: bool):
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = 23, 19
    ranks = [4, 1, 8, 3]
    cuts = sorted(torch.randint(0, 61, (7,), generator=gen).tolist())
    bounds = [0, *cuts, 61]
    segments = []
    for k in range(len(bounds) - 1):
        if k % 3 == 2:
            continue  # leave some tokens outside every segment (base output only)
        segments.append(Segment(k % len(ranks), bounds[k], bounds[k + 1]))
    segments.append(Segment(1, bounds[-1], bounds[-1]))  # an empty segment
    x = torch.randn(61, d_in, dtype=torch.float64, generator=gen)
    w = torch.randn(d_out, d_in, dtype=torch.float64, generator=gen)
    b = torch.randn(d_out, dtype=torch.float64, generator=gen) if with_bias else None
    a_list = [torch.randn(r, d_in, dtype=torch.float64, generator=gen) for r in ranks]
    b_list = [torch.randn(d_out, r, dtype=torch.float64, generator=gen) for r in ranks]
    scales = [2.0, 0.5, 1.25, 3.0]
    dropout = [0.1, 0.0, 0.3, 0.2] if with_dropout else [0.0] * 4
    masks = [
        (torch.rand(s.end - s.start, d_in, generator=gen) >= dropout[s.slot]) if with_dropout and dropout[s.slot] else None
        for s in segments
    ]
    return x, w, b, a_list, b_list, scales, segments, dropout, masks


@pytest.mark.parametrize("backend", ["loop", "torch"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_dropout", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_and_gradients_match_naive_loop(seed, with_bias, with_dropout, backend):
    x, w, b, a_list, b_list, scales, segments, dropout, masks = random_case(seed, with_bias, with_dropout)
    leaves = [t.clone().requires_grad_(True) for t in (x, *a_list, *b_list)]
    lx, la, lb = leaves[0], leaves[1:5], leaves[5:9]
    y = multi_lora_linear(lx, w, b, la, lb, scales, segments, dropout=dropout, dropout_masks=masks, backend=backend)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, *a_list, *b_list)]
    rx, ra, rb = ref_leaves[0], ref_leaves[1:5], ref_leaves[5:9]
    y_ref = naive(rx, w, b, ra, rb, scales, segments, dropout, masks)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    # a slot used by no non-empty segment gets an exactly zero gradient
    used = {s.slot for s in segments if s.end > s.start}
    for slot in set(range(4)) - used:
        assert torch.count_nonzero(grads[1 + slot]) == 0


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_gradcheck(backend):
    x, w, b, a_list, b_list, scales, segments, dropout, masks = random_case(5, True, True)
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, a_list[0], a_list[2], b_list[0], b_list[2]))

    def f(x, a0, a2, b0, b2):
        a = [a0, a_list[1], a2, a_list[3]]
        bb = [b0, b_list[1], b2, b_list[3]]
        return multi_lora_linear(x, w, b, a, bb, scales, segments, dropout=dropout, dropout_masks=masks, backend=backend)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize(
    "segments, message",
    [
        ([Segment(0, 0, 5), Segment(0, 4, 8)], "overlaps"),
        ([Segment(0, 0, 11)], "leaves"),
        ([Segment(2, 0, 4)], "slot 2"),
    ],
)
def test_bad_segments_are_refused(segments, message):
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=message):
        multi_lora_linear(x, torch.randn(3, 4), None, [torch.randn(2, 4)], [torch.randn(3, 2)], [1.0], segments)


def test_fp32_adapters_under_bf16_inputs_get_fp32_gradients():
    """Master weights stay fp32; the math runs in x's dtype; the cache is shared."""
    x, w, b, a_list, b_list, scales, segments, dropout, masks = random_case(3, True, False)
    xb, wb, bb = x.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16)
    a32 = [a.float().requires_grad_(True) for a in a_list]
    b32 = [t.float().requires_grad_(True) for t in b_list]
    cache: dict = {}
    y = multi_lora_linear(xb, wb, bb, a32, b32, scales, segments, backend="torch", cache=cache)
    assert y.dtype == torch.bfloat16 and len(cache) == 1
    y.float().sum().backward()
    ref = naive(x, w, b, a_list, b_list, scales, segments, dropout, masks)
    assert (y.double() - ref).norm() / ref.norm() < 2e-2
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in a32 + b32)
