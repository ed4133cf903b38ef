"""`mlora validate`: every check a run does before compute, without loading weights."""

from __future__ import annotations

from mlora.config import RunSpec
from mlora.jobs import plan_steps
from mlora.model.stage import read_config
from mlora.runtime.setup import build_job_states, check_backend, load_tokenizer, resolve_device
from mlora.runtime.trainer import check_init_adapter


def preflight(spec: RunSpec) -> list[str]:
    """Check device, backend, model folder, tokenizer, datasets and init adapters; describe
    what would run (on this machine: the device is resolved here)."""
    check_backend(spec, resolve_device(spec.model.device, spec.source))
    config = read_config(spec.model.path)
    tokenizer = load_tokenizer(spec.model.path)
    for job in spec.jobs:
        check_init_adapter(job, spec.source)
    lines = [
        f"model {spec.model.path}: {config.model_type}, {config.num_hidden_layers} blocks, "
        f"hidden {config.hidden_size}, vocab {config.vocab_size}, {spec.model.dtype}"
    ]
    for state in build_job_states(spec, tokenizer, plan_steps):
        job = state.spec
        lines.append(
            f"job {job.name}: {len(state.train)} train / {len(state.eval)} eval examples, "
            f"{state.max_steps} steps, r={job.lora_r} on {','.join(job.target_modules)}, lr {job.learning_rate:g}"
        )
        if state.data_note:
            lines.append(f"  note: {state.data_note}")
    return lines
