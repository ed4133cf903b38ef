"""`mlora validate`: every check a run does before compute, without loading weights."""

from __future__ import annotations

from mlora.config import RunSpec
from mlora.jobs import JobState, plan_steps
from mlora.model.stage import read_config
from mlora.runtime.setup import build_job_states, check_backend, load_tokenizer, precision_note, resolve_device
from mlora.runtime.trainer import check_init_adapter


def preflight(spec: RunSpec, stages: int | None = None) -> list[str]:
    """Check device, backend, model folder, tokenizer, datasets and init adapters; describe
    what would run (on this machine: the device is resolved here). With `stages`, also
    plan it as that pipeline, as its rank 0 would: the split, the micro-batches and the
    bubble its schedules predict."""
    check_backend(spec, resolve_device(spec.model.device, spec.source))
    config = read_config(spec.model.path)
    tokenizer = load_tokenizer(spec.model.path)
    for job in spec.jobs:
        check_init_adapter(job, spec.source)
    lines = [
        f"model {spec.model.path}: {config.model_type}, {config.num_hidden_layers} blocks, "
        f"hidden {config.hidden_size}, vocab {config.vocab_size}, {spec.model.dtype}"
    ]
    if precision_note(spec):
        lines.append(f"  note: {precision_note(spec)}")
    states = build_job_states(spec, tokenizer, plan_steps)
    for state in states:
        job = state.spec
        lines.append(
            f"job {job.name}: {len(state.train)} train / {len(state.eval)} eval examples, "
            f"{state.max_steps} steps, r={job.lora_r} on {','.join(job.target_modules)}, lr {job.learning_rate:g}"
        )
        if state.data_note:
            lines.append(f"  note: {state.data_note}")
    if stages is not None:
        lines += pipeline_outline(spec, {s.name: s for s in states}, stages)
    return lines


def pipeline_outline(spec: RunSpec, jobs: dict[str, JobState], stages: int) -> list[str]:
    """The split, the micro-batches and the predicted bubble of the run as a pipeline of
    `stages`, planned as its rank 0 plans it (same functions), without a weight read."""
    from mlora.runtime.pipeline_plan import predicted_bubble, schedule_phases, split_model

    _, split_text, costs = split_model(spec, stages)
    phases = schedule_phases(spec, jobs, list(jobs), stages)
    mbs = [mb for _, schedule in phases for mb in schedule.micro_batches]
    evals = sum(mb.is_eval for mb in mbs)
    bubble = predicted_bubble([schedule for _, schedule in phases], costs)
    return [f"pipeline of {stages} stages:", *split_text.splitlines(),
            f"{len(mbs)} micro-batches ({evals} of them evaluation) in {len(phases)} phase(s); predicted bubble "
            f"{100 * bubble:.1f}% (the schedule simulated with per-token stage costs; "
            "communication and host time come on top)"]
