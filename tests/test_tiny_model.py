"""Tiny random models: real tokenizers that load offline, deterministic weights, each arch."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mlora.model.tiny import write_tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_each_arch_loads_offline_and_runs(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = write_tiny_model(tmp_path / arch, arch)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    text = "Reverse the word. lemon"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token_id is not None and tok.pad_token_id is not None and tok.bos_token_id is not None
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
    assert model.config.model_type == arch
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_same_seed_same_weights_and_no_clobbering(tmp_path):
    a = write_tiny_model(tmp_path / "a", "llama", seed=3)
    b = write_tiny_model(tmp_path / "b", "llama", seed=3)
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)
    with pytest.raises(ValueError, match="not empty"):
        write_tiny_model(a, "llama")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="notes.txt"):
        write_tiny_model(tmp_path / "mine", "llama", overwrite=True)
    assert write_tiny_model(a, "llama", seed=4, overwrite=True) == a and digest(a) != digest(b)
