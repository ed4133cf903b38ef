"""Generation with a LoRA or a MeteoRA folder over a tiny model, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mlora.meteora import suite
from mlora.meteora.adapter import MeteoraAdapter, linear_shapes
from mlora.meteora.generate import LoraDelta, attach, generate, generate_chain, load_model, open_adapter
from mlora.model.peft_io import AdapterMeta, save_adapter

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from mlora.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("gen") / "llama", "llama")


def random_lora(folder: Path, model, seed: int) -> Path:
    shapes, _ = linear_shapes(model)
    gen = torch.Generator().manual_seed(seed)
    weights = {p: (torch.randn(4, d_in, generator=gen) * 0.3, torch.randn(d_out, 4, generator=gen) * 0.3)
               for p, (d_in, d_out) in shapes.items() if p.rsplit(".", 1)[1] in TARGETS}
    return save_adapter(folder, AdapterMeta(4, 8.0, 0.0, False, TARGETS, "tiny"), weights)


PROMPTS = [suite.composite_context([r], []) for r in suite.read_jsonl(suite.DATA_DIR / "mixed_test.jsonl")[:5]]


def test_lora_hooks_match_peft(tiny, tmp_path):
    from peft import PeftModel

    model, tok = load_model(tiny)
    folder = random_lora(tmp_path / "lora", model, 0)
    ids = torch.tensor([[tok.bos_token_id, *tok(PROMPTS[0], add_special_tokens=False)["input_ids"]]])
    handles = attach(model, open_adapter(folder, model))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    peft_model, _ = load_model(tiny)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(peft_model, str(folder)).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_batched_greedy_equals_one_at_a_time(tiny, tmp_path):
    model, tok = load_model(tiny)
    lora = LoraDelta.load(random_lora(tmp_path / "lora", model, 1), linear_shapes(model)[0])
    batched = generate(model, tok, PROMPTS, adapter=lora, max_new_tokens=6)
    single = [generate(model, tok, [p], adapter=lora, max_new_tokens=6)[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) >= 1 for g in batched)
    sampled = [generate(model, tok, PROMPTS, do_sample=True, temperature=1.5, top_p=0.9, seed=3, max_new_tokens=6) for _ in range(2)]
    assert [g.token_ids for g in sampled[0]] == [g.token_ids for g in sampled[1]]


def test_meteora_of_identical_adapters_is_that_lora(tiny, tmp_path):
    """Softmax weights sum to one, so K copies of one LoRA mix back into it, whatever the routing."""
    model, tok = load_model(tiny)
    lora_dir = random_lora(tmp_path / "lora", model, 2)
    copies = [shutil.copytree(lora_dir, tmp_path / f"copy{i}") for i in range(3)]
    shapes, layers = linear_shapes(model)
    meteora = MeteoraAdapter.from_adapters(copies, shapes, n_layers=layers, top_k=2, backend="loop")
    with torch.no_grad():
        for g in meteora.gates.values():
            g.normal_()
    meteora.save(tmp_path / "meteora")
    loaded = open_adapter(tmp_path / "meteora", model, backend="loop")
    assert isinstance(loaded, MeteoraAdapter)
    want = generate(model, tok, PROMPTS, adapter=open_adapter(lora_dir, model), max_new_tokens=6)
    got = generate(model, tok, PROMPTS, adapter=loaded, max_new_tokens=6, trace="last")
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    for g in got:
        assert len(g.adapters) == len(g.token_ids)
        assert all(len(a) == 2 and len(set(a)) == 2 and all(0 <= e < 3 for e in a) for a in g.adapters)
    majority = generate(model, tok, PROMPTS[:2], adapter=loaded, max_new_tokens=4, trace="majority")
    assert all(len(a) == 2 for g in majority for a in g.adapters)
    assert loaded.take_gate_logits() == [] and loaded.last_idx == {}


def test_composite_chain_answers_every_part(tiny, tmp_path):
    model, tok = load_model(tiny)
    records = suite.read_jsonl(suite.DATA_DIR / "composite_test.jsonl")[:3]
    answers, traces = generate_chain(model, tok, records, max_new_tokens=4)
    assert [len(a) for a in answers] == [3, 3, 3] and traces is None
    score = suite.score_composite(answers, records)
    assert set(score) == {"parts", "all"} and 0.0 <= score["all"] <= score["parts"] <= 1.0
