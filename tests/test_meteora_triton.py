"""The MeteoRA Triton kernels against the loop reference, on CPU through Triton's interpreter.

Small odd shapes: token counts and widths not multiples of the blocks, mixed ranks
(one above 64, so the rank is tiled), an adapter no token chooses, k = 1, 2, 3.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mlora.meteora.kernels import plan_pairs  # noqa: E402
from mlora.meteora.op import meteora_delta, reference_delta  # noqa: E402


def make_case(seed: int, tokens: int, d_in: int, d_out: int, ranks: tuple[int, ...], top_k: int, unused: int | None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen)
    a = [torch.randn(r, d_in, generator=gen) / d_in**0.5 for r in ranks]
    b = [torch.randn(d_out, r, generator=gen) / r**0.5 for r in ranks]
    scales = [0.5 + 0.25 * i for i in range(len(ranks))]
    logits = torch.randn(tokens, len(ranks), generator=gen)
    if unused is not None:
        logits[:, unused] = -1e9  # this adapter gets an empty segment
    top, idx = logits.topk(top_k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    dy = torch.randn(tokens, d_out, generator=gen)
    return x, a, b, scales, idx, weights, dy


def run(backend: str, x, a, b, scales, idx, weights, dy, train_ab: bool):
    x = x.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    a = [t.clone().requires_grad_(train_ab) for t in a]
    b = [t.clone().requires_grad_(train_ab) for t in b]
    if backend == "autograd":
        y = reference_delta(x, a, b, scales, idx, w)
    else:
        y = meteora_delta(x, a, b, scales, idx, w, backend=backend)
    (y * dy).sum().backward()
    ab = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (*a, *b)]  # unused adapter: no grad
    return [y.detach(), x.grad, w.grad, *(ab if train_ab else [])]


CASES = [
    # tokens, d_in, d_out, ranks, top_k, unused adapter
    (37, 45, 29, (3, 8, 5, 8, 1), 2, 2),
    (70, 33, 71, (8, 8, 8), 1, None),
    (19, 17, 23, (24, 2, 70, 16), 3, 1),  # rank 70: two rank tiles
]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case):
    tokens, d_in, d_out, ranks, top_k, unused = case
    data = make_case(7, tokens, d_in, d_out, ranks, top_k, unused)
    want = run("autograd", *data, train_ab=True)
    got = run("triton", *data, train_ab=True)
    names = ["y", "dx", "dweights", *[f"dA{i}" for i in range(len(ranks))], *[f"dB{i}" for i in range(len(ranks))]]
    for name, w, g in zip(names, want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    if unused is not None:
        assert got[3 + unused].abs().max() == 0 and got[3 + len(ranks) + unused].abs().max() == 0


def test_frozen_adapters_give_no_adapter_grads():
    data = make_case(8, 29, 21, 18, (4, 4, 4, 4), 2, None)
    want = run("autograd", *data, train_ab=False)
    got = run("triton", *data, train_ab=False)
    assert len(got) == 3
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_plan_tiles_cover_every_pair_once():
    gen = torch.Generator().manual_seed(9)
    idx = torch.randint(0, 6, (53, 2), generator=gen)
    plan = plan_pairs(idx, 6, block_m=8)
    covered = torch.zeros(idx.numel(), dtype=torch.long)
    for e, s, t in zip(plan.tile_expert.tolist(), plan.tile_start.tolist(), plan.tile_end.tolist()):
        assert t - s <= 8
        covered[s:t] += 1
        assert bool((plan.expert[s:t] == e).all())
    assert bool((covered == 1).all())
    assert bool((idx.reshape(-1)[plan.order] == plan.expert).all())
    assert bool((plan.order // 2 == plan.token).all())
