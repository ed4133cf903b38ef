"""Projections sharing one input (q, k, v; gate, up) as one Triton multi-LoRA call.

The shared call must give what calling `multi_lora_linear` once per member gives: every
member's output, dx summed over the members, every dA and dB. On the CPU the kernels run
in Triton's interpreter at small odd shapes (uncovered tokens, an empty segment, a slot
without tokens, members of different widths, ranks that pad to the rank block, a bias);
with MLORA_TRITON_COMPILED=1 on a CUDA device they run compiled, bf16 at a 1.1B layer's
shapes against the fp32 reference (relative error < 1e-2). The model-side picker
(`project_shared`) is checked to take the shared call exactly where it applies.
"""

from __future__ import annotations

import os

COMPILED = os.environ.get("MLORA_TRITON_COMPILED") == "1"
if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton")

from conftest import rel  # noqa: E402
from mlora.model.lora_linear import (  # noqa: E402
    BatchLayout, JobRows, MultiLoraLinear, Routing, StageAdapter, project_shared,
)
from mlora.ops import Segment, multi_lora_linear  # noqa: E402
from mlora.ops.shared_input import fits, shared_input_lora  # noqa: E402

interpreted = pytest.mark.skipif(COMPILED, reason="CPU cases need Triton's interpreter")
compiled = pytest.mark.skipif(not (COMPILED and torch.cuda.is_available()),
                              reason="compiled cases need MLORA_TRITON_COMPILED=1 and a CUDA device")


def _inputs(tokens: int, d_in: int, d_outs: list[int], ranks: list[int], bias: bool, dtype: torch.dtype,
            device: str, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    x = rnd(tokens, d_in).to(dtype)
    weights = [rnd(d, d_in, scale=d_in ** -0.5).to(dtype) for d in d_outs]
    biases = [rnd(d).to(dtype) if bias and m != 1 else None for m, d in enumerate(d_outs)]
    lora_a = [[rnd(r, d_in, scale=d_in ** -0.5).requires_grad_() for r in ranks] for _ in d_outs]
    lora_b = [[rnd(d, r, scale=0.1).requires_grad_() for r in ranks] for d in d_outs]
    scales = [2.0 - 0.25 * j for j in range(len(ranks))]
    dys = [rnd(tokens, d).to(dtype) for d in d_outs]
    return x, weights, biases, lora_a, lora_b, scales, dys


def _run(shared: bool, x, weights, biases, lora_a, lora_b, scales, segments, dys,  # type: ignore[no-untyped-def]
         backend: str = "loop"):
    x = x.detach().clone().requires_grad_()
    for t in (*sum(lora_a, []), *sum(lora_b, [])):
        t.grad = None
    if shared:
        ys = shared_input_lora(x, weights, biases, lora_a, lora_b, scales, segments)
    else:
        ys = [multi_lora_linear(x, w, b, a, bb, scales, segments, backend=backend)
              for w, b, a, bb in zip(weights, biases, lora_a, lora_b)]
    torch.autograd.backward(list(ys), list(dys))
    grads = [t.grad.clone() for t in (*sum(lora_a, []), *sum(lora_b, []))]
    return [y.detach() for y in ys], x.grad, grads


CPU_CASES = {
    # q, k, v of a GQA block (k, v narrower), rank 16, a gap of uncovered tokens, a bias on q and v
    "qkv": dict(tokens=45, d_in=24, d_outs=[24, 8, 8], rank=16, lengths=[11, -3, 20, 0, 11], bias=True),
    # gate and up, rank 4 (padded to the rank block 16 in the stack), a slot with no tokens
    "gate_up": dict(tokens=37, d_in=16, d_outs=[40, 40], rank=4, lengths=[17, 20, 0], bias=False),
    # rank 12 (padded to 16 in the slots and the stack), one slot
    "one_slot": dict(tokens=29, d_in=32, d_outs=[16, 16, 16], rank=12, lengths=[29], bias=False),
    # slots of ranks 4, 16 and 8: each padded to 16 in the stack, the slots of A_cat at 8, 16 and 8 rows
    "mixed": dict(tokens=50, d_in=24, d_outs=[24, 8, 8], rank=(4, 16, 8), lengths=[9, 25, -4, 12], bias=False),
}


def _segments(lengths: list[int]) -> tuple[list[Segment], int]:
    segs, at, slot = [], 0, 0
    for length in lengths:
        if length < 0:
            at -= length
            continue
        segs.append(Segment(slot, at, at + length))
        at, slot = at + length, slot + 1
    return segs, slot


@interpreted
@pytest.mark.parametrize("name", sorted(CPU_CASES))
def test_the_shared_call_gives_what_the_members_give_one_by_one(name: str) -> None:
    case = CPU_CASES[name]
    segments, slots = _segments(case["lengths"])
    ranks = list(case["rank"]) if isinstance(case["rank"], tuple) else [case["rank"]] * slots
    x, weights, biases, lora_a, lora_b, scales, dys = _inputs(
        case["tokens"], case["d_in"], case["d_outs"], ranks, case["bias"], torch.float32, "cpu", seed=3)
    ys, dx, grads = _run(True, x, weights, biases, lora_a, lora_b, scales, segments, dys)
    ys_ref, dx_ref, grads_ref = _run(False, x, weights, biases, lora_a, lora_b, scales, segments, dys)
    for y, y_ref in zip(ys, ys_ref):
        assert rel(y, y_ref) < 1e-5
    assert rel(dx, dx_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        if g_ref.abs().max() == 0:  # the slot without tokens
            assert torch.equal(g, g_ref)
        else:
            assert rel(g, g_ref) < 1e-5


def test_fits_only_one_small_rank_for_every_slot() -> None:
    assert fits([16, 16, 16], 3) and fits([4], 2) and fits([8, 8], 4) and fits([16, 4, 8], 3)
    assert not fits([32, 32], 2) and not fits([16, 20], 2)  # g by a shrink of dy above rank 16
    assert not fits([16], 5)  # 80 stacked ranks: past the measured shapes
    assert not fits([16], 1)  # nothing to share
    x = torch.randn(8, 16)
    w = [torch.randn(16, 16)] * 2
    with pytest.raises(ValueError, match="cannot share one call"):
        shared_input_lora(x, w, [None, None], [[torch.randn(16, 16)], [torch.randn(8, 16)]],
                          [[torch.randn(16, 16)], [torch.randn(16, 8)]], [1.0], [Segment(0, 0, 8)])
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(ValueError, match="adds g by atomics"):
            shared_input_lora(x, w, [None, None], [[torch.randn(16, 16)]] * 2, [[torch.randn(16, 16)]] * 2, [1.0],
                              [Segment(0, 0, 8)])
    finally:
        torch.use_deterministic_algorithms(False)


def _stage_modules(d_in: int, d_outs: list[int], jobs: dict[str, tuple[int, float, list[str]]], tokens_per_job: int,
                   backend: str = "triton") -> tuple[list[MultiLoraLinear], Routing]:
    routing = Routing(backend=backend)
    paths = [f"layer.p{m}" for m in range(len(d_outs))]
    modules = [MultiLoraLinear(nn.Linear(d_in, d, bias=False), path, m, routing)
               for m, (path, d) in enumerate(zip(paths, d_outs))]
    rows = []
    for j, (job, (rank, dropout, targets)) in enumerate(jobs.items()):
        shapes = {p: (d_in, d) for p, d in zip(paths, d_outs) if p in targets}
        adapter = StageAdapter.create(job, rank, 2 * rank, dropout, False, shapes, seed=j)
        for b in adapter.b.values():
            nn.init.normal_(b, std=0.1)
        routing.adapters[job] = adapter
        rows.append(JobRows(job, j, j + 1, tokens_per_job, dropout_seed=j))
    routing.layout = BatchLayout(rows=len(jobs), seq_len=tokens_per_job, jobs=tuple(rows))
    return modules, routing


@interpreted
def test_project_shared_takes_the_shared_call_only_where_it_applies(monkeypatch) -> None:
    import mlora.ops.shared_input as shared_mod

    calls = []
    real = shared_mod.shared_input_lora

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(shared_mod, "shared_input_lora", counting)
    all_paths = ["layer.p0", "layer.p1", "layer.p2"]

    def check(jobs: dict, expect_shared: bool, backend: str = "triton") -> None:
        calls.clear()
        modules, routing = _stage_modules(16, [16, 8, 8], jobs, tokens_per_job=9, backend=backend)
        x = torch.randn(len(jobs), 9, 16)
        got = project_shared(x, modules)
        assert bool(calls) == expect_shared
        routing.backend = "loop"
        for y, m in zip(got, modules):
            assert y.shape == (len(jobs), 9, m.out_features)
            assert rel(y, m(x)) < 1e-5

    check({"a": (16, 0.0, all_paths), "b": (16, 0.0, all_paths)}, True)
    check({"a": (8, 0.0, all_paths), "b": (8, 0.0, []), "c": (8, 0.0, all_paths)}, True)  # b adapts none: base rows
    check({"a": (16, 0.0, all_paths), "b": (16, 0.0, all_paths[:2])}, False)  # b adapts two of three
    check({"a": (16, 0.0, all_paths), "b": (16, 0.1, all_paths)}, False)  # dropout draws a mask per member
    check({"a": (16, 0.0, all_paths), "b": (8, 0.0, all_paths)}, True)  # mixed ranks, padded in the stack
    check({"a": (16, 0.0, all_paths), "b": (32, 0.0, all_paths)}, False)  # rank block 32: g by a shrink
    check({"a": (16, 0.0, all_paths)}, False, backend="auto")  # eager steps stay dense
    monkeypatch.setenv("MLORA_SHARED_INPUT", "0")
    check({"a": (16, 0.0, all_paths)}, False)
    monkeypatch.delenv("MLORA_SHARED_INPUT")
    modules, _ = _stage_modules(16, [16, 8], {"a": (16, 0.0, ["layer.p0", "layer.p1"])}, tokens_per_job=9)
    modules[1].register_forward_hook(lambda *args: None)  # a hook on a member would be skipped
    calls.clear()
    project_shared(torch.randn(1, 9, 16), modules)
    assert not calls


@compiled
def test_compiled_bf16_at_a_1b_layers_shapes() -> None:
    """q, k, v (GQA: 2048 -> 2048, 256, 256) and gate, up (2048 -> 5632), 4 jobs of 2,048 tokens."""
    lengths = [2048, 2048, 2048, 2048]
    segments, slots = _segments(lengths)
    for d_outs in ([2048, 256, 256], [5632, 5632]):
        x, weights, biases, lora_a, lora_b, scales, dys = _inputs(8192, 2048, d_outs, [16] * slots, False,
                                                                   torch.bfloat16, "cuda", seed=5)
        ys, dx, grads = _run(True, x, weights, biases, lora_a, lora_b, scales, segments, dys)
        ref = _run(False, x.float(), [w.float() for w in weights], biases, lora_a, lora_b, scales, segments,
                   [d.float() for d in dys], backend="torch")
        for y, y_ref in zip(ys, ref[0]):
            assert rel(y, y_ref) < 1e-2
        assert rel(dx, ref[1]) < 1e-2
        for g, g_ref in zip(grads, ref[2]):
            assert rel(g, g_ref) < 1e-2


@compiled
def test_a_fused_stage_step_gives_the_same_gradients_shared_or_not(monkeypatch) -> None:
    """A tiny GQA Llama stage on CUDA (fused attention and MLP, fp32 Triton path): every
    block's q, k, v and gate, up go through the shared call, and every adapter gradient
    and the input's equal those of the projections called one by one."""
    import mlora.ops.shared_input as shared_mod
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlora.config.schema import ALL_TARGET_MODULES
    from mlora.model.stage import stage_from_model

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    stage = stage_from_model(LlamaForCausalLM(config).to("cuda"))
    stage.routing.backend = "triton"
    adapters = []
    for j, job in enumerate(("a", "b")):
        adapter = StageAdapter.create(job, 16, 32, 0.0, False, stage.linear_shapes(ALL_TARGET_MODULES), seed=j,
                                      device="cuda")
        for b in adapter.b.values():
            nn.init.normal_(b, std=0.05)
        stage.routing.adapters[job] = adapter
        adapters.append(adapter)
    layout = BatchLayout(rows=4, seq_len=64, jobs=(JobRows("a", 0, 1, 64, 0), JobRows("b", 1, 4, 64, 1)))
    ids = torch.randint(0, 512, (4, 64), device="cuda")
    calls = []
    real = shared_mod.shared_input_lora
    monkeypatch.setattr(shared_mod, "shared_input_lora", lambda *a, **k: calls.append(1) or real(*a, **k))

    def grads(shared: str) -> list[torch.Tensor]:
        monkeypatch.setenv("MLORA_SHARED_INPUT", shared)
        params = [p for adapter in adapters for p in adapter.parameters()]
        for p in params:
            p.grad = None
        stage(ids, layout).float().square().mean().backward()
        return [p.grad.clone() for p in params]

    shared = grads("1")
    assert len(calls) == 2 * config.num_hidden_layers  # q, k, v and gate, up in every block
    calls.clear()
    alone = grads("0")
    assert not calls
    for g, g_ref in zip(shared, alone):
        assert g_ref.abs().max() > 0
        assert rel(g, g_ref) < 1e-4


@interpreted
def test_a_strided_input_gives_what_a_contiguous_one_gives() -> None:
    segments, slots = _segments([20, 13])
    x, weights, biases, lora_a, lora_b, scales, _ = _inputs(33, 16, [16, 8], [8, 8], False, torch.float32, "cpu",
                                                           seed=4)
    strided = x.t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    for y, y_ref in zip(shared_input_lora(strided, weights, biases, lora_a, lora_b, scales, segments),
                        shared_input_lora(x, weights, biases, lora_a, lora_b, scales, segments)):
        assert torch.equal(y, y_ref)
