"""MeteoraAdapter: loading K PEFT folders, routing + applying, recording, save/load, checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlora.meteora.adapter import MeteoraAdapter, MeteoraError, linear_shapes
from mlora.meteora.gate import aux_loss
from mlora.model.lora_linear import lora_scale
from mlora.model.peft_io import AdapterMeta, save_adapter

D_IN, D_OUT, LAYERS = 24, 16, 2


def shapes_of(d_in: int = D_IN, d_out: int = D_OUT, layers: int = LAYERS) -> dict[str, tuple[int, int]]:
    """A toy base: q_proj and v_proj per layer (the stage's positions)."""
    return {f"model.layers.{i}.self_attn.{m}": (d_in, d_out) for i in range(layers) for m in ("q_proj", "v_proj")}


def write_lora(folder: Path, seed: int, r: int, alpha: float, targets=("q_proj", "v_proj"), d_in=D_IN, d_out=D_OUT, layers=LAYERS, rslora=False) -> Path:
    gen = torch.Generator().manual_seed(seed)
    weights = {
        f"model.layers.{i}.self_attn.{m}": (torch.randn(r, d_in, generator=gen) / d_in**0.5, torch.randn(d_out, r, generator=gen) / r**0.5)
        for i in range(layers) for m in targets
    }
    return save_adapter(folder, AdapterMeta(r, alpha, 0.0, rslora, tuple(targets), "tiny"), weights)


@pytest.fixture()
def loras(tmp_path: Path) -> list[Path]:
    return [write_lora(tmp_path / "a", 1, 4, 8.0), write_lora(tmp_path / "b", 2, 6, 6.0, rslora=True), write_lora(tmp_path / "c", 3, 4, 16.0)]


def expected_delta(adapter: MeteoraAdapter, path: str, x: torch.Tensor, loras: list[Path]) -> torch.Tensor:
    """The definition, per token, from the files and the gate."""
    from mlora.model.peft_io import load_adapter

    loaded = [load_adapter(f) for f in loras]
    logits = x @ adapter.gates[path].detach().t()
    top, idx = logits.topk(adapter.top_k, dim=-1)
    w = torch.softmax(top / adapter.temperature, dim=-1)
    out = torch.zeros(x.shape[0], D_OUT)
    for t in range(x.shape[0]):
        for j in range(adapter.top_k):
            meta, ab = loaded[int(idx[t, j])]
            a, b = ab[path]
            out[t] += w[t, j] * lora_scale(meta.r, meta.alpha, meta.use_rslora) * (b @ (a @ x[t]))
    return out


def test_delta_routes_and_records(loras):
    adapter = MeteoraAdapter.from_adapters(loras, shapes_of(), n_layers=LAYERS, top_k=2, temperature=0.8)
    assert adapter.n_adapters == 3 and len(adapter.paths) == 4
    with torch.no_grad():
        for g in adapter.gates.values():
            g.normal_(0.0, 1.0)  # a trained-looking gate: routes differ per token
    x = torch.randn(11, D_IN, generator=torch.Generator().manual_seed(0))
    path = adapter.paths[1]
    got = adapter.delta(path, x)
    torch.testing.assert_close(got, expected_delta(adapter, path, x, loras), rtol=1e-5, atol=1e-6)
    adapter.delta(adapter.paths[0], x)
    logits = adapter.take_gate_logits()
    assert [t.shape for t in logits] == [(11, 3), (11, 3)] and adapter.take_gate_logits() == []
    aux_loss(logits, torch.randint(0, 3, (11,))).backward()
    assert adapter.gates[path].grad is not None and adapter.gates[path].grad.abs().sum() > 0


def test_parameters_gates_only_unless_train_loras(loras):
    frozen = MeteoraAdapter.from_adapters(loras, shapes_of())
    assert len(frozen.parameters()) == 4 and all(p.dtype == torch.float32 and p.shape[0] == 3 for p in frozen.parameters())
    assert not any(a.requires_grad for a in frozen.lora_a[frozen.paths[0]])
    trained = MeteoraAdapter.from_adapters(loras, shapes_of(), train_loras=True)
    assert len(trained.parameters()) == 4 + 4 * 3 * 2
    x = torch.randn(5, D_IN)
    trained.delta(trained.paths[0], x).square().sum().backward()
    assert any(a.grad is not None and a.grad.abs().sum() > 0 for a in trained.lora_a[trained.paths[0]])


def test_gate_init_is_per_path_and_seeded(loras):
    one = MeteoraAdapter.from_adapters(loras, shapes_of(), seed=5)
    two = MeteoraAdapter.from_adapters(loras, {p: s for p, s in shapes_of().items() if "layers.1" in p}, seed=5)
    path = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(one.gates[path], two.gates[path])  # same gate whatever the stage holds
    assert 0.005 < float(one.gates[path].detach().std()) < 0.02
    assert float(MeteoraAdapter.from_adapters(loras, shapes_of(), gate_init="zeros").gates[path].detach().abs().sum()) == 0


def test_save_load_roundtrip(loras, tmp_path):
    adapter = MeteoraAdapter.from_adapters(loras, shapes_of(), names=["x", "y", "z"], top_k=1, temperature=0.5, base_model="tiny")
    with torch.no_grad():
        for g in adapter.gates.values():
            g.normal_()
    adapter.save(tmp_path / "m")
    with pytest.raises(MeteoraError, match="already exists"):
        adapter.save(tmp_path / "m")
    back = MeteoraAdapter.load(tmp_path / "m", shapes_of(), n_layers=LAYERS)
    assert (back.top_k, back.temperature, [n for n, _ in back.config.adapters]) == (1, 0.5, ["x", "y", "z"])
    assert back.config.target_modules == ("q_proj", "v_proj") and back.config.base_model == "tiny"
    x = torch.randn(7, D_IN)
    for path in adapter.paths:
        torch.testing.assert_close(back.gates[path], adapter.gates[path])
        torch.testing.assert_close(back.delta(path, x), adapter.delta(path, x))


def test_train_loras_saves_its_adapters(loras, tmp_path):
    adapter = MeteoraAdapter.from_adapters(loras, shapes_of(), train_loras=True)
    with torch.no_grad():
        adapter.lora_b[adapter.paths[0]][2].add_(1.0)
    adapter.save(tmp_path / "m")
    assert (tmp_path / "m" / "adapters" / "c" / "adapter_model.safetensors").is_file()
    back = MeteoraAdapter.load(tmp_path / "m", shapes_of())
    assert back.config.train_loras and back.parameters()[-1].requires_grad
    torch.testing.assert_close(back.lora_b[adapter.paths[0]][2], adapter.lora_b[adapter.paths[0]][2].detach())


def test_disagreeing_or_unfit_adapters_are_refused(loras, tmp_path):
    other_targets = write_lora(tmp_path / "qk", 4, 4, 8.0, targets=("q_proj", "k_proj"))
    with pytest.raises(MeteoraError, match=f"{other_targets}.*targets"):
        MeteoraAdapter.from_adapters([*loras, other_targets], shapes_of())
    wide = write_lora(tmp_path / "wide", 5, 4, 8.0, d_in=32)
    with pytest.raises(MeteoraError, match=f"{wide}.*base linear is 24→16"):
        MeteoraAdapter.from_adapters([loras[0], wide], shapes_of())
    deep = write_lora(tmp_path / "deep", 6, 4, 8.0, layers=3)
    deep_too = write_lora(tmp_path / "deep2", 7, 4, 8.0, layers=3)
    with pytest.raises(MeteoraError, match=f"{deep}.*model.layers.2.*2 layers"):
        MeteoraAdapter.from_adapters([deep, deep_too], shapes_of(), n_layers=LAYERS)
    with pytest.raises(MeteoraError, match="which the base model does not have"):
        MeteoraAdapter.from_adapters(loras, {p: s for p, s in shapes_of().items() if "v_proj" not in p})
    with pytest.raises(MeteoraError, match="top_k=4"):
        MeteoraAdapter.from_adapters(loras, shapes_of(), top_k=4)
    with pytest.raises(MeteoraError, match="names must differ"):
        MeteoraAdapter.from_adapters(loras, shapes_of(), names=["a", "a", "b"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meteora_config.json").write_text("{not json")
    with pytest.raises(MeteoraError, match="broken.*meteora_config.json"):
        MeteoraAdapter.load(tmp_path / "broken", shapes_of())


def test_linear_shapes_of_a_transformers_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    shapes, layers = linear_shapes(LlamaForCausalLM(config))
    assert layers == 2 and len(shapes) == 14
    assert shapes["model.layers.1.self_attn.k_proj"] == (16, 8) and shapes["model.layers.0.mlp.down_proj"] == (40, 16)
