"""Pipeline training across processes: one stage per rank, jobs interleaved, no flush.

Launched by `torchrun --nproc-per-node P -m mlora train RUN.yaml`. Read top to bottom:

1. every rank parses the run file; rank 0 (the driver) checks data and output, plans
   the whole run as micro-batches, builds and validates the per-stage action lists;
2. rank 0 broadcasts the plan; each rank loads only its own blocks' tensors and creates
   its slice of every job's adapter and optimizer;
3. each rank executes its action list (StageWorker); token ids leave rank 0, targets go
   from rank 0 to the last rank, losses (and evaluation losses, of held-out rows
   forwarded between two of a job's steps) come back to rank 0 with the gradients;
4. the adapter slices and the trace are gathered on rank 0, which writes one PEFT
   folder per job, trace.json and the run summary.

A 1-process run never comes here: it is the single-process Trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import torch
import torch.distributed as dist

from mlora.config import ALL_TARGET_MODULES, ConfigError, RunSpec, load_run_file
from mlora.jobs import JobOptimizer, JobState, PendingMicro, plan_steps
from mlora.model.lora_linear import StageAdapter
from mlora.model.loss import Targets
from mlora.model.peft_io import save_adapter
from mlora.model.stage import StageBounds, base_linear_shapes, load_stage, read_config
from mlora.runtime.background_writer import BackgroundWriter, Written, map_tensors, snapshot
from mlora.runtime.batch import collate, make_layout, padded_length
from mlora.runtime.checkpoint import (
    STATE,
    adapter_signature,
    check_resumable,
    latest_checkpoint,
    read_stage_slice,
    read_state,
    step_dir,
)
from mlora.runtime.meteora_jobs import (
    check_meteora_inputs,
    gated_linears,
    make_meteora_on_stage,
    meteora_slice,
    run_dependencies,
    write_meteora_slices,
)
from mlora.runtime.output import SHARED_MARKER, SUMMARY, TRACE, is_finished, job_dir, prepare_output
from mlora.runtime.setup import (
    build_job_states,
    check_backend,
    load_tokenizer,
    warn_about_data,
    warn_about_precision,
)
from mlora.runtime.stage_worker import MicroBatchPlan, StageWorker
from mlora.runtime.trainer import (
    StopSignal,
    adapter_meta,
    check_init_adapter,
    make_adapter,
    peak_memory_bytes,
    truncate_metrics,
)
from mlora.runtime.transport import PipelineError, Transport
from mlora.schedule.partition import ModelShape, balanced_split, explicit_split
from mlora.schedule.pipeline import build_schedule
from mlora.schedule.actions import Schedule
from mlora.schedule.microbatch import MicroBatch
from mlora.schedule.planner import JobPlanSizes, plan_pipeline
from mlora.schedule.simulate import StageCosts, simulate
from mlora.schedule.trace import bubble_from_events, to_chrome_trace
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


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_pipeline_launch() -> bool:
    return world()[1] > 1


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


def split_model(spec: RunSpec, n_stages: int) -> tuple[tuple[StageBounds, ...], str, tuple[float, ...]]:
    """The stages' block ranges, their description and their relative costs."""
    shape = stage_shape(spec.model.path)
    layers = spec.run.layers_per_stage
    if layers is not None and len(layers) != n_stages:
        raise ConfigError(f"{spec.source}: run: layers_per_stage: {len(layers)} entries for {n_stages} processes")
    try:
        split = explicit_split(shape, layers) if layers is not None else balanced_split(shape, n_stages)
    except ValueError as exc:
        field = "run: layers_per_stage" if layers is not None else f"model: path: {spec.model.path!r}"
        raise ConfigError(f"{spec.source}: {field}: {exc}") from exc
    bounds = tuple(
        StageBounds(split.bounds[k], split.bounds[k + 1], k == 0, k == n_stages - 1) for k in range(n_stages)
    )
    return bounds, split.describe(), split.costs


# --------------------------------------------------------------------- rank 0
class Driver:
    """Rank 0's view: data, the plan, metrics and outputs."""

    def __init__(self, spec: RunSpec, n_stages: int, resume: bool, overwrite: bool, live: bool | None) -> None:
        self.spec, self.n_stages = spec, n_stages
        tokenizer = load_tokenizer(spec.model.path)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for job in spec.jobs:
            check_init_adapter(job, spec.source)
        if any(j.kind == "meteora" for j in spec.jobs):
            check_meteora_inputs(spec, *base_linear_shapes(spec.model.path))
        self.jobs: dict[str, JobState] = {s.name: s for s in build_job_states(spec, tokenizer, plan_steps)}
        self.bounds, self.split_text, self.stage_costs = split_model(spec, n_stages)
        self.out = prepare_output(Path(spec.run.output_dir), resume, overwrite)
        if resume:
            check_resumable(spec, self.out, n_stages)
        warn_about_data(self.jobs.values())
        warn_about_precision(spec)
        self.resume = resume
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
            ckpt = latest_checkpoint(self.out, job.name, self.n_stages) if self.resume else None
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
            if s.eval:  # held-out rows: no loss weight, no gate loss, no dropout
                exs = job.eval_batches()[s.micro]
                micro = PendingMicro(s.job, s.step, s.micro, s.last, tuple(range(len(exs))))
                micros.append(micro)
                lengths.append([len(e.input_ids) for e in exs])
                seeds.append(job.spec.seed)
                inv.append(1.0)
                members.append((micro, exs, job.spec.seed))
                task_rows.append(None)
                denoms.append(0.0)
                continue
            examples = job.steps[s.step].micro_batches[s.micro]
            micro = PendingMicro(s.job, s.step, s.micro, s.last, examples)
            micros.append(micro)
            lengths.append([len(job.train[i].input_ids) for i in examples])
            seeds.append(job.spec.seed)
            inv.append(1.0 / job.step_targets(s.step))
            members.append((micro, [job.train[i] for i in examples], job.spec.seed))
            if job.spec.kind == "meteora":
                task_rows.append(tuple(tuple(job.train[i].tasks()) for i in examples))
                denoms.append(float(self._gate_count(job) * job.step_tokens(s.step)))
            else:
                task_rows.append(None)
                denoms.append(0.0)
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


# ------------------------------------------------------------------ all ranks
def run_pipeline(run_file: str, overrides: Sequence[str], *, resume: bool, overwrite: bool, live: bool | None,
                 errors: list[str] | None = None) -> int:
    """Entry point of every rank under torchrun; returns the process exit status. Rank 0
    prints why the run was refused (bad input), or appends it to `errors` when given (a
    Ray actor hands it to its driver, which prints it: a line printed in the actor may not
    reach the driver before the cluster shuts down)."""
    rank, n_ranks, local_rank = world()
    report = errors.append if errors is not None else lambda line: print(line, file=sys.stderr, flush=True)
    stop = StopSignal()
    try:
        with stop:
            return _run(rank, n_ranks, local_rank, run_file, overrides, resume, overwrite, live, report, stop)
    except PipelineError as exc:
        label, text = f"rank {rank} (stage {rank})", str(exc)  # the transport's errors name the rank already
        print(f"mlora: {text if text.startswith(label) else f'{label}: {text}'}", file=sys.stderr, flush=True)
        os._exit(3)  # never hang in teardown waiting for a peer that is gone
    except KeyboardInterrupt:  # Ctrl-C (torchrun passes it to every rank) or SIGTERM: rank 0 has said so
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + (stop.received or signal.SIGINT))  # the other ranks are stopping too: no teardown


def _run(rank: int, n_ranks: int, local_rank: int, run_file: str, overrides: Sequence[str],
         resume: bool, overwrite: bool, live: bool | None, report: Callable[[str], None], stop: StopSignal) -> int:
    from mlora.cli import user_errors

    # Parse everywhere (cheap); only rank 0 checks the data paths it alone reads.
    error: str | None = None
    spec: RunSpec | None = None
    try:
        spec = load_run_file(run_file, overrides, check_paths=rank == 0)
    except ConfigError as exc:
        error = str(exc)
    timeout = spec.run.pipeline_timeout_s if spec is not None else 300.0
    use_cuda = torch.cuda.is_available() and (spec is None or spec.model.device != "cpu")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout))

    driver: Driver | None = None
    message: dict[str, Any] = {}
    if rank == 0:
        if error is None:
            assert spec is not None
            try:
                check_backend(spec, device)  # every stage's device is of rank 0's type
                driver = Driver(spec, n_ranks, resume, overwrite, live)
                message = {"plan": driver.plan()}
            except user_errors() as exc:
                error = str(exc)
        if error is not None:
            message = {"error": error}
    box = [message]
    dist.broadcast_object_list(box, src=0)
    message = box[0]
    if "error" in message:
        if rank == 0:
            report(f"mlora train: error: {message['error']}")
        dist.destroy_process_group()
        return 2
    plan: PipelinePlan = message["plan"]
    spec = plan.spec
    out = Path(spec.run.output_dir)
    shared = output_is_shared(out, plan.marker, rank)  # before the long load: the marker goes at once
    if rank == 0:
        print(f"pipeline of {n_ranks} stages:\n{plan.split_text}\n"
              f"predicted bubble: {plan.predicted_bubble:.3f} (the schedule simulated with per-token stage costs)", flush=True)

    stage = load_stage(spec.model.path, plan.bounds[rank], spec.model.dtype, device, spec.model.attn_implementation)
    stage.routing.backend = spec.run.backend
    stage.gradient_checkpointing = spec.run.gradient_checkpointing
    optimizers: dict[str, JobOptimizer] = {}
    specs = {j.name: j for j in spec.jobs}
    shapes = stage.linear_shapes(ALL_TARGET_MODULES)

    def start_jobs(names: Sequence[str]) -> None:
        """This stage's slice of each job's adapter and optimizer (restored if resuming)."""
        for name in names:
            if specs[name].kind == "meteora":
                trained = {n: a for n, a in stage.routing.adapters.items() if isinstance(a, StageAdapter)}
                adapter: Any = make_meteora_on_stage(
                    specs[name], spec, Path(spec.run.output_dir), trained, shapes, device, spec.run.backend
                )
            else:
                adapter = make_adapter(specs[name], stage, device)
            stage.routing.adapters[name] = adapter
            optimizers[name] = JobOptimizer(specs[name], adapter, plan.total_steps[name])
            if plan.restored[name] is not None:
                optimizers[name].load_state_dict(read_stage_slice(Path(plan.restored[name]), rank))

    # every rank creates the groups, in the same order
    channels = {name: dist.new_group(timeout=timedelta(seconds=timeout)) for name in ("act", "grad", "targets")}
    transport = Transport(rank, device, timeout, lambda r: f"rank {r} (stage {r})", channels)
    writer = BackgroundWriter(device)  # this stage's checkpoint and final slices go to disk beside the pipeline
    monitor = PipelineMonitor(driver, spec, n_ranks, writer, shared) if rank == 0 else None
    last = n_ranks - 1

    def token_ids(mb: int) -> torch.Tensor:
        assert driver is not None
        batch = driver.batch(mb, device)
        pending_targets[mb] = batch.targets
        if monitor is not None:
            monitor.forwarded(plan.plans[mb])
        return batch.input_ids

    pending_targets: dict[int, Targets] = {}

    def send_targets(mb: int) -> None:
        t = pending_targets.pop(mb)
        transport.send(last, mb, torch.stack([t.index, t.token, t.slot]), [], channel="targets")

    def recv_targets(mb: int) -> Targets:
        packed, _ = transport.recv(0, mb, f"targets of micro-batch {mb}", channel="targets")
        assert packed is not None
        return Targets(packed[0], packed[1], packed[2], len(plan.plans[mb].batch.slices))

    def collect_writes(block: bool = False) -> None:
        """A failed earlier write stops this stage here; rank 0 learns which adapters are written."""
        if monitor is not None:
            monitor.collect(block)
        else:
            writer.collect(block)

    def on_step(job: str, step: int) -> None:
        collect_writes()
        save_steps = specs[job].save_steps
        if save_steps and (step + 1) % save_steps == 0 and step + 1 < plan.total_steps[job]:
            folder = step_dir(out, job, step + 1)
            writer.submit_stage_slice(job, folder, rank, snapshot(optimizers[job].state_dict()))
            if monitor is not None:
                monitor.checkpoint(job, step + 1, folder)
        if shared and step + 1 == plan.total_steps[job]:  # its weights on this stage are final
            writer.submit_stage_slice(job, slices_dir(out, job), rank, stage_slice(stage.routing.adapters[job]))

    if monitor is not None:
        monitor.start(plan.predicted_bubble)
    events: list[Any] = []
    clock = None
    try:
        for names, schedule in plan.phases:
            start_jobs(names)
            worker = StageWorker(
                rank, n_ranks, stage, optimizers, plan.job_ids, transport, plan.plans,
                token_ids=token_ids if rank == 0 else None,
                targets=recv_targets if rank == last else None,
                send_targets=send_targets if rank == 0 else None,
                on_loss=monitor.loss if monitor is not None else None,
                on_step=on_step,
                on_eval=monitor.evaluated if monitor is not None else None,
            )
            clock = worker.clock = clock or worker.clock  # one clock for the whole run's trace
            events += worker.run(schedule.stages[rank])
        transport.flush_sends()
        collect_writes(block=True)  # every stage's final slices are on disk before the gather
        # without a shared output folder, rank 0 writes the adapters from slices gathered here
        slices = None if shared else {name: on_host(stage_slice(stage.routing.adapters[name])) for name in plan.active}
        gathered: list[Any] = [None] * n_ranks if rank == 0 else []
        dist.gather_object((slices, events, peak_memory_bytes(device)), gathered if rank == 0 else None, dst=0)
        if monitor is not None:
            monitor.finish(plan, gathered)
    except KeyboardInterrupt:
        if monitor is not None:
            monitor.interrupted(plan, stop.received or signal.SIGINT, n_ranks)
        raise
    finally:
        writer.close()  # writes already handed over reach the disk
    dist.destroy_process_group()
    return 0


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


def output_is_shared(out: Path, marker: str, rank: int) -> bool:
    """Whether every rank sees rank 0's output folder (one host, or a shared file system):
    then each stage writes its slice of a finished job there and rank 0 writes the job's
    adapter at once; otherwise the slices are gathered at the end of the run."""
    seen = [False] * dist.get_world_size()
    dist.all_gather_object(seen, (out / marker).is_file())
    if rank == 0:
        (out / marker).unlink(missing_ok=True)
    return all(seen)


def slices_dir(out: Path, job: str) -> Path:
    """Where the stages put their slices of a finished job for rank 0 (removed once written)."""
    return job_dir(out, job) / ".stage-slices"


def on_host(tree: Any) -> Any:
    """A stage's slice with its tensors copied to the CPU, for gather_object."""
    return map_tensors(tree, lambda t: t.detach().cpu())


def write_job_output(job: JobState, folder: Path, slices: list[dict[str, Any]], model_path: str) -> None:
    """One PEFT folder (or MeteoRA folder) from every stage's slice of the job, in stage order."""
    if job.spec.kind == "meteora":
        write_meteora_slices(folder, slices)
        return
    weights: dict[str, Any] = {}
    for stage_weights in slices:
        weights.update(stage_weights)
    save_adapter(folder, adapter_meta(job.spec, model_path), weights)


def evaluated_steps(metrics: Path) -> set[int]:
    """The steps a job's metrics.jsonl holds an evaluation row for."""
    if not metrics.is_file():
        return set()
    rows = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
    return {r["step"] for r in rows if r.get("kind") == "eval"}


def stage_slice(adapter: Any) -> dict[str, Any]:
    """What this stage holds of a finished job (its tensors where they are), for rank 0 to write."""
    if isinstance(adapter, StageAdapter):
        return {p: (a.detach(), b.detach()) for p, a, b in adapter.named_tensors()}
    return meteora_slice(adapter)


class PipelineMonitor:
    """Rank 0's metrics, from losses as they arrive, and outputs: a job's adapter is
    written as soon as its training and evaluations are done and every stage's final
    slice is on disk (a shared output folder), else at the end of the run; the job
    counts as finished once its adapter is written, as in one process."""

    POLL_S = 0.2  # how often rank 0 looks for the slices of jobs it is waiting to write

    def __init__(self, driver: Driver | None, spec: RunSpec, n_stages: int, writer: BackgroundWriter,
                 shared: bool) -> None:
        from mlora.monitor import (
            JsonlSink,
            LiveView,
            MultiSink,
            RunSummary,
            TensorBoardSink,
        )

        assert driver is not None
        self.driver, self.spec, self.n_stages = driver, spec, n_stages
        self.writer, self.shared = writer, shared
        self.submitted: set[str] = set()  # adapter writes handed to the writer
        self._polled = 0.0
        self.out = driver.out
        self.summary = RunSummary(
            name=spec.run.name or Path(spec.source).stem, output_dir=str(self.out), device="pipeline", n_stages=n_stages,
            host=socket.gethostname(), pid=os.getpid(),
        )
        self.sink = MultiSink([JsonlSink(self.out), TensorBoardSink(self.out)])
        self.live = LiveView(enabled=driver.live_flag, log_every_s=spec.run.log_every_s)
        now = time.time()
        for job in driver.jobs.values():
            self.summary.job_queued(job.name, job.max_steps, now)
            if job.status == "finished":
                self.summary.restore_job(job.name, None)

    def start(self, predicted_bubble: float) -> None:
        self.summary.set_run_info(predicted_bubble_fraction=predicted_bubble)  # `mlora status` shows it from the start
        self.summary.save(self.out / SUMMARY)
        self.live.__enter__()

    def forwarded(self, plan: MicroBatchPlan) -> None:
        self.poll()
        if plan.batch.is_eval:
            return
        for s in plan.batch.slices:
            job = self.driver.jobs[s.job]
            if job.status == "queued":
                job.status = "running"
                self.summary.job_started(s.job, time.time(), steps=job.step, tokens=job.tokens)
            job.tokens += s.tokens

    def loss(self, job_name: str, step: int, loss: float) -> None:
        job = self.driver.jobs[job_name]
        job.losses.append(loss)
        now = time.time()
        lr = self._lr(job, step)
        self.summary.job_progress(job_name, step + 1, job.tokens, loss, now)
        self.sink.log_train(self.summary.train_row(job_name, loss=loss, lr=lr, t=now, epoch=job.steps[step].epoch))
        if step + 1 == job.max_steps and not job.evaluates_after(job.max_steps):
            self._trained(job)
        self.live.update(self.summary)

    def evaluated(self, job_name: str, step: int, loss_sum: float) -> None:
        """An evaluation's loss, summed over its target tokens on the last stage, arrived."""
        job = self.driver.jobs[job_name]
        now = time.time()
        eval_loss = loss_sum / max(1, job.eval_targets())
        self.summary.job_eval(job_name, eval_loss)
        self.sink.log_eval({"kind": "eval", "job": job_name, "step": step, "eval_loss": eval_loss, "time": now})
        if step == job.max_steps:  # its last step's loss came in before it
            self._trained(job)
        self.live.update(self.summary)

    def _trained(self, job: JobState) -> None:
        """Its last loss and evaluation are in: its adapter is written next."""
        job.status = "writing"
        self.poll(force=True)

    def poll(self, force: bool = False) -> None:
        """Hand the writer each trained job whose every stage has put its final slice on disk."""
        now = time.time()
        if not self.shared or (not force and now - self._polled < self.POLL_S):
            return
        self._polled = now
        for job in self.driver.jobs.values():
            folder = slices_dir(self.out, job.name)
            if job.status == "writing" and job.name not in self.submitted and all(
                (folder / f"stage{k}.pt").is_file() for k in range(self.n_stages)
            ):
                self._submit(job)

    def _submit(self, job: JobState) -> None:
        folder, stages, model = job_dir(self.out, job.name), slices_dir(self.out, job.name), self.spec.model.path

        def write() -> None:
            write_job_output(job, folder, [read_stage_slice(stages, k) for k in range(self.n_stages)], model)
            shutil.rmtree(stages)

        self.writer.submit_folder(job.name, folder, write)
        self.submitted.add(job.name)

    def collect(self, block: bool = False) -> None:
        for written in self.writer.collect(block):
            self._written(written)

    def _written(self, written: Written) -> None:
        job = self.driver.jobs[written.job]
        job.status = "finished"
        self.summary.job_finished(job.name, written.time, None, str(written.folder))
        self.summary.save(self.out / SUMMARY)
        self.live.update(self.summary)

    @staticmethod
    def _lr(job: JobState, step: int) -> float:
        from mlora.jobs import lr_factor

        s = job.spec
        return s.learning_rate * lr_factor(step, s.warmup_steps, job.max_steps, s.lr_scheduler)

    def checkpoint(self, job_name: str, step: int, folder: Path) -> None:
        job = self.driver.jobs[job_name]
        state = {"step": step, "tokens": job.tokens, "losses": job.losses[:step], "adapter": adapter_signature(job.spec)}
        folder.mkdir(parents=True, exist_ok=True)  # the stages' slices may still be on their way
        tmp = folder / f".{STATE}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, folder / STATE)

    def interrupted(self, plan: PipelinePlan, signum: int, n_ranks: int) -> None:
        """Ctrl-C or SIGTERM: adapters handed to the writer are written, the other jobs of
        this run are stopped, the run is interrupted, and how to go on is printed."""
        try:
            self.collect(block=True)
        except Exception as exc:  # the interrupt is what the user needs to hear about
            print(f"mlora: {exc}", file=sys.stderr, flush=True)
        for name in plan.active:
            job = self.driver.jobs[name]
            if job.status in ("running", "writing"):
                job.status = "stopped"
                self.summary.job_stopped(name)
        self.summary.run_finished(time.time(), "interrupted")
        self.summary.save(self.out / SUMMARY)
        self.sink.close()
        self.live.__exit__(None, None, None)
        self.live.print_table(self.summary)
        print(f"mlora: interrupted ({signal.Signals(signum).name}); the same launch with --resume continues "
              f"(`torchrun --nproc-per-node {n_ranks} -m mlora train {self.spec.source} --resume`: each unfinished "
              "job from its last checkpoint, or from the start without one)", file=sys.stderr, flush=True)

    def finish(self, plan: PipelinePlan, gathered: list[Any]) -> None:
        """The end: the adapters not yet written (all of them without a shared folder), the
        trace and the summary."""
        events = [e for _, evs, _ in gathered for e in evs]
        peaks = [peak for _, _, peak in gathered]
        for name in plan.active:
            job = self.driver.jobs[name]
            if self.shared:
                if name not in self.submitted:
                    self._submit(job)  # every stage's slice is on disk: they were written before the gather
            else:
                folder = job_dir(self.out, name)
                write_job_output(job, folder, [slices[name] for slices, _, _ in gathered], self.spec.model.path)
                self._written(Written(name, folder, time.time()))
        self.collect(block=True)
        for name in plan.active:
            self.summary.jobs[name].peak_memory_bytes = max(peaks)
        trace = to_chrome_trace(events, n_stages=self.n_stages)
        (self.out / TRACE).write_text(json.dumps(trace))
        bubble = bubble_from_events(events, self.n_stages)
        self.summary.set_run_info(bubble_fraction=bubble, peak_memory_per_stage=peaks)
        self.summary.run_finished(time.time(), "finished")
        self.summary.save(self.out / SUMMARY)
        self.sink.close()
        self.live.__exit__(None, None, None)
        self.live.print_table(self.summary)
        print(f"measured bubble fraction: {bubble:.3f} (trace: {self.out / TRACE})", flush=True)
