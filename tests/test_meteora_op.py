"""The MeteoRA delta: the loop Function and the bmm baseline against a per-token loop."""

from __future__ import annotations

import pytest
import torch

from mlora.meteora.gate import aux_loss, gate_loss, route, task_labels
from mlora.meteora.op import bmm_delta, meteora_delta, reference_delta


def make_case(seed: int, tokens: int = 23, d_in: int = 19, d_out: int = 13, ranks=(3, 8, 5, 1, 6), top_k: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    a = [torch.randn(r, d_in, generator=gen, dtype=torch.float64) / d_in**0.5 for r in ranks]
    b = [torch.randn(d_out, r, generator=gen, dtype=torch.float64) / r**0.5 for r in ranks]
    scales = [0.5 + 0.3 * i for i in range(len(ranks))]
    gate = torch.randn(len(ranks), d_in, generator=gen, dtype=torch.float64)
    dy = torch.randn(tokens, d_out, generator=gen, dtype=torch.float64)
    return x, a, b, scales, gate, dy, top_k


def per_token(x, a, b, scales, idx, weights):
    """The definition, one token and one choice at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(b[0].shape[0], dtype=x.dtype)
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            acc = acc + weights[t, j] * scales[e] * (b[e] @ (a[e] @ x[t]))
        rows.append(acc)
    return torch.stack(rows)


def grads_of(fn, x, a, b, scales, gate, dy, top_k, train_ab=True):
    """Output and gradients w.r.t. x, gate, A and B, through route() and fn."""
    x = x.clone().requires_grad_()
    gate = gate.clone().requires_grad_()
    a = [t.clone().requires_grad_(train_ab) for t in a]
    b = [t.clone().requires_grad_(train_ab) for t in b]
    _, idx, weights = route(x, gate, top_k)
    y = fn(x, a, b, scales, idx, weights.to(x.dtype))
    (y * dy).sum().backward()
    ab = [t.grad for t in (*a, *b)] if train_ab else []
    return [y.detach(), x.grad, gate.grad, *ab]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_reference_matches_per_token_loop(seed, top_k):
    case = make_case(seed, top_k=top_k)
    want = grads_of(per_token, *case)
    got = grads_of(reference_delta, *case)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["loop", "dense"])
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("train_ab", [True, False])
def test_function_matches_autograd_reference(backend, top_k, train_ab):
    """Mixed ranks (3, 8, 5, 1, 6), every gradient, fp64."""
    case = make_case(2, top_k=top_k)
    want = grads_of(reference_delta, *case, train_ab=train_ab)
    got = grads_of(lambda *args: meteora_delta(*args, backend=backend), *case, train_ab=train_ab)
    assert len(got) == (3 + 10 if train_ab else 3)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_auto_picks_dense_for_narrow_adapters_only():
    from mlora.meteora.op import resolve_backend

    x = torch.zeros(4, 4096)
    assert resolve_backend(x, "auto", 28 * 8) == "dense"
    assert resolve_backend(x, "auto", 256 * 16) == "loop"  # CPU: no compiled kernels
    assert resolve_backend(torch.zeros(4, 64), "auto", 64) == "loop"  # Σr > d_in / 2


def test_bmm_baseline_matches_reference():
    case = make_case(3, ranks=(4, 4, 4, 4))
    want = grads_of(reference_delta, *case)
    got = grads_of(bmm_delta, *case)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["loop", "dense"])
def test_fp32_masters_under_bf16_x(backend):
    x, a, b, scales, gate, dy, k = make_case(4)
    x, dy = x.bfloat16(), dy.bfloat16()
    a = [t.float().requires_grad_() for t in a]
    b = [t.float().requires_grad_() for t in b]
    _, idx, w = route(x, gate.float(), k)
    y = meteora_delta(x, a, b, scales, idx, w, backend=backend)
    assert y.dtype == torch.bfloat16
    (y.float() * dy.float()).sum().backward()
    assert all(t.grad.dtype == torch.float32 and t.grad.abs().sum() > 0 for t in (*a, *b))
    want = reference_delta(x.double(), [t.double() for t in a], [t.double() for t in b], scales, idx, w.double())
    torch.testing.assert_close(y.double(), want, rtol=0.05, atol=0.05)


def test_route_and_gate_loss():
    gen = torch.Generator().manual_seed(5)
    x, gate = torch.randn(9, 7, generator=gen), torch.randn(4, 7, generator=gen)
    logits, idx, w = route(x, gate, top_k=2, temperature=0.7)
    torch.testing.assert_close(logits, x @ gate.t())
    top = torch.sort(x @ gate.t(), dim=-1, descending=True).values[:, :2]
    torch.testing.assert_close(w, torch.softmax(top / 0.7, dim=-1))
    assert idx.dtype == torch.int64 and bool((torch.gather(logits, 1, idx) == top).all())
    task = torch.tensor([0, 1, 2, 3, -100, 1, 0, -100, 2])
    total, count = gate_loss(logits, task)
    keep = task != -100
    torch.testing.assert_close(total, torch.nn.functional.cross_entropy(logits[keep], task[keep], reduction="sum"))
    assert int(count) == 7
    mean = aux_loss([logits, 2 * logits], task, coef=50.0)
    want = 50.0 * (total + gate_loss(2 * logits, task)[0]) / 14
    torch.testing.assert_close(mean, want)


def test_task_labels_mark_pads():
    labels = task_labels([3, 1], [2, 4], seq_len=4)
    assert labels.tolist() == [3, 3, -100, -100, 1, 1, 1, 1]


def test_bad_inputs_are_refused():
    x, a, b, scales, gate, _, k = make_case(6)
    _, idx, w = route(x, gate, k)
    with pytest.raises(ValueError, match="adapter 1"):
        meteora_delta(x, [a[0], a[1][:, :5], *a[2:]], b, scales, idx, w)
    with pytest.raises(ValueError, match="outside"):
        meteora_delta(x, a, b, scales, idx + 10, w)
    with pytest.raises(ValueError, match="top_k"):
        route(x, gate, 9)
