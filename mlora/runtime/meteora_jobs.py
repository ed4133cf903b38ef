"""MeteoRA jobs in a run: where their adapters come from, checks, building and saving.

A MeteoRA job mixes K LoRA adapters: PEFT folders given by path, or LoRA jobs of the
same run (then it waits for them and reads what they wrote). Shared by the
single-process trainer and the pipeline stages, which build the same adapter over
their own linears.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from mlora.config import ConfigError, JobSpec, RunSpec
from mlora.config.load import adapter_label
from mlora.meteora.adapter import MeteoraAdapter, MeteoraError, _read_adapters
from mlora.model.layout import parse_linear_path
from mlora.runtime.output import job_dir

# run.backend (the multi-LoRA operator's) → the MeteoRA operator's backend
METEORA_BACKEND = {"auto": "auto", "torch": "dense", "triton": "triton"}


def run_dependencies(job: JobSpec, spec: RunSpec) -> list[str]:
    """The LoRA jobs of this run a MeteoRA job mixes: it starts when they are done."""
    names = {j.name for j in spec.jobs}
    return [ref for ref in job.adapters if ref in names] if job.kind == "meteora" else []


def adapter_folders(job: JobSpec, spec: RunSpec, out: Path) -> list[Path]:
    names = {j.name for j in spec.jobs}
    return [job_dir(out, ref) if ref in names else Path(ref) for ref in job.adapters]


def check_meteora_inputs(spec: RunSpec, shapes: dict[str, tuple[int, int]], n_layers: int) -> None:
    """Load every given PEFT folder of every MeteoRA job and check it fits the base and its peers.

    Run before the output folder is claimed: a wrong adapter is named up front, not
    when the job is admitted after other jobs have trained.
    """
    for job in spec.jobs:
        if job.kind != "meteora":
            continue
        deps = set(run_dependencies(job, spec))
        folders = [Path(ref) for ref in job.adapters if ref not in deps]
        try:
            if folders:
                metas, _ = _read_adapters(folders, shapes, n_layers)
                if deps:
                    dep = next(j for j in spec.jobs if j.name in deps)
                    if tuple(sorted(dep.target_modules)) != tuple(sorted(metas[0].target_modules)):
                        raise MeteoraError(
                            f"{folders[0]} targets {list(metas[0].target_modules)} but job {dep.name!r} "
                            f"targets {list(dep.target_modules)}; MeteoRA needs every adapter on the same modules"
                        )
        except (MeteoraError, OSError, ValueError) as exc:
            raise ConfigError(f"{spec.source}: job {job.name!r}: adapters: {exc}") from exc


def gated_linears(job: JobSpec, spec: RunSpec, n_layers: int) -> int:
    """How many linears of the whole model get a gate: the gate loss's mean is over them."""
    deps = run_dependencies(job, spec)
    if deps:
        dep = next(j for j in spec.jobs if j.name == deps[0])
        return n_layers * len(dep.target_modules)
    from mlora.model.peft_io import load_adapter

    _, weights = load_adapter(Path(job.adapters[0]))
    return len({p for p in weights if parse_linear_path(p)[0] < n_layers})


def with_relative_folders(adapter: MeteoraAdapter, folder: Path) -> MeteoraAdapter:
    """Point the saved config at adapters inside the run's output by relative paths.

    So a run's output folder can be moved or copied whole and still load.
    """
    out = folder.resolve().parent
    adapters = []
    for name, path in adapter.config.adapters:
        p = Path(path).resolve()
        inside = out in p.parents
        adapters.append((name, os.path.relpath(p, folder.resolve()) if inside else str(p)))
    adapter.config = dataclasses.replace(adapter.config, adapters=tuple(adapters))
    return adapter


def make_meteora_on_stage(
    job: JobSpec, spec: RunSpec, out: Path, trained: dict[str, Any], shapes: dict[str, tuple[int, int]],
    device: torch.device, backend: str,
) -> MeteoraAdapter:
    """A stage's MeteoRA adapter, gates freshly initialised (seeded by path): LoRA jobs the
    stage still holds from their own slices (`trained`: job name → StageAdapter; a pipeline
    stage's, so no stage needs another's files), everything else from PEFT folders (checked
    against the base by `check_meteora_inputs` before the run).
    """
    from mlora.model.peft_io import load_adapter
    from mlora.runtime.trainer import adapter_meta

    by_name = {j.name: j for j in spec.jobs}
    adapters, metas, weights = [], [], []
    for ref, folder in zip(job.adapters, adapter_folders(job, spec, out)):
        adapters.append((adapter_label(ref), str(folder.resolve())))
        if ref in trained:
            metas.append(adapter_meta(by_name[ref], spec.model.path))
            weights.append({p: (a, b) for p, a, b in trained[ref].named_tensors()})
        else:
            meta, w = load_adapter(folder)
            metas.append(meta)
            weights.append({p: t for p, t in w.items() if p in shapes})
    return MeteoraAdapter.from_weights(
        adapters, metas, weights, shapes, base_model=spec.model.path, top_k=job.top_k, temperature=job.temperature,
        train_loras=job.train_loras, seed=job.seed, device=device, backend=METEORA_BACKEND[backend],
    )


def meteora_slice(adapter: MeteoraAdapter) -> dict[str, Any]:
    """What a stage hands rank 0 of a finished job: its gates and, if they trained, its
    adapters' slices (tensors where they are: the writer or the gather moves them)."""
    loras = None
    if adapter.config.train_loras:
        loras = {p: [(a.detach(), b.detach()) for a, b in zip(adapter.lora_a[p], adapter.lora_b[p])]
                 for p in adapter.paths}
    return {"gates": adapter.gate_state(), "loras": loras, "config": adapter.config, "metas": adapter.metas}


def write_meteora_slices(folder: Path, slices: list[dict[str, Any]]) -> Path:
    """Rank 0 merges every stage's gates (and trained adapters) into one MeteoRA folder."""
    from mlora.meteora.adapter import MeteoraConfig, write_meteora

    gates: dict[str, torch.Tensor] = {}
    for s in slices:
        gates.update(s["gates"])
    first = slices[0]
    config: MeteoraConfig = first["config"]
    loras = None
    if config.train_loras:
        loras = {}
        for i, ((name, _), meta) in enumerate(zip(config.adapters, first["metas"])):
            loras[name] = (meta, {p: pairs[i] for s in slices for p, pairs in s["loras"].items()})
        config = dataclasses.replace(config, adapters=tuple((n, f"adapters/{n}") for n, _ in config.adapters))
    holder = MeteoraAdapter(config, first["metas"], {}, {}, {})
    config = with_relative_folders(holder, folder).config if not config.train_loras else config
    return write_meteora(folder, config, gates, loras)
