"""A pipeline stage of a Llama-layout causal LM, loaded from a local folder.

A stage holds decoder blocks [start, end) and, if first, the embedding, if last, the
final norm and LM head. It reads only its own tensors from the safetensors files, so a
rank never materialises the whole model. A single-process run is one stage holding all.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from mlora.model.block_parts import ATTENTION, BOTH, MLP, PART_MODULES, drop_unheld, run_part
from mlora.model.layout import (
    EMBED,
    HEAD,
    NORM,
    SUPPORTED_MODEL_TYPES,
    TARGET_PATHS,
    layer_prefix,
)
from mlora.model.lora_linear import BatchLayout, MultiLoraLinear, Routing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded, with the folder and what is wrong."""


@dataclass(frozen=True)
class StageBounds:
    """Which part of the model a stage holds: decoder blocks [start, end), the first of
    them perhaps from its MLP on and the last perhaps up to its attention only (a pipeline
    cut inside a block, `schedule.partition`)."""

    start: int  # first decoder block
    end: int  # one past the last
    first: bool  # holds the embedding
    last: bool  # holds norm + LM head
    mlp_first: bool = False  # block `start` is held from its MLP on (its attention is the stage before's)
    attention_last: bool = False  # block `end - 1` is held up to its attention (its MLP is the next stage's)

    def __post_init__(self) -> None:
        if self.mlp_first and self.attention_last and self.end - self.start == 1:
            raise ValueError(f"stage of block {self.start}'s MLP and attention only holds nothing")

    @classmethod
    def from_halves(cls, lo: int, hi: int, first: bool, last: bool) -> StageBounds:
        """Halves [lo, hi): half 2i is block i's attention, 2i + 1 its MLP."""
        if not 0 <= lo < hi:
            raise ValueError(f"empty stage: halves [{lo}, {hi})")
        return cls(lo // 2, (hi + 1) // 2, first, last, mlp_first=lo % 2 == 1, attention_last=hi % 2 == 1)

    @property
    def halves(self) -> tuple[int, int]:
        """The held halves [lo, hi) (half 2i: block i's attention, 2i + 1: its MLP)."""
        return 2 * self.start + self.mlp_first, 2 * self.end - self.attention_last

    def held_parts(self, block: int) -> tuple[str, ...]:
        """Which parts of a held block this stage runs: attention, MLP or both."""
        lo, hi = self.halves
        return tuple(part for part, half in ((ATTENTION, 2 * block), (MLP, 2 * block + 1)) if lo <= half < hi)


def read_config(model_dir: str | Path) -> PretrainedConfig:
    """Load and check the model's config: a supported Llama-layout causal LM."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{folder}/config.json: not valid JSON: {exc}") from exc
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFolderError(
            f"{folder}/config.json: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not _weight_files(folder):
        raise ModelFolderError(f"{folder}: no *.safetensors weight files")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _tensor_index(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (sharded or not)."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    out: dict[str, Path] = {}
    for file in _weight_files(folder):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                out[name] = file
    return out


def read_tensors(folder: Path, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Read just these tensors, in dtype, on device."""
    index = _tensor_index(folder)
    missing = [n for n in names if n not in index]
    if missing:
        raise ModelFolderError(f"{folder}: weights lack {missing[:3]}{' …' if len(missing) > 3 else ''}")
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(index[name], []).append(name)
    out: dict[str, Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in file_names:
                out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    return out


class StageModel(nn.Module):
    """Embedding (first stage), blocks [start, end), norm + head (last stage)."""

    def __init__(
        self, config: PretrainedConfig, bounds: StageBounds, parts: dict[str, nn.Module], rotary: nn.Module,
        fused_ops: bool = True,
    ):
        """`fused_ops`: RMSNorm and SwiGLU through one Triton kernel each way on CUDA
        (mlora.ops.fused_block), the residual adds folded into the norms
        (mlora.ops.fused_residual, `fused_residual`), the loss on the logits' own dtype
        (mlora.ops.fused_cross_entropy, `fused_loss`); off only to measure what they save."""
        super().__init__()
        self.config, self.bounds = config, bounds
        self.embed_tokens = parts.get(EMBED)
        self.layers = nn.ModuleList([parts[layer_prefix(i)] for i in range(bounds.start, bounds.end)])
        # per block, the parts this stage runs (both but where a pipeline cut falls inside it)
        self.held = [bounds.held_parts(i) for i in range(bounds.start, bounds.end)]
        self.norm = parts.get(NORM)
        self.lm_head = parts.get(HEAD)
        self.rotary_emb = rotary
        self.routing = Routing()
        self.eager = config._attn_implementation == "eager"
        self.lora_linears: dict[str, MultiLoraLinear] = {}
        for offset, layer in enumerate(self.layers):
            index = bounds.start + offset
            held_modules = {PART_MODULES[part][1] for part in self.held[offset]}
            for t, rel in enumerate(TARGET_PATHS.values()):
                parent_name, child = rel.split(".")
                if parent_name not in held_modules:
                    continue
                parent = getattr(layer, parent_name)
                path = f"{layer_prefix(index)}.{rel}"
                # the index is global (not per stage) so dropout masks do not depend on the split
                global_index = index * len(TARGET_PATHS) + t
                wrapped = MultiLoraLinear(getattr(parent, child), path, global_index, self.routing)
                setattr(parent, child, wrapped)
                self.lora_linears[path] = wrapped
        self.fused_residual = False
        self.fused_loss = fused_ops  # read by the callers of model.loss.job_loss_sums
        # run.gradient_checkpointing: keep each block's input only and recompute the block
        # in the backward (activation memory of one block instead of all, ~1/3 more compute)
        self.gradient_checkpointing = False
        if fused_ops:
            from mlora.ops.fused_block import fuse_block_ops
            from mlora.ops.fused_residual import fusable

            for part in (*self.layers, self.norm):
                if part is not None:
                    fuse_block_ops(part)
            self.fused_residual = fusable(self.layers, self.norm if bounds.last else None, self.held)

    def linear_shapes(self, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of every linear of this stage that one of `targets` names."""
        return {
            path: (m.in_features, m.out_features)
            for path, m in self.lora_linears.items()
            if path.rsplit(".", 1)[1] in targets
        }

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the adapted linears compute in (their frozen weights')."""
        return next(iter(self.lora_linears.values())).weight.dtype

    def forward(
        self,
        inputs: Tensor,
        layout: BatchLayout,
        op_cache: dict | None = None,
        generators: dict | None = None,
        backend: str | None = None,
    ) -> Tensor:
        """Token ids (first stage) or hidden states in; hidden states out (normed if last).

        Rows are right-padded, so plain causal attention never lets a real token see a
        pad: no padding mask is needed and SDPA can take its fused causal path.
        `op_cache`: per-layout tensors the operators share across layers; a fresh one
        per call unless the caller keeps it (a CUDA graph must reuse the tensors it
        was captured with). `generators`: dropout generators kept across calls (Routing).
        `backend`: the multi-LoRA backend for this call instead of the routing's (a
        recorded step picks its own, `graphed_backend`).
        """
        hidden = self.embed_tokens(inputs) if self.bounds.first else inputs
        seq_len = hidden.shape[1]
        position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        mask = self._eager_causal_mask(seq_len, hidden) if self.eager else None
        self.routing.layout = layout
        self.routing.op_cache = {} if op_cache is None else op_cache
        self.routing.generators = generators
        run_backend = self.routing.backend
        if backend is not None:
            self.routing.backend = backend
        kwargs = dict(attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        try:
            if self.fused_residual and hidden.is_cuda and not recompute:
                from mlora.ops.fused_residual import run_layers, unhooked

                final = self.norm if self.bounds.last else None
                if unhooked(self.layers, final, self.held):  # a hook on a block or norm needs the module's own forward
                    return run_layers(self.layers, hidden, final, self.held, **kwargs)
            for layer, held in zip(self.layers, self.held):
                unit = layer if held == BOTH else partial(run_part, layer, held[0])
                hidden = self._checkpointed(unit, hidden, kwargs) if recompute else unit(hidden, **kwargs)
        finally:
            self.routing.layout = None
            self.routing.op_cache = {}
            self.routing.generators = None
            self.routing.backend = run_backend
        if self.bounds.last:
            hidden = self.norm(hidden)
        return hidden

    def _checkpointed(self, layer: Callable[..., Tensor], hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The block through torch.utils.checkpoint: only its input is kept, and the block
        runs again in the backward, under the routing state of this forward (the call
        has cleared it by then) and without recording MeteoRA gate logits a second time.
        Dropout masks come from generators seeded per call, so the rerun draws the same."""
        state = (self.routing.layout, self.routing.op_cache, self.routing.generators, self.routing.backend)
        runs = [0]

        def run(h: Tensor) -> Tensor:
            again = runs[0] > 0
            runs[0] += 1
            with self._routing_as(state, record_gates=not again):
                return layer(h, **kwargs)

        return checkpoint(run, hidden, use_reentrant=False)

    @contextmanager
    def _routing_as(self, state: tuple[Any, ...], record_gates: bool) -> Iterator[None]:
        """The routing of one forward (layout, operator cache, dropout generators, backend)
        while a block runs, gate logits recorded only if `record_gates`; restored after."""
        routing = self.routing
        saved = (routing.layout, routing.op_cache, routing.generators, routing.backend)
        mixtures = [a for a in routing.adapters.values() if hasattr(a, "record_gate_logits")]
        recording = [a.record_gate_logits for a in mixtures]
        routing.layout, routing.op_cache, routing.generators, routing.backend = state
        for adapter in mixtures:
            adapter.record_gate_logits = adapter.record_gate_logits and record_gates
        try:
            yield
        finally:
            routing.layout, routing.op_cache, routing.generators, routing.backend = saved
            for adapter, was in zip(mixtures, recording):
                adapter.record_gate_logits = was

    @staticmethod
    def _eager_causal_mask(seq_len: int, like: Tensor) -> Tensor:
        blocked = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=like.device), diagonal=1)
        mask = torch.zeros(seq_len, seq_len, dtype=like.dtype, device=like.device)
        return mask.masked_fill(blocked, torch.finfo(like.dtype).min)[None, None]


def base_linear_shapes(model_dir: str | Path) -> tuple[dict[str, tuple[int, int]], int]:
    """(d_in, d_out) of every adaptable linear of a model folder, and its block count.

    Built on the meta device from the config alone: lets a run check adapters against
    the base before any weight is read.
    """
    config = read_config(Path(model_dir))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {}
    for i, layer in enumerate(skeleton.model.layers):
        for rel in TARGET_PATHS.values():
            parent_name, child = rel.split(".")
            linear = getattr(getattr(layer, parent_name), child)
            shapes[f"{layer_prefix(i)}.{rel}"] = (linear.in_features, linear.out_features)
    return shapes, int(config.num_hidden_layers)


def load_stage(
    model_dir: str | Path,
    bounds: StageBounds | None = None,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> StageModel:
    """Build a stage's modules on the meta device, then fill them from safetensors."""
    folder = Path(model_dir)
    config = read_config(folder)
    config._attn_implementation = attn_implementation
    n_layers = config.num_hidden_layers
    bounds = bounds or StageBounds(0, n_layers, True, True)
    if not 0 <= bounds.start <= bounds.end <= n_layers:
        raise ModelFolderError(f"{folder}: stage blocks [{bounds.start}, {bounds.end}) outside 0..{n_layers}")
    torch_dtype, device = DTYPES[dtype], torch.device(device)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parts = _stage_parts(skeleton, bounds)
    index = _tensor_index(folder)
    for prefix, module in parts.items():
        wanted = [f"{prefix}.{name}" for name in module.state_dict()]
        source = {w: w for w in wanted}
        if prefix == HEAD and f"{HEAD}.weight" not in index:  # tied embeddings
            source[f"{HEAD}.weight"] = f"{EMBED}.weight"
        tensors = read_tensors(folder, list(source.values()), torch_dtype, device)
        state = {w[len(prefix) + 1 :]: tensors[source[w]] for w in wanted}
        module.load_state_dict(state, strict=True, assign=True)
        module.requires_grad_(False)
    return _assemble(skeleton, config, bounds, parts, device)


def _stage_parts(model: nn.Module, bounds: StageBounds) -> dict[str, nn.Module]:
    """The model's modules a stage holds, by state-dict prefix."""
    parts: dict[str, nn.Module] = {}
    for i in range(bounds.start, bounds.end):
        drop_unheld(model.model.layers[i], bounds.held_parts(i), i)
        parts[layer_prefix(i)] = model.model.layers[i]
    if bounds.first:
        parts[EMBED] = model.model.embed_tokens
    if bounds.last:
        parts[NORM] = model.model.norm
        parts[HEAD] = model.lm_head
    return parts


def _assemble(
    model: nn.Module, config: PretrainedConfig, bounds: StageBounds, parts: dict[str, nn.Module], device: torch.device,
    fused_ops: bool = True,
) -> StageModel:
    with torch.device(device):
        rotary = type(model.model.rotary_emb)(config=config)
    stage = StageModel(config, bounds, parts, rotary, fused_ops)
    stage.eval()  # base dropout off; LoRA dropout follows the batch layout's `training`
    return stage


def stage_from_model(model: nn.Module, bounds: StageBounds | None = None, fused_ops: bool = True) -> StageModel:
    """A stage over an already-built Hugging Face model (benchmarks on random weights).

    The model's own modules are reused and frozen, not copied; its target linears are
    replaced in place, so the model should not be used on its own afterwards.
    """
    config = model.config
    n_layers = config.num_hidden_layers
    bounds = bounds or StageBounds(0, n_layers, True, True)
    parts = _stage_parts(model, bounds)
    for module in parts.values():
        module.requires_grad_(False)
    device = next(model.parameters()).device
    return _assemble(model, config, bounds, parts, device, fused_ops)
