"""Tiny random models with a real tokenizer: the demo's base model and the tests'.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on the demo
tasks' text (a built-in English text when that data is absent), saved so that
`AutoTokenizer.from_pretrained` loads it offline. The weights are random and fixed by
the seed, scaled like a trained model's rather than like an initialisation (std
1/√fan_in, unit-norm-ish embeddings and head rows): with std 0.02 everywhere the
frozen model's hidden states carry almost no signal and LoRA adapters alone cannot
learn the demo tasks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>"]  # single tokens, as in Qwen's tokenizers
MARKER = "mlora_tiny.json"  # what the folder was written with; marks it as ours to replace
_OURS = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "generation_config.json", "chat_template.jinja", MARKER}
DEMO_DATA = Path(__file__).resolve().parents[1] / "demo" / "data"

# Merges for ordinary text when the demo data is not there (e.g. a stripped install).
_FALLBACK_TEXT = """\
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Reverse the word. Uppercase the text. Add the numbers. Sort the letters. What is the capital of France?
The cat sat on the mat. A dog ran in the park. The sun is hot and the moon is cold.
She reads a book, he writes a letter; they walk to the river and back home again.
One two three four five six seven eight nine ten eleven twelve twenty thirty hundred.
12 + 34 = 46. 7 * 8 = 56. 100 - 1 = 99. 3.14 2,048 0.5 1e-3 (x) [y] {z} "a" 'b' : ; / \\ | _ # @ % & ~
Yes. No. Maybe? Hello, world! apple banana cherry lemon orange tree bird fish house river stone cloud
"""


def _corpus(data_dir: Path) -> list[str]:
    """Text the tokenizer learns merges from: template scaffolding plus the demo data."""
    from mlora.data.templates import TEMPLATES

    lines = [
        "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - = , . ? !",
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    ]
    for t in TEMPLATES.values():  # so that template scaffolding becomes few tokens
        filled = t.prompt_with_input.format(instruction="x", input="y") + t.prompt_no_input.format(instruction="x")
        lines.extend([filled] * 20)
    files = sorted(data_dir.glob("*.jsonl")) if data_dir.is_dir() else []
    if not files:
        return lines + [line for line in _FALLBACK_TEXT.splitlines() for _ in range(5)]
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "messages" in record:
                lines.extend(m["content"] for m in record["messages"])
            else:
                lines.extend(str(record.get(k, "")) for k in ("instruction", "input", "output"))
    return lines


def build_tokenizer(vocab_size: int, data_dir: Path = DEMO_DATA) -> Any:
    """A byte-level BPE tokenizer with <s>, </s>, <pad>, <unk>, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS + CHAT_MARKERS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(Path(data_dir)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=CHAT_MARKERS,
    )


def _config(arch: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, tie: bool, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=512,
        tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)  # Qwen2 projections carry q/k/v bias
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden // heads, use_sliding_window=False)  # q/k RMSNorm per head
    raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")


def _clear_for_writing(out_dir: Path, overwrite: bool) -> None:
    """Make room for the model; never delete a file this module did not write.

    A folder holding only an earlier tiny model (it has our marker) is replaced. Anything
    else that is not empty is refused unless `overwrite`; even then other files stay.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a directory")
    present = {p.name for p in out_dir.iterdir()}
    foreign = sorted(present - _OURS)
    ours_only = MARKER in present and not foreign
    if present and not ours_only and not overwrite:
        held = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "") if foreign else "files without " + MARKER
        raise ValueError(
            f"{out_dir}: not empty and not a tiny model written by mlora (holds {held}); "
            "pass overwrite=True (--overwrite) to write the tiny model there anyway"
        )
    for name in present & _OURS:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


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
    """Write config.json, model.safetensors, the tokenizer and MARKER to out_dir; return it.

    `vocab_size` is the BPE target; the config takes `len(tokenizer)`. Same arguments,
    same bytes: the weights come from a generator seeded with `seed`.
    """
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")
    out_dir = Path(out_dir)
    _clear_for_writing(out_dir, overwrite)
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
    settings = dict(arch=arch, seed=seed, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
                    tie_word_embeddings=tie_word_embeddings, embed_std=embed_std, head_std=head_std)
    (out_dir / MARKER).write_text(json.dumps({"written_by": "mlora.model.tiny", **settings}, indent=1) + "\n")
    return out_dir
