"""Prompt templates: a record becomes pieces of text, each marked trained or not.

Only the response (Alpaca `output`, chat `assistant` turns) is trained; the prompt is
context. Templates are plain data so that `mlora.config` can list them without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Piece:
    text: str
    train: bool


@dataclass(frozen=True)
class Template:
    """Alpaca prompt with and without input; chat turn wrappers per role."""

    prompt_with_input: str
    prompt_no_input: str
    turn: dict[str, tuple[str, str]]  # role → (prefix, suffix); the assistant suffix is trained
    generation_prefix: str  # what starts the assistant's reply in a chat prompt


_CHATML = {r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")}

TEMPLATES: dict[str, Template] = {
    "alpaca": Template(
        prompt_with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        prompt_no_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
        turn={"system": ("", "\n\n"), "user": ("### Instruction:\n", "\n\n"), "assistant": ("### Response:\n", "\n\n")},
        generation_prefix="### Response:\n",
    ),
    "plain": Template(
        prompt_with_input="{instruction}\n{input}\n",
        prompt_no_input="{instruction}\n",
        turn={"system": ("", "\n"), "user": ("", "\n"), "assistant": ("", "\n")},
        generation_prefix="",
    ),
    "chatml": Template(
        prompt_with_input="<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        prompt_no_input="<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
        turn=_CHATML,
        generation_prefix="<|im_start|>assistant\n",
    ),
    "llama3": Template(
        prompt_with_input=(
            "<|start_header_id|>user<|end_header_id|>\n\n{instruction}\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        prompt_no_input=(
            "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        turn={r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>") for r in ("system", "user", "assistant")},
        generation_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: use one of {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def prompt_text(record: dict[str, Any], template: str) -> str:
    """The prompt alone (what a model is given at generation time)."""
    t = get_template(template)
    if "messages" in record:
        pieces = render({"messages": [m for m in record["messages"] if m["role"] != "assistant"]}, template)
        return "".join(p.text for p in pieces) + t.generation_prefix
    if record.get("input"):
        return t.prompt_with_input.format(instruction=record["instruction"], input=record["input"])
    return t.prompt_no_input.format(instruction=record["instruction"])


def render(record: dict[str, Any], template: str) -> list[Piece]:
    """Pieces of the templated record; the trained ones are the responses.

    The end-of-sequence token is added by tokenisation after the last trained piece.
    """
    t = get_template(template)
    if "messages" not in record:
        return [Piece(prompt_text(record, template), False), Piece(record["output"], True)]
    pieces: list[Piece] = []
    for message in record["messages"]:
        prefix, suffix = t.turn[message["role"]]
        if message["role"] == "assistant":
            pieces.append(Piece(prefix, False))
            pieces.append(Piece(message["content"] + suffix, True))
        else:
            pieces.append(Piece(prefix + message["content"] + suffix, False))
    return pieces
