"""A decoder block run in two parts: its attention half and its MLP half.

A pipeline cut may fall inside a block (`schedule.partition`): one stage runs the
block's attention, the next its MLP. Each half is "x + f(norm(x))" on the residual
stream, as the Llama-layout blocks (Llama, Mistral, Qwen2/3) compute them, so the
stream crosses such a cut as it crosses a block's end.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

ATTENTION, MLP = "attention", "mlp"
BOTH = (ATTENTION, MLP)
# a part's norm, then the module it feeds
PART_MODULES = {ATTENTION: ("input_layernorm", "self_attn"), MLP: ("post_attention_layernorm", "mlp")}
# blocks whose forward is "x + attn(norm1(x)) then h + mlp(norm2(h))" (transformers 5.x)
TWO_PART_BLOCKS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def part_norm(layer: nn.Module, part: str) -> nn.Module | None:
    """The norm in front of a part (None if the block lacks it)."""
    return getattr(layer, PART_MODULES[part][0], None)


def run_part(layer: nn.Module, part: str, hidden: Tensor, **layer_kwargs: Any) -> Tensor:
    """One half of the block's own forward: hidden + f(norm(hidden)). `layer_kwargs` go to
    the attention as the block passes them."""
    if part == ATTENTION:
        out, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **layer_kwargs)
    else:
        out = layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden + out


def drop_unheld(layer: nn.Module, held: tuple[str, ...], index: int) -> None:
    """Remove the parts of a block a stage does not run, so that their weights are
    neither read nor kept."""
    if held == BOTH:
        return
    if type(layer).__name__ not in TWO_PART_BLOCKS:
        raise ValueError(f"block {index} ({type(layer).__name__}) cannot be cut between its attention and MLP "
                         f"(known: {', '.join(TWO_PART_BLOCKS)}); cut the stages at whole blocks")
    for part in BOTH:
        if part not in held:
            for name in PART_MODULES[part]:
                delattr(layer, name)
