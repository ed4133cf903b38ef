"""Rank 0's plan of a pipeline run: the split, each job's state, the micro-batches and
the per-stage action lists, checked and costed before anything runs.

`split_model`, `schedule_phases`, `plan_phase` and `predicted_bubble` need the run file
and the jobs' data only, no process group and no weights (`mlora validate --stages`
calls them too); `Driver` adds the output folder, resuming, and the batches rank 0 sends.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import torch

from mlora.config import ConfigError, RunSpec
from mlora.jobs import JobState, PendingMicro, plan_steps
from mlora.model.stage import StageBounds, base_linear_shapes, read_config
from mlora.runtime.batch import collate, make_layout, padded_length
from mlora.runtime.checkpoint import Held, check_resumable, latest_checkpoint, read_state, resumed_split
from mlora.runtime.meteora_jobs import check_meteora_inputs, gated_linears, run_dependencies
from mlora.runtime.output import SHARED_MARKER, is_finished, job_dir, prepare_output, slices_dir
from mlora.runtime.setup import build_job_states, load_tokenizer, warn_about_data
from mlora.runtime.stage_worker import MicroBatchPlan
from mlora.runtime.trainer import check_init_adapter, truncate_metrics
from mlora.schedule.actions import Schedule
from mlora.schedule.microbatch import MicroBatch
from mlora.schedule.partition import ModelShape, balanced_split, cuts_split, explicit_split, split_as_layers
from mlora.schedule.pipeline import build_schedule
from mlora.schedule.planner import JobPlanSizes, plan_pipeline
from mlora.schedule.simulate import StageCosts, simulate
from mlora.schedule.validate import validate_schedule


@dataclass(frozen=True)
class PipelinePlan:
    """What rank 0 decides and every rank needs."""

    spec: RunSpec
    bounds: tuple[StageBounds, ...]
    split_text: str
    predicted_bubble: float  # the schedules simulated with per-token stage costs, before anything runs
    phases: tuple[tuple[tuple[str, ...], Any], ...]  # (jobs starting, mlora.schedule.actions.Schedule) in order
    plans: dict[int, MicroBatchPlan]  # every phase's micro-batches (numbered across phases)
    job_ids: dict[str, int]
    total_steps: dict[str, int]
    restored: dict[str, str | None]  # job → checkpoint folder to load (None: fresh)
    active: tuple[str, ...]  # jobs with work left
    marker: str  # a file rank 0 put in the output folder: the ranks that see it share the folder


def stage_shape(model_path: str) -> ModelShape:
    c = read_config(model_path)
    return ModelShape(
        n_layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        vocab=c.vocab_size,
    )


def split_model(
    spec: RunSpec, n_stages: int, written: tuple[int, tuple[tuple[int, int], ...] | None] | None = None
) -> tuple[tuple[StageBounds, ...], str, tuple[float, ...]]:
    """The stages' block ranges, their description and their relative costs.

    `written`: the split a resumed run's checkpoints were written under
    (`checkpoint.resumed_split`); the run keeps it, so that each stage's slice fits the
    stage that reads it back (checkpoints from before splits were recorded: whole
    blocks, as then)."""
    shape = stage_shape(spec.model.path)
    layers = spec.run.layers_per_stage
    if layers is not None and len(layers) != n_stages:
        raise ConfigError(f"{spec.source}: run: layers_per_stage: {len(layers)} entries for {n_stages} processes")
    try:
        if layers is not None:
            split = explicit_split(shape, layers)
        else:
            split = balanced_split(shape, n_stages, halves=written is None or written[1] is not None)
    except ValueError as exc:
        field = "run: layers_per_stage" if layers is not None else f"model: path: {spec.model.path!r}"
        raise ConfigError(f"{spec.source}: {field}: {exc}") from exc
    if written is not None and written[1] is not None and tuple(split.stage_halves(k) for k in range(n_stages)) != written[1]:
        kept = cuts_split(shape, [lo for lo, _ in written[1]] + [written[1][-1][1]])
        if layers is not None:
            raise ConfigError(
                f"{spec.source}: run: layers_per_stage: {list(layers)} is not the split its checkpoints were "
                f"written with ({split_as_layers(kept)}); put that back to resume, or leave the field out"
            )
        split = kept
    bounds = tuple(
        StageBounds.from_halves(*split.stage_halves(k), k == 0, k == n_stages - 1) for k in range(n_stages)
    )
    return bounds, split.describe(), split.costs


class Driver:
    """Rank 0's view: data, the plan, metrics and outputs."""

    def __init__(self, spec: RunSpec, n_stages: int, resume: bool, overwrite: bool, live: bool | None,
                 held: Held | None = None) -> None:
        """`held`: each stage's own checkpoint slices (`checkpoint.local_slices`), for a
        resumed run whose ranks may not share the output folder."""
        self.spec, self.n_stages = spec, n_stages
        tokenizer = load_tokenizer(spec.model.path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for job in spec.jobs:
            check_init_adapter(job, spec.source)
        if any(j.kind == "meteora" for j in spec.jobs):
            check_meteora_inputs(spec, *base_linear_shapes(spec.model.path))
        self.jobs: dict[str, JobState] = {s.name: s for s in build_job_states(spec, tokenizer, plan_steps)}
        # a resumed run keeps the split its checkpoints were written under; a new one claims
        # its output folder only once the split is known to be good
        if resume:
            self.out = prepare_output(Path(spec.run.output_dir), resume, overwrite)
            check_resumable(spec, self.out, n_stages, held)
        written = resumed_split(spec, self.out, held) if resume else None
        self.bounds, self.split_text, self.stage_costs = split_model(spec, n_stages, written)
        if not resume:
            self.out = prepare_output(Path(spec.run.output_dir), resume, overwrite)
        warn_about_data(self.jobs.values())
        self.resume, self.held = resume, held
        self.device = torch.device("cpu")
        self.live_flag = live
        self.members: dict[int, list[tuple[PendingMicro, list[Any], int]]] = {}
        self.reevaluate: set[str] = set()  # resumed jobs evaluated first, at the step they resume from

    def plan(self) -> PipelinePlan:
        restored: dict[str, str | None] = {}
        active: list[str] = []
        for job in self.jobs.values():
            folder = job_dir(self.out, job.name)
            if self.resume and is_finished(folder):
                job.step, job.status = job.max_steps, "finished"
                continue
            ckpt = latest_checkpoint(self.out, job.name, self.n_stages, self.held) if self.resume else None
            if ckpt is not None:
                state = read_state(ckpt)
                job.step, job.tokens, job.losses = state["step"], state["tokens"], state["losses"]
                truncate_metrics(folder / "metrics.jsonl", job.step)
                if job.evaluates_after(job.step) and job.step not in evaluated_steps(folder / "metrics.jsonl"):
                    self.reevaluate.add(job.name)  # the run stopped between the checkpoint and its evaluation
            restored[job.name] = str(ckpt) if ckpt is not None else None
            active.append(job.name)
            shutil.rmtree(slices_dir(self.out, job.name), ignore_errors=True)  # from a run that stopped while writing
        phases = schedule_phases(self.spec, self.jobs, active, self.n_stages, self.reevaluate)
        plans = {mb.index: self._micro_plan(mb) for _, schedule in phases for mb in schedule.micro_batches}
        return PipelinePlan(
            spec=self.spec,
            bounds=self.bounds,
            split_text=self.split_text,
            predicted_bubble=predicted_bubble([schedule for _, schedule in phases], self.stage_costs),
            phases=tuple(phases),
            plans=plans,
            job_ids={j.name: i for i, j in enumerate(self.spec.jobs)},
            total_steps={name: self.jobs[name].max_steps for name in self.jobs},
            restored=restored,
            active=tuple(active),
            marker=self._marker(),
        )

    def _marker(self) -> str:
        name = f"{SHARED_MARKER}{uuid.uuid4().hex}"
        (self.out / name).touch()
        return name

    def _micro_plan(self, mb: Any) -> MicroBatchPlan:
        micros, lengths, seeds, inv, members, task_rows, denoms = [], [], [], [], [], [], []
        for s in mb.slices:
            job = self.jobs[s.job]
            rows: Any = None
            denom = 0.0
            if s.eval:  # held-out rows: no loss weight, no gate loss, no dropout
                exs = job.eval_batches()[s.micro]
                micro = PendingMicro(s.job, s.step, s.micro, s.last, tuple(range(len(exs))))
                weight = 1.0
            else:
                examples = job.steps[s.step].micro_batches[s.micro]
                exs = [job.train[i] for i in examples]
                micro = PendingMicro(s.job, s.step, s.micro, s.last, examples)
                weight = 1.0 / job.step_targets(s.step)
                if job.spec.kind == "meteora":
                    rows = tuple(tuple(e.tasks()) for e in exs)
                    denom = float(self._gate_count(job) * job.step_tokens(s.step))
            micros.append(micro)
            lengths.append([len(e.input_ids) for e in exs])
            seeds.append(job.spec.seed)
            inv.append(weight)
            members.append((micro, exs, job.spec.seed))
            task_rows.append(rows)
            denoms.append(denom)
        self.members[mb.index] = members
        layout = make_layout(micros, lengths, seeds, training=not mb.is_eval, pad_to_multiple_of=self.spec.run.pad_to_multiple_of)
        return MicroBatchPlan(mb, layout, tuple(inv), tuple(task_rows), tuple(denoms))

    def _gate_count(self, job: JobState) -> int:
        if not job.gate_count:
            job.gate_count = gated_linears(job.spec, self.spec, stage_shape(self.spec.model.path).n_layers)
        return job.gate_count

    def batch(self, mb: int, device: torch.device) -> Any:
        members = self.members[mb]
        return collate(
            [m for m, _, _ in members], [e for _, e, _ in members], [s for _, _, s in members], self.pad_id, device,
            pad_to_multiple_of=self.spec.run.pad_to_multiple_of,
        )


def schedule_phases(spec: RunSpec, jobs: dict[str, JobState], active: Sequence[str], n_stages: int,
                    reevaluate: Collection[str] = ()) -> list[tuple[tuple[str, ...], Schedule]]:
    """The run's phases, each (its jobs, its validated schedule): a MeteoRA job mixing LoRA
    jobs still training here runs in a second phase, after they are done on every stage
    (the pipeline drains between phases). `reevaluate`: resumed jobs evaluated first."""
    later = [n for n in active if any(d in active for d in run_dependencies(jobs[n].spec, spec))]
    phases: list[tuple[tuple[str, ...], Schedule]] = []
    first_index = 0
    for names in ([n for n in active if n not in later], later):
        if not names:
            continue
        mbs = plan_phase(spec, jobs, names, n_stages, first_index, reevaluate)
        schedule = build_schedule(mbs, n_stages)
        validate_schedule(schedule)
        phases.append((tuple(names), schedule))
        first_index += len(mbs)
    return phases


def plan_phase(spec: RunSpec, jobs: dict[str, JobState], names: Sequence[str], n_stages: int, first_index: int,
               reevaluate: Collection[str] = ()) -> list[MicroBatch]:
    """The phase's jobs' remaining steps (and evaluations) as pipeline micro-batches."""
    sizes = []
    multiple = spec.run.pad_to_multiple_of
    for name in names:
        job = jobs[name]
        steps = job.steps[job.step :]
        lens = [[[len(job.train[i].input_ids) for i in mb] for mb in st.micro_batches] for st in steps]
        eval_lens = [[len(e.input_ids) for e in exs] for exs in job.eval_batches()]
        sizes.append(
            JobPlanSizes(
                job=name,
                steps=tuple(tuple((len(mb), padded_length(max(mb), multiple)) for mb in st) for st in lens),
                tokens=tuple(tuple(sum(mb) for mb in st) for st in lens),
                first_step=job.step,
                eval_chunks=tuple((len(ls), padded_length(max(ls), multiple)) for ls in eval_lens),
                eval_tokens=tuple(sum(ls) for ls in eval_lens),
                eval_after=frozenset(c for c in range(job.step + (name not in reevaluate), job.max_steps + 1)
                                     if job.evaluates_after(c)),
            )
        )
    groups = spec.run.pipeline_groups or n_stages
    return plan_pipeline(sizes, groups, spec.run.max_concurrent_jobs, spec.run.max_tokens_per_batch, first_index)


def predicted_bubble(schedules: Sequence[Schedule], stage_costs: Sequence[float]) -> float:
    """Idle stage time over all stage time of the phases run one after another, each simulated
    with per-token costs in the split's proportions (backward twice the forward)."""
    costs = StageCosts.proportional(stage_costs)
    idle = total = 0.0
    for schedule in schedules:
        sim = simulate(schedule, costs)
        idle += sum(sim.idle)
        total += sim.n_stages * sim.makespan
    return idle / total if total > 0 else 0.0


def evaluated_steps(metrics: Path) -> set[int]:
    """The steps a job's metrics.jsonl holds an evaluation row for."""
    if not metrics.is_file():
        return set()
    rows = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
    return {r["step"] for r in rows if r.get("kind") == "eval"}
