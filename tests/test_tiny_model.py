"""Tiny random models: real tokenizers that load offline, deterministic weights, each arch."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mlora.model.tiny import MARKER, build_tokenizer, write_tiny_model


def digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_each_arch_loads_offline_and_runs(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = write_tiny_model(tmp_path / arch, arch)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    for text in ["Reverse the word. lemon", "Add the numbers.\n43+48\n91", "Zürich, 3.14 — ok?"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert model.config.dtype == torch.float32 and model.config.max_position_embeddings == 512
    ids = tok("Reverse the word. lemon", add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
    assert model.config.model_type == arch
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 16 and attn.q_proj.out_features == 64  # GQA: 2 kv heads of 4
    has_bias = [p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert has_bias == [arch == "qwen2"] * 3
    assert hasattr(attn, "q_norm") == hasattr(attn, "k_norm") == (arch == "qwen3")


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = write_tiny_model(tmp_path / "a", "qwen2", seed=3)
    b = write_tiny_model(tmp_path / "b", "qwen2", seed=3)
    c = write_tiny_model(tmp_path / "c", "qwen2", seed=4)
    assert digest(a) == digest(b) != digest(c)
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(write_tiny_model(tmp_path / "t", tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_replaces_its_own_model_but_never_foreign_files(tmp_path):
    a = write_tiny_model(tmp_path / "a", "llama", seed=3)
    before = digest(a)
    assert write_tiny_model(a, "llama", seed=4) == a and digest(a) != before  # an earlier tiny model: replaced
    (a / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"a: not empty .*notes\.txt.*overwrite=True"):
        write_tiny_model(a, "llama")
    assert write_tiny_model(a, "llama", seed=3, overwrite=True) == a and digest(a) == before
    assert (a / "notes.txt").read_text() == "keep"

    unmarked = tmp_path / "real"  # looks like a model folder, but mlora did not write it
    unmarked.mkdir()
    (unmarked / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"real: not empty .*without {MARKER}"):
        write_tiny_model(unmarked)
    with pytest.raises(ValueError, match="unknown arch 'gpt2'"):
        write_tiny_model(tmp_path / "x", "gpt2")
    assert not (tmp_path / "x").exists()


def test_tokenizer_without_demo_data(tmp_path):
    tok = build_tokenizer(512, data_dir=tmp_path / "absent")
    text = "Uppercase the text.\nriver stone\nRIVER STONE"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok) == 512 and tok.eos_token_id is not None
