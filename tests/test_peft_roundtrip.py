"""PEFT is the interchange format: what mlora writes loads in PEFT with the same logits."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from mlora.config import load_run_file
from mlora.model.lora_linear import BatchLayout, JobRows
from mlora.model.peft_io import load_adapter
from mlora.model.stage import load_stage
from mlora.runtime.trainer import train

from conftest import write_run


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trained_adapter_loads_in_peft_with_same_logits(tmp_path, tiny_models, datasets, arch, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models[arch]
    raw = {
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "defaults": {"template": "plain", "cutoff_len": 32, "max_steps": 3, "learning_rate": 2e-2},
        "jobs": [
            {"name": "all", "dataset": str(datasets["copy"]), "lora_r": 4, "target_modules": "all", "use_rslora": True},
            {"name": "qv", "dataset": str(datasets["reverse"]), "lora_r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        ],
        "run": {"output_dir": str(tmp_path / "out")},
    }
    result = train(load_run_file(write_run(tmp_path / "run.yaml", raw)), live=False)

    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    for job in ("all", "qv"):
        folder = result.adapters[job]
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(folder)
            ).eval()
        messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
        assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
        with torch.no_grad():
            peft_logits = peft_model(ids).logits

        stage = load_stage(model_dir)
        meta, weights = load_adapter(folder)
        from mlora.model.lora_linear import StageAdapter

        adapter = StageAdapter.create(job, meta.r, meta.alpha, 0.0, meta.use_rslora, stage.linear_shapes(meta.target_modules), 0)
        with torch.no_grad():
            for path, (a, b) in weights.items():
                adapter.a[path].copy_(a)
                adapter.b[path].copy_(b)
        stage.routing.adapters[job] = adapter
        layout = BatchLayout(2, 11, (JobRows(job, 0, 2, 11, 0),), training=False)
        with torch.no_grad():
            mlora_logits = stage.lm_head(stage(ids, layout))
        torch.testing.assert_close(mlora_logits, peft_logits, rtol=1e-5, atol=1e-5)
        assert (peft_logits - base_logits).abs().max() > 1e-4  # the adapter does something


def test_init_from_continues_a_peft_adapter(tmp_path, tiny_models, datasets):
    """A job may start from an adapter PEFT wrote; its weights are the starting point."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    start = tmp_path / "peft-start"
    peft_model.save_pretrained(str(start))
    _, start_weights = load_adapter(start)

    raw = {
        "model": {"path": str(model_dir), "device": "cpu"},
        "jobs": [{"name": "cont", "dataset": str(datasets["copy"]), "template": "plain", "lora_r": 4, "lora_alpha": 8,
                  "init_from": str(start), "max_steps": 1, "learning_rate": 1e-9, "optimizer": "sgd"}],
        "run": {"output_dir": str(tmp_path / "out")},
    }
    result = train(load_run_file(write_run(tmp_path / "run.yaml", raw)), live=False)
    _, end_weights = load_adapter(result.adapters["cont"])
    assert end_weights.keys() == start_weights.keys()
    for path in start_weights:
        torch.testing.assert_close(end_weights[path][0], start_weights[path][0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_a_fresh_adapter_has_peft_init_seeded_by_job_and_path(device):
    """A ~ U(±1/√d_in) (PEFT's Kaiming-uniform with a=√5), B zero, drawn on the adapter's
    device from (job seed, module path): the same path and seed give the same A."""
    from mlora.model.lora_linear import StageAdapter

    shapes = {"layers.0.self_attn.q_proj": (64, 64), "layers.0.mlp.down_proj": (176, 64),
              "layers.1.self_attn.q_proj": (64, 64)}
    one = StageAdapter.create("j", 8, 16, 0.0, False, shapes, seed=3, device=device)
    again = StageAdapter.create("j", 8, 16, 0.0, False, {k: shapes[k] for k in list(shapes)[:2]}, seed=3, device=device)
    other = StageAdapter.create("j", 8, 16, 0.0, False, shapes, seed=4, device=device)
    for path, (d_in, d_out) in shapes.items():
        a, b = one.a[path], one.b[path]
        assert a.device.type == device and a.dtype == torch.float32 and tuple(a.shape) == (8, d_in)
        assert tuple(b.shape) == (d_out, 8) and not b.any()
        bound = 1 / d_in**0.5
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound  # uniform over the whole range
        assert abs(a.mean().item()) < 0.1 * bound
        assert not torch.equal(a, other.a[path])
        if path in again.a:  # independent of which other modules the stage holds
            assert torch.equal(a, again.a[path])
    assert not torch.equal(one.a["layers.0.self_attn.q_proj"], one.a["layers.1.self_attn.q_proj"])
