"""Tiny random models with a real tokenizer: the demo's base model and the tests'.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the demo
tasks' text, saved so that `AutoTokenizer.from_pretrained` loads it offline. The
weights are random and fixed by the seed, scaled like a trained model's rather than
like an initialisation (std 1/√fan_in, unit-norm-ish embeddings and head rows), so that
the frozen model's hidden states carry signal and LoRA adapters alone can learn tasks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>"]  # single tokens, as in Qwen's tokenizers
_OURS = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "generation_config.json", "chat_template.jinja"}


def _corpus() -> list[str]:
    """Text the tokenizer learns merges from: the shipped demo data plus plain English."""
    from mlora.data.templates import TEMPLATES

    lines = [
        "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - = , . ? !",
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    ]
    for t in TEMPLATES.values():  # so that template scaffolding becomes few tokens
        filled = t.prompt_with_input.format(instruction="x", input="y") + t.prompt_no_input.format(instruction="x")
        lines.extend([filled] * 20)
    data_dir = Path(__file__).resolve().parents[1] / "demo" / "data"
    for file in sorted(data_dir.glob("*.jsonl")) if data_dir.is_dir() else []:
        for line in file.read_text().splitlines():
            record = json.loads(line)
            if "messages" in record:
                lines.extend(m["content"] for m in record["messages"])
            else:
                lines.extend(str(record.get(k, "")) for k in ("instruction", "input", "output"))
    return lines


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with <s>, </s>, <pad>, <unk>, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS + CHAT_MARKERS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=CHAT_MARKERS,
    )


def _config(arch: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, tie: bool, tokenizer):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=512,
        tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)  # Qwen2 projections carry q/k/v bias
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden // heads, use_sliding_window=False)
    raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")


def write_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 172,
    vocab_size: int = 1024,
    tie_word_embeddings: bool = False,
    overwrite: bool = False,
    embed_std: float = 1.0,
    head_std: float = 0.25,
) -> Path:
    """Write config.json, model.safetensors and the tokenizer to out_dir; return it."""
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OURS)
        if foreign or not overwrite:
            raise ValueError(
                f"{out_dir}: not empty"
                + (f" (holds {', '.join(foreign[:3])})" if foreign else "; pass --overwrite to replace the tiny model there")
            )
        shutil.rmtree(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    config = _config(arch, len(tokenizer), hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                     tie_word_embeddings, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.fill_(1.0)
            elif param.dim() == 1:  # biases
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
            else:
                std = embed_std if "embed_tokens" in name else head_std if "lm_head" in name else param.shape[1] ** -0.5
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
