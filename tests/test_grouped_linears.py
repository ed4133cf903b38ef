"""q/k/v and gate/up as one grouped operator == each linear on its own (outputs, every gradient)."""

from __future__ import annotations

import pytest
import torch

from mlora.config.schema import ALL_TARGET_MODULES
from mlora.model.lora_linear import BatchLayout, JobRows, StageAdapter
from mlora.model.stage import load_stage
from mlora.ops.grouped_multi_lora import GroupEntry, grouped_multi_lora

JOBS = [  # (name, rank, targets): a job on part of a group, one on all of it, one on none of it
    ("qv", 4, ("q_proj", "v_proj")),
    ("all", 8, ALL_TARGET_MODULES),
    ("mlp-out", 2, ("down_proj", "o_proj")),
]


def run(stage, ids, layout, grouped: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    saved = {g: [m.group for m in g.members] for g in stage.groups}
    if not grouped:
        for g in stage.groups:
            for m in g.members:
                m.group = None
    try:
        for adapter in stage.routing.adapters.values():
            for p in adapter.parameters():
                p.grad = None
        hidden = stage(ids, layout)
        (hidden.float().pow(2).mean()).backward()
        grads = {f"{a.job}:{i}": p.grad.clone() for a in stage.routing.adapters.values() for i, p in enumerate(a.parameters())}
        return hidden.detach(), grads
    finally:
        for g, groups in saved.items():
            for m, grp in zip(g.members, groups):
                m.group = grp


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with bias
@pytest.mark.parametrize("training", [True, False])
def test_grouped_equals_separate(tiny_models, arch, training):
    stage = load_stage(tiny_models[arch])
    for k, (name, r, targets) in enumerate(JOBS):
        adapter = StageAdapter.create(name, r, 2.0 * r, 0.0, False, stage.linear_shapes(targets), seed=k)
        with torch.no_grad():
            for b in adapter.b.values():
                b.normal_(0, 0.1)  # B starts at zero: make the adapters matter
        stage.routing.adapters[name] = adapter
    ids = torch.randint(3, 500, (7, 9))
    layout = BatchLayout(7, 9, (JobRows("qv", 0, 2, 9, 1), JobRows("all", 2, 5, 9, 2), JobRows("mlp-out", 5, 7, 9, 3)), training)
    y_sep, g_sep = run(stage, ids, layout, grouped=False)
    y_grp, g_grp = run(stage, ids, layout, grouped=True)
    torch.testing.assert_close(y_grp, y_sep, rtol=1e-4, atol=1e-5)  # fp32, other summation order
    assert g_grp.keys() == g_sep.keys() and len(g_sep) == 2 * (2 + 7 + 2) * stage.config.num_hidden_layers
    for key in g_sep:
        torch.testing.assert_close(g_grp[key], g_sep[key], rtol=1e-4, atol=1e-6)


def test_the_group_is_used_and_skipped_when_a_job_has_dropout(tiny_models):
    stage = load_stage(tiny_models["llama"])
    calls = []
    import mlora.model.lora_linear as lora_linear

    original = lora_linear.grouped_multi_lora
    lora_linear.grouped_multi_lora = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        shapes = stage.linear_shapes(ALL_TARGET_MODULES)
        stage.routing.adapters["a"] = StageAdapter.create("a", 4, 8.0, 0.0, False, shapes, seed=0)
        layout = BatchLayout(2, 5, (JobRows("a", 0, 2, 5, 1),), True)
        stage(torch.randint(3, 500, (2, 5)), layout)
        assert len(calls) == 2 * stage.config.num_hidden_layers  # q/k/v and gate/up of every block
        stage.routing.adapters["a"].dropout = 0.1
        calls.clear()
        stage(torch.randint(3, 500, (2, 5)), layout)
        assert calls == []
    finally:
        lora_linear.grouped_multi_lora = original


def test_grouped_operator_checks_and_mixed_dtypes():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)]
    a = [torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    b = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True), torch.randn(4, 2, dtype=torch.float64, requires_grad=True)]
    entries = [GroupEntry(0, 0, 4, 0.5), GroupEntry(1, 2, 6, 2.0)]
    ys = grouped_multi_lora(x, w, [None, None], entries, a, b)
    want0 = x @ w[0].t()
    want0[0:4] += 0.5 * (x[0:4] @ a[0].t()) @ b[0].t()
    want1 = x @ w[1].t()
    want1[2:6] += 2.0 * (x[2:6] @ a[1].t()) @ b[1].t()
    torch.testing.assert_close(ys[0], want0)
    torch.testing.assert_close(ys[1], want1)
    assert torch.autograd.gradcheck(lambda x_, *ab: grouped_multi_lora(x_, w, [None, None], entries, ab[:2], ab[2:]),
                                    (x, *a, *b))
    with pytest.raises(ValueError, match="ordered by member"):
        grouped_multi_lora(x, w, [None, None], entries[::-1], a[::-1], b[::-1])
    with pytest.raises(ValueError, match="does not fit"):
        grouped_multi_lora(x, w, [None, None], [GroupEntry(0, 0, 9, 1.0)], a[:1], b[:1])
