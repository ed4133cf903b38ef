"""The multi-LoRA linear module and the per-job adapter it reads from.

Every target nn.Linear of the base becomes a MultiLoraLinear holding the frozen weight.
Adapters are not its submodules: each job owns a StageAdapter (its A and B for every
linear of the stage), and the module finds them, and the batch's row layout, through
a Routing object shared by the whole stage. So adding, finishing or saving a job never
touches the base model, and the base state dict stays the base's.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from mlora.ops import Segment, multi_lora_linear
from mlora.ops.multi_lora import resolve_backend


@dataclass(frozen=True)
class JobRows:
    """One job's rows [row_start, row_end) of a fused batch."""

    job: str
    row_start: int
    row_end: int
    seq_len: int  # the job's own padded length: dropout masks are drawn at this size
    dropout_seed: int  # distinct per (job, step, micro-batch); layers add their index

    def tokens(self, batch_seq_len: int) -> tuple[int, int]:
        """The job's token range [start, end) in the flattened [rows · batch_seq_len] batch."""
        return self.row_start * batch_seq_len, self.row_end * batch_seq_len


@dataclass(frozen=True)
class BatchLayout:
    """How a fused [rows, seq_len] batch is split among jobs."""

    rows: int
    seq_len: int
    jobs: tuple[JobRows, ...]
    training: bool = True


@runtime_checkable
class MixtureAdapter(Protocol):
    """A job whose linears add a routed mixture (MeteoRA) instead of one LoRA."""

    gates: dict

    def delta(self, path: str, x_flat: Tensor) -> Tensor: ...


@dataclass
class Routing:
    """Shared by every MultiLoraLinear of a stage: who is training and the current batch."""

    adapters: dict[str, "StageAdapter | MixtureAdapter"] = field(default_factory=dict)
    layout: BatchLayout | None = None
    backend: str = "auto"
    op_cache: dict = field(default_factory=dict)  # per-batch tensors the operator shares across layers
    # (job, linear index) -> dropout generator kept across steps (CUDA graphs: the graph
    # runner reseeds them before each replay); None: a fresh generator per call
    generators: dict[tuple[str, int], torch.Generator] | None = None


def dropout_seed_of(rows: JobRows, index: int) -> int:
    """The dropout seed of a job's rows at the linear with global index `index`."""
    return rows.dropout_seed + 7919 * index


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class StageAdapter:
    """One job's LoRA weights for the linears one stage holds (fp32 master weights)."""

    def __init__(
        self,
        job: str,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        a: dict[str, nn.Parameter],
        b: dict[str, nn.Parameter],
    ) -> None:
        self.job, self.r, self.alpha, self.dropout, self.use_rslora = job, r, alpha, dropout, use_rslora
        self.scale = lora_scale(r, alpha, use_rslora)
        self.a, self.b = a, b

    @classmethod
    def create(
        cls,
        job: str,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        shapes: dict[str, tuple[int, int]],
        seed: int,
        device: torch.device | str = "cpu",
    ) -> "StageAdapter":
        """PEFT's init: A Kaiming-uniform (a=√5, i.e. U(±1/√d_in)), B zero.

        Each linear's A comes from a generator seeded by (job seed, module path), so a
        job's initial adapter is the same whichever stage or run holds the module, on one
        kind of device: A is drawn where it lives (a CUDA generator draws other numbers
        than the CPU's), since drawing 896 A's on the host and copying each over took
        0.56 s of the start of a 4-job 7B run.
        """
        a: dict[str, nn.Parameter] = {}
        b: dict[str, nn.Parameter] = {}
        gen = torch.Generator(device=device)
        for path, (d_in, d_out) in sorted(shapes.items()):
            gen.manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))
            bound = 1.0 / math.sqrt(d_in)
            init = torch.rand(r, d_in, generator=gen, dtype=torch.float32, device=device).mul_(2).sub_(1).mul_(bound)
            a[path] = nn.Parameter(init)
            b[path] = nn.Parameter(torch.zeros(d_out, r, dtype=torch.float32, device=device))
        return cls(job, r, alpha, dropout, use_rslora, a, b)

    def parameters(self) -> list[nn.Parameter]:
        """A then B for every path, in a fixed order (the optimizer's order)."""
        return [p for path in sorted(self.a) for p in (self.a[path], self.b[path])]

    def named_tensors(self) -> Iterable[tuple[str, Tensor, Tensor]]:
        for path in sorted(self.a):
            yield path, self.a[path], self.b[path]


class MultiLoraLinear(nn.Module):
    """A frozen linear plus, for each job in the batch that adapts it, s·(drop(x)·Aᵀ)·Bᵀ."""

    def __init__(self, base: nn.Linear, path: str, index: int, routing: Routing) -> None:
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach(), requires_grad=False) if base.bias is not None else None
        self.in_features, self.out_features = base.in_features, base.out_features
        self.path, self.index = path, index
        self.routing = routing

    def extra_repr(self) -> str:
        return f"{self.path}: {self.in_features}→{self.out_features}, bias={self.bias is not None}"

    def forward(self, x: Tensor) -> Tensor:
        layout = self.routing.layout
        active: list[JobRows] = []
        mixtures: list[tuple[JobRows, MixtureAdapter]] = []
        for rows in layout.jobs if layout is not None else ():
            adapter = self.routing.adapters.get(rows.job)
            if isinstance(adapter, StageAdapter):
                if self.path in adapter.a:
                    active.append(rows)
            elif adapter is not None and self.path in adapter.gates:
                mixtures.append((rows, adapter))
        if not active and not mixtures:
            return nn.functional.linear(x, self.weight, self.bias)
        assert layout is not None
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        y = self._lora(flat, active, layout) if active else nn.functional.linear(flat, self.weight, self.bias)
        for rows, mixture in mixtures:
            # A MeteoRA job's rows get its routed mixture on top of the frozen output
            # (the slice add is autograd-safe: the base GEMM does not save its output).
            start, end = rows.tokens(layout.seq_len)
            y[start:end] += mixture.delta(self.path, flat[start:end])
        return y.view(*lead, self.out_features)

    def _lora(self, flat: Tensor, active: list[JobRows], layout: BatchLayout) -> Tensor:
        """Base GEMM plus every LoRA job's segment, in one multi-LoRA call."""
        a_list, b_list, scales, drops, segments, masks = [], [], [], [], [], []
        for slot, rows in enumerate(active):
            adapter = self.routing.adapters[rows.job]
            a_list.append(adapter.a[self.path])  # fp32 masters: the operator casts
            b_list.append(adapter.b[self.path])
            scales.append(adapter.scale)
            p = adapter.dropout if layout.training else 0.0
            drops.append(p)
            start, end = rows.tokens(layout.seq_len)
            segments.append(Segment(slot, start, end))
            masks.append(self._dropout_mask(rows, layout, p, flat.device) if p > 0 else None)
        return multi_lora_linear(
            flat, self.weight, self.bias, a_list, b_list, scales, segments,
            dropout=drops, dropout_masks=masks, backend=self.routing.backend, cache=self.routing.op_cache,
        )

    def _generator(self, rows: JobRows, device: torch.device) -> torch.Generator:
        """Seeded by (job, step, micro-batch) and this linear: the same masks alone or fused.

        Kept generators (CUDA graphs) are seeded when made and by the graph runner
        before every replay (`dropout_seed`); a graph cannot reseed while recording.
        """
        seed = dropout_seed_of(rows, self.index)
        kept = self.routing.generators
        if kept is None:
            return torch.Generator(device=device).manual_seed(seed)
        key = (rows.job, self.index)
        if key not in kept:
            kept[key] = torch.Generator(device=device).manual_seed(seed)
        return kept[key]

    def _dropout_mask(self, rows: JobRows, layout: BatchLayout, p: float, device: torch.device) -> Tensor:
        """Keep-mask drawn at the job's own [rows, seq_len, d_in] size, then padded.

        Drawing at the job's own padded length (not the fused batch's) gives the job the
        same masks whether it trains alone or beside longer sequences of other jobs.
        """
        gen = self._generator(rows, device)
        n_rows = rows.row_end - rows.row_start
        keep = torch.rand(n_rows, rows.seq_len, self.in_features, generator=gen, device=device) >= p
        if rows.seq_len < layout.seq_len:
            pad = torch.zeros(n_rows, layout.seq_len - rows.seq_len, self.in_features, dtype=torch.bool, device=device)
            keep = torch.cat([keep, pad], dim=1)
        return keep.view(-1, self.in_features)


def project_shared(x: Tensor, modules: Sequence[nn.Module]) -> list[Tensor]:
    """Each of `modules` applied to x (a block's q, k, v, or gate and up). Where they are
    MultiLoraLinears of one stage on the recorded Triton path whose LoRA jobs all adapt
    every one of them, at ranks up to 16, without dropout, they run as one shared-input call
    (`mlora.ops.shared_input`: one shrink and one pass over x for all of them, one dx);
    otherwise one by one, as their own forward would."""
    shared = _shared_call(x, modules)
    return shared if shared is not None else [m(x) for m in modules]


def _shared_call(x: Tensor, modules: Sequence[nn.Module]) -> list[Tensor] | None:
    from torch.nn.modules import module as nn_module

    from mlora.ops.shared_input import fits, shared_input_enabled, shared_input_lora
    from mlora.ops.triton_multi_lora import base_gemm

    first = modules[0] if modules else None
    if not (isinstance(first, MultiLoraLinear) and len(modules) >= 2 and shared_input_enabled()):
        return None
    routing, layout = first.routing, first.routing.layout
    if (layout is None or resolve_backend(routing.backend) != "triton" or base_gemm() != "fused"
            or torch.are_deterministic_algorithms_enabled()):
        return None
    for m in modules:  # calling the operator directly skips the modules' hooks: only without any
        if (not isinstance(m, MultiLoraLinear) or m.routing is not routing or m.in_features != first.in_features
                or m._forward_hooks or m._forward_pre_hooks):
            return None
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return None
    active: list[tuple[JobRows, StageAdapter]] = []
    for rows in layout.jobs:
        adapter = routing.adapters.get(rows.job)
        if isinstance(adapter, StageAdapter):
            adapts = [m.path in adapter.a for m in modules]
            if not any(adapts):
                continue
            if not all(adapts) or (layout.training and adapter.dropout > 0):
                return None
            active.append((rows, adapter))
        elif adapter is not None and any(m.path in adapter.gates for m in modules):
            return None  # a MeteoRA job's mixture goes through the modules' own forward
    if not active or not fits([adapter.a[first.path].shape[0] for _, adapter in active], len(modules)):
        return None
    lead = x.shape[:-1]
    segments = [Segment(slot, *rows.tokens(layout.seq_len)) for slot, (rows, _) in enumerate(active)]
    ys = shared_input_lora(
        x.reshape(-1, first.in_features), [m.weight for m in modules], [m.bias for m in modules],
        [[adapter.a[m.path] for _, adapter in active] for m in modules],
        [[adapter.b[m.path] for _, adapter in active] for m in modules],
        [adapter.scale for _, adapter in active], segments, cache=routing.op_cache,
    )
    return [y.view(*lead, m.out_features) for y, m in zip(ys, modules)]
