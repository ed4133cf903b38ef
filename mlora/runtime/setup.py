"""Preparing a run before any compute: device, tokenizer, every job's data and plan.

All of it can fail on bad input, so all of it runs before the output folder is touched
and before the base weights are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mlora.config import ConfigError, RunSpec
from mlora.jobs import JobState


def resolve_device(name: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model: device: {name!r} asked for, but no CUDA device is available")
    return device


def load_tokenizer(model_path: str) -> Any:
    """The base model's tokenizer, from its folder only (never the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: path: {model_path!r}: cannot load its tokenizer: {exc}") from exc


def build_job_states(spec: RunSpec, tokenizer: Any, plan_steps: Callable[..., Any]) -> list[JobState]:
    """Read, tokenize and split every job's dataset; fix each job's plan of steps."""
    from mlora.data import DataError, JobData

    states = []
    for job in spec.jobs:
        try:
            data = JobData.build(
                Path(job.dataset), job.dataset_format, job.template, tokenizer, job.cutoff_len, job.eval_split, job.seed
            )
        except DataError as exc:
            raise ConfigError(f"{spec.source}: job {job.name!r}: dataset: {exc}") from exc
        if not data.train:
            raise ConfigError(f"{spec.source}: job {job.name!r}: dataset: no training examples left after the eval split")
        steps = plan_steps(
            len(data.train),
            job.micro_batch_size,
            job.gradient_accumulation_steps,
            job.num_epochs,
            job.max_steps,
            data.epoch_order,
        )
        states.append(JobState(spec=job, train=data.train, eval=data.eval, steps=steps))
    return states
