"""Preparing a run before any compute: device, tokenizer, every job's data and plan.

All of it can fail on bad input, so all of it runs before the output folder is touched
and before the base weights are read.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from mlora.config import ConfigError, JobSpec, RunSpec
from mlora.jobs import JobState


def resolve_device(name: str, source: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; `source` (the run file)
    names where a device asked for but missing came from."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source}: model: device: {name!r} asked for, but no CUDA device is available")
    return device


def check_backend(spec: RunSpec, device: torch.device) -> None:
    """`run.backend: triton` needs somewhere to run the kernels: a CUDA device, or Triton's
    CPU interpreter (TRITON_INTERPRET=1, as the tests run them; slow), and the triton
    package. Checked with the other inputs, so such a run stops before any compute with
    the field named, not in Triton's driver lookup mid-step."""
    if spec.run.backend != "triton":
        return
    where = f"{spec.source}: run: backend: 'triton'"
    if importlib.util.find_spec("triton") is None:
        raise ConfigError(f"{where} needs the triton package, which is not installed; use auto or torch")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ConfigError(f"{where} runs its kernels on a CUDA GPU, and this run is on the {device.type} "
                          f"(model: device: {spec.model.device!r}); use auto (the fused kernels where they "
                          f"pay, the dense PyTorch path elsewhere) or torch")


def load_tokenizer(model_path: str) -> Any:
    """The base model's tokenizer, from its folder only (never the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: path: {model_path!r}: cannot load its tokenizer: {exc}") from exc


def read_job_data(job: JobSpec, tokenizer: Any, cache: dict[Any, Any] | None = None) -> Any:
    """A job's JobData; a MeteoRA job's records each carry their adapter's index. Jobs
    given one `cache` tokenise a dataset they read alike once."""
    from mlora.config.load import adapter_label, task_index
    from mlora.data import JobData

    common = (job.dataset_format, job.template, tokenizer, job.cutoff_len, job.eval_split, job.seed)
    files = [Path(p) for p in job.dataset_files]
    if job.kind != "meteora":
        return JobData.build(files, *common, cache=cache)
    names = [adapter_label(a) for a in job.adapters]
    if files:
        return JobData.build(files, *common, task_names=names, cache=cache)
    parts = []
    for key, path in (job.datasets or {}).items():
        index = task_index(key, job.adapters)
        parts.append(JobData.build(Path(path), *common, task_names=names, force_task=index, cache=cache))
    return JobData.concat(parts, job.seed)


def build_job_states(spec: RunSpec, tokenizer: Any, plan_steps: Callable[..., Any]) -> list[JobState]:
    """Read, tokenize and split every job's dataset; fix each job's plan of steps."""
    from mlora.data import DataError

    from mlora.model.stage import read_config

    states = []
    tokenized: dict[Any, Any] = {}  # a sweep's jobs over one dataset tokenise it once
    positions = getattr(read_config(spec.model.path), "max_position_embeddings", None)
    for job in spec.jobs:
        try:
            data = read_job_data(job, tokenizer, tokenized)
        except DataError as exc:
            field = "dataset" if job.dataset is not None else "datasets"
            raise ConfigError(f"{spec.source}: job {job.name!r}: {field}: {exc}") from exc
        if not data.train:
            raise ConfigError(f"{spec.source}: job {job.name!r}: dataset: no training examples left after the eval split")
        steps = plan_steps(
            len(data.train),
            job.micro_batch_size,
            job.gradient_accumulation_steps,
            job.num_epochs,
            job.max_steps,
            data.epoch_order,
            [len(e.input_ids) for e in data.train],
        )
        notes = [data.cutoff_note(job.cutoff_len), context_note(data, positions)]
        states.append(JobState(spec=job, train=data.train, eval=data.eval, steps=steps,
                               data_note="; ".join(n for n in notes if n)))
    return states


def context_note(data: Any, positions: int | None) -> str:
    """Examples longer than the model was trained on ("" when none): its rotary embedding
    runs past the positions it learned, which a user should choose knowingly."""
    if not positions:
        return ""
    longest = max(len(e.input_ids) for e in (*data.train, *data.eval))
    if longest <= positions:
        return ""
    examples = (*data.train, *data.eval)
    over = sum(len(e.input_ids) > positions for e in examples)
    return (f"{over} of {len(examples)} examples run past the model's {positions} positions (max_position_embeddings; "
            f"the longest has {longest} tokens), where its rotary embedding extrapolates; cutoff_len={positions} keeps "
            "them within")


def precision_note(spec: RunSpec) -> str:
    """What to know about the run's dtype before training ("" when nothing): float16's
    small range is made up for by dynamic loss scaling (`jobs.loss_scale`)."""
    if spec.model.dtype != "float16":
        return ""
    return (f"{spec.source}: model: dtype: float16 trains with dynamic loss scaling, one scale per job (a step whose "
            "gradients overflow is skipped and its scale halved; loss_scale in metrics.jsonl); bfloat16, on GPUs "
            "that have it (Ampere and later), needs none")


def out_of_memory_advice(spec: RunSpec, where: str) -> str:
    """What to change when a batch did not fit in GPU memory (`where`: which batch),
    naming the fields."""
    advice = (f"out of GPU memory {where}: lower run.max_tokens_per_batch (now {spec.run.max_tokens_per_batch}), "
              "or a job's micro_batch_size or cutoff_len, or run.max_concurrent_jobs")
    if not spec.run.gradient_checkpointing:
        advice += ", or set run.gradient_checkpointing: true"
    return advice + "; the same launch with --resume then continues each job from its last checkpoint"


def warn_about_data(states: Iterable[JobState]) -> None:
    """Say, before training, what cutoff_len took from each job's data (dropped or cut
    examples are otherwise silently not learned) and which examples pass the model's
    trained positions."""
    for state in states:
        if state.data_note:
            print(f"mlora: job {state.name!r}: {state.data_note}",
                  file=sys.stderr, flush=True)
