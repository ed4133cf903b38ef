"""Where things live in a Llama-layout causal LM (Llama 2/3, Mistral, Qwen2/Qwen3).

One table of names, so that stage loading, LoRA insertion and PEFT key names agree.
"""

from __future__ import annotations

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

EMBED = "model.embed_tokens"
NORM = "model.norm"
HEAD = "lm_head"

# target module name → its path inside a decoder layer
TARGET_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


def layer_prefix(index: int) -> str:
    """The state-dict prefix of decoder block `index`."""
    return f"model.layers.{index}"


def linear_path(layer: int, target: str) -> str:
    """Full module path of a target linear, as PEFT names it under `base_model.model.`."""
    return f"{layer_prefix(layer)}.{TARGET_PATHS[target]}"


def parse_linear_path(path: str) -> tuple[int, str]:
    """Inverse of linear_path: 'model.layers.3.mlp.up_proj' → (3, 'up_proj')."""
    parts = path.split(".")
    if len(parts) != 5 or parts[:2] != ["model", "layers"] or parts[4] not in TARGET_PATHS:
        raise ValueError(f"{path!r} is not a decoder-block target linear")
    return int(parts[2]), parts[4]
