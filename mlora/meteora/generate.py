"""Batched generation over a Hugging Face model folder with a LoRA or a MeteoRA folder.

The base is a plain transformers causal LM (KV cache, offline, from a local folder);
the adapter's delta is added to each adapted linear's output by a forward hook, so one
mechanism serves a PEFT LoRA folder (Σ = s·(x·Aᵀ)·Bᵀ) and a MeteoRA folder (the gate's
top-k mixture). With MeteoRA, `trace` records which adapters chose each generated
token: the top-k of one linear (the last layer's q_proj, or the last adapted linear
of the last layer) or the k adapters most often in the top-k over every linear.
"""

from __future__ import annotations

import inspect

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mlora.meteora.adapter import CONFIG_FILE as METEORA_CONFIG
from mlora.meteora.adapter import MeteoraAdapter, linear_shapes
from mlora.model.layout import parse_linear_path
from mlora.model.lora_linear import lora_scale
from mlora.model.peft_io import CONFIG_FILE as PEFT_CONFIG
from mlora.model.peft_io import AdapterError, load_adapter

TRACES = ("last", "majority")


class DeltaSource(Protocol):
    """Anything that adds a delta to named linears: a LoRA or a MeteoRA adapter."""

    @property
    def paths(self) -> list[str]: ...

    def delta(self, path: str, x_flat: Tensor) -> Tensor: ...


class LoraDelta:
    """A PEFT LoRA folder as a delta source: s · (x·Aᵀ)·Bᵀ per linear."""

    def __init__(self, weights: dict[str, tuple[Tensor, Tensor]], scale: float) -> None:
        self.weights, self.scale = weights, scale

    @classmethod
    def load(cls, folder: str | Path, shapes: dict[str, tuple[int, int]], device: str | torch.device = "cpu") -> "LoraDelta":
        meta, weights = load_adapter(Path(folder))
        for path, (a, b) in weights.items():
            if path not in shapes:
                raise AdapterError(f"{folder}: adapts {path}, which the base model does not have")
            if (a.shape[1], b.shape[0]) != shapes[path]:
                raise AdapterError(f"{folder}: {path} is {a.shape[1]}→{b.shape[0]}, the base linear {shapes[path][0]}→{shapes[path][1]}")
        moved = {p: (a.to(device), b.to(device)) for p, (a, b) in weights.items()}
        return cls(moved, lora_scale(meta.r, meta.alpha, meta.use_rslora))

    @property
    def paths(self) -> list[str]:
        return sorted(self.weights)

    def delta(self, path: str, x_flat: Tensor) -> Tensor:
        a, b = self.weights[path]
        return self.scale * ((x_flat @ a.to(x_flat.dtype).t()) @ b.to(x_flat.dtype).t())


def attach(model: nn.Module, source: DeltaSource) -> list[RemovableHandle]:
    """Add source.delta(path, x) to the output of every linear it adapts; returns the hooks."""
    handles = []
    for path in source.paths:
        module = model.get_submodule(path)

        def hook(_module: nn.Module, args: tuple[Tensor, ...], out: Tensor, path: str = path) -> Tensor:
            x = args[0]
            delta = source.delta(path, x.reshape(-1, x.shape[-1]))
            return out + delta.view(*x.shape[:-1], -1).to(out.dtype)

        handles.append(module.register_forward_hook(hook))
    return handles


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The causal LM and its tokenizer from a local folder (never the hub)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True).to(device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return model, tokenizer


def open_adapter(folder: str | Path, model: nn.Module, backend: str = "auto") -> LoraDelta | MeteoraAdapter:
    """A MeteoRA folder (meteora_config.json) or a PEFT LoRA folder (adapter_config.json), fit to the model."""
    folder = Path(folder)
    shapes, n_layers = linear_shapes(model)
    device = next(model.parameters()).device
    if (folder / METEORA_CONFIG).is_file():
        adapter = MeteoraAdapter.load(folder, shapes, n_layers=n_layers, device=device, backend=backend)
        adapter.record_gate_logits = False
        return adapter
    if (folder / PEFT_CONFIG).is_file():
        return LoraDelta.load(folder, shapes, device)
    raise AdapterError(f"{folder}: neither {METEORA_CONFIG} nor {PEFT_CONFIG} (not an adapter folder)")


@dataclass(frozen=True)
class Generation:
    text: str  # the generated text, up to (not including) the end-of-sequence token
    token_ids: list[int]
    adapters: list[list[int]] | None  # per generated token: the k traced adapters (MeteoRA with trace)


def trace_path(paths: Sequence[str]) -> str:
    """The linear the 'last' trace follows: the last layer's q_proj, else its last adapted linear."""
    last_layer = max(parse_linear_path(p)[0] for p in paths)
    in_layer = sorted(p for p in paths if parse_linear_path(p)[0] == last_layer)
    q = [p for p in in_layer if parse_linear_path(p)[1] == "q_proj"]
    return q[0] if q else in_layer[-1]


def _traced(adapter: MeteoraAdapter, how: str, rows: int) -> list[list[int]]:
    """Each row's traced adapters at its last position, from the adapter's last routing."""
    def last_position(path: str) -> Tensor:
        idx = adapter.last_idx[path]
        return idx.view(rows, -1, idx.shape[-1])[:, -1]  # [rows, k]

    if how == "last":
        return last_position(trace_path(adapter.paths)).tolist()
    per_linear = torch.stack([last_position(p) for p in adapter.paths], dim=1).reshape(rows, -1).tolist()
    k = adapter.top_k
    return [[e for e, _ in sorted(Counter(votes).items(), key=lambda kv: (-kv[1], kv[0]))[:k]] for votes in per_linear]


def _batches(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def cache_argument(model: nn.Module) -> str:
    """The KV cache's name in the model's forward and output: `cache` in newer transformers
    5.x (where `past_key_values` is deprecated), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _next_token(logits: Tensor, do_sample: bool, temperature: float, top_p: float, gen: torch.Generator | None) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    adapter: LoraDelta | MeteoraAdapter | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    trace: str | None = None,
) -> list[Generation]:
    """Greedy (or sampled) continuations of prompts, batched with left padding and a KV cache.

    Prompts are tokenised as training does: BOS, then the text without special tokens.
    `trace` ('last' or 'majority') needs a MeteoRA adapter.
    """
    if trace is not None and (trace not in TRACES or not isinstance(adapter, MeteoraAdapter)):
        raise ValueError(f"trace must be one of {TRACES} and needs a MeteoRA adapter")
    handles = attach(model, adapter) if adapter is not None else []
    if isinstance(adapter, MeteoraAdapter):
        adapter.trace = trace is not None
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed) if do_sample else None
    out: list[Generation] = []
    try:
        for _, batch in _batches(prompts, batch_size):
            out.extend(_generate_batch(model, tokenizer, batch, adapter, max_new_tokens, do_sample, temperature, top_p, gen, trace))
    finally:
        for h in handles:
            h.remove()
        if isinstance(adapter, MeteoraAdapter):
            adapter.trace = False
            adapter.last_idx.clear()
    return out


def _generate_batch(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], adapter: LoraDelta | MeteoraAdapter | None,
    max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, gen: torch.Generator | None, trace: str | None,
) -> list[Generation]:
    device = next(model.parameters()).device
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = pad if pad is not None else eos
    encoded = [([bos] if bos is not None else []) + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = len(prompts)
    new_ids: list[list[int]] = [[] for _ in range(rows)]
    traces: list[list[list[int]]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    past = None
    step_ids = ids
    cache = cache_argument(model)
    for _ in range(max_new_tokens):
        result = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache: past})
        past = getattr(result, cache)
        token = _next_token(result.logits[:, -1], do_sample, temperature, top_p, gen)
        token = torch.where(done, torch.full_like(token, pad), token)
        chosen = _traced(adapter, trace, rows) if trace is not None and isinstance(adapter, MeteoraAdapter) else None
        for r, t in enumerate(token.tolist()):
            if not bool(done[r]):
                new_ids[r].append(t)
                if chosen is not None:
                    traces[r].append(chosen[r])
        done = done | (token == eos)
        if bool(done.all()):
            break
        step_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    out = []
    for r in range(rows):
        kept = new_ids[r][: new_ids[r].index(eos)] if eos in new_ids[r] else new_ids[r]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        out.append(Generation(text, kept, traces[r][: len(kept)] if trace is not None else None))
    return out


def generate_chain(
    model: nn.Module, tokenizer: Any, records: Sequence[dict], *, adapter: LoraDelta | MeteoraAdapter | None = None,
    template: str = "plain", max_new_tokens: int = 16, batch_size: int = 32, trace: str | None = None,
) -> tuple[list[list[str]], list[list[list[list[int]]]] | None]:
    """Answer composite records part by part in one growing context (suite.composite_context).

    Returns each record's answers and, with trace, each answer's per-token adapters.
    """
    from mlora.meteora.suite import composite_context

    answers: list[list[str]] = [[] for _ in records]
    traces: list[list[list[list[int]]]] = [[] for _ in records]
    n_parts = max(len(r["parts"]) for r in records) if records else 0
    for step in range(n_parts):
        todo = [i for i, r in enumerate(records) if len(r["parts"]) > step]
        prompts = [composite_context(records[i]["parts"], answers[i], template) for i in todo]
        outs = generate(model, tokenizer, prompts, adapter=adapter, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, trace=trace)
        for i, g in zip(todo, outs):
            answers[i].append(g.text.strip().split("\n")[0])
            traces[i].append(g.adapters or [])
    return answers, (traces if trace is not None else None)


def generate_from_folders(
    model_dir: str | Path, adapter_dir: str | Path | None, prompts: Sequence[str], *,
    device: str = "cpu", backend: str = "auto", **kwargs: Any,
) -> list[Generation]:
    """Load the model (and the adapter folder, LoRA or MeteoRA) and generate."""
    model, tokenizer = load_model(model_dir, device=device)
    adapter = open_adapter(adapter_dir, model, backend) if adapter_dir is not None else None
    return generate(model, tokenizer, prompts, adapter=adapter, **kwargs)
