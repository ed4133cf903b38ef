"""Pipeline training across processes: one stage per rank, jobs interleaved, no flush.

Launched by `torchrun --nproc-per-node P -m mlora train RUN.yaml`. Read top to bottom:

1. every rank parses the run file; rank 0 (the driver) checks data and output, plans
   the whole run as micro-batches, builds and validates the per-stage action lists;
2. rank 0 broadcasts the plan; each rank loads only its own blocks' tensors and creates
   its slice of every job's adapter and optimizer;
3. each rank executes its action list (StageWorker); token ids leave rank 0, targets go
   from rank 0 to the last rank, losses (and evaluation losses, of held-out rows
   forwarded between two of a job's steps) come back to rank 0 with the gradients;
4. a job's final slices go to rank 0 as it ends (through the shared output folder, else
   gathered at the end), which writes its PEFT folder at once (pipeline_monitor.py);
   the trace and the run summary are gathered and written at the end.

Rank 0's plan is pipeline_plan.py; its view of the run as it goes, pipeline_monitor.py.

A 1-process run never comes here: it is the single-process Trainer.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from mlora.config import ALL_TARGET_MODULES, ConfigError, RunSpec, load_run_file
from mlora.jobs import JobOptimizer
from mlora.model.lora_linear import StageAdapter
from mlora.model.loss import Targets
from mlora.model.stage import load_stage
from mlora.runtime.background_writer import BackgroundWriter, map_tensors, snapshot
from mlora.runtime.checkpoint import local_slices, read_stage_slice, step_dir
from mlora.runtime.meteora_jobs import make_meteora_on_stage, meteora_slice
from mlora.runtime.output import slices_dir
from mlora.runtime.pipeline_monitor import PipelineMonitor
from mlora.runtime.pipeline_plan import Driver, PipelinePlan
from mlora.runtime.setup import check_backend, out_of_memory_advice
from mlora.runtime.slice_pruning import SlicePruner
from mlora.runtime.stage_worker import StageWorker
from mlora.runtime.trainer import StopSignal, make_adapter, peak_memory_bytes
from mlora.runtime.transport import PipelineError, Transport


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_pipeline_launch() -> bool:
    return world()[1] > 1


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

    held: list[Any] | None = None
    if resume:  # each rank's own checkpoint slices: the ranks may not share the output folder
        mine = local_slices(Path(spec.run.output_dir), [j.name for j in spec.jobs], rank) if spec is not None else {}
        held = [None] * n_ranks
        dist.all_gather_object(held, mine)
    driver: Driver | None = None
    message: dict[str, Any] = {}
    if rank == 0:
        if error is None:
            assert spec is not None
            try:
                check_backend(spec, device)  # every stage's device is of rank 0's type
                driver = Driver(spec, n_ranks, resume, overwrite, live, held)
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
            optimizers[name] = JobOptimizer(specs[name], adapter, plan.total_steps[name], device,
                                           loss_scaling=spec.model.dtype == "float16")
            if plan.restored[name] is not None:
                optimizers[name].load_state_dict(read_stage_slice(Path(plan.restored[name]), rank))

    # every rank creates the groups, in the same order
    channels = {name: dist.new_group(timeout=timedelta(seconds=timeout)) for name in ("act", "grad", "targets")}
    transport = Transport(rank, device, timeout, lambda r: f"rank {r} (stage {r})", channels)
    writer = BackgroundWriter(device)  # this stage's checkpoint and final slices go to disk beside the pipeline
    monitor = PipelineMonitor(driver, spec, n_ranks, writer, shared) if rank == 0 else None
    limits = {j.name: j.save_total_limit for j in spec.jobs if j.save_total_limit is not None}
    # save_total_limit where rank 0 cannot see the other ranks' slices: the ranks agree by notes
    pruner = SlicePruner(out, rank, n_ranks, limits, plan.job_ids) if limits and not shared else None
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
        if pruner is not None:
            pruner.written(writer.slices_written)

    def on_step(job: str, step: int) -> None:
        collect_writes()
        save_steps = specs[job].save_steps
        if save_steps and (step + 1) % save_steps == 0 and step + 1 < plan.total_steps[job]:
            folder = step_dir(out, job, step + 1)
            writer.submit_stage_slice(job, folder, rank, snapshot(optimizers[job].state_dict()), step + 1)
            if monitor is not None:
                monitor.checkpoint(job, step + 1, folder)
        if shared and step + 1 == plan.total_steps[job]:  # its weights on this stage are final
            writer.submit_stage_slice(job, slices_dir(out, job), rank, stage_slice(stage.routing.adapters[job]))

    if monitor is not None:
        monitor.start(plan.predicted_bubble)
    events: list[Any] = []
    clock = None
    worker: StageWorker | None = None
    where = "starting the run"
    try:
        for names, schedule in plan.phases:
            worker, where = None, f"starting jobs {', '.join(names)} (their adapters and optimizers)"
            start_jobs(names)
            worker = StageWorker(
                rank, n_ranks, stage, optimizers, plan.job_ids, transport, plan.plans,
                token_ids=token_ids if rank == 0 else None,
                targets=recv_targets if rank == last else None,
                send_targets=send_targets if rank == 0 else None,
                on_loss=monitor.loss if monitor is not None else None,
                on_step=on_step,
                on_eval=monitor.evaluated if monitor is not None else None,
                pruner=pruner,
            )
            clock = worker.clock = clock or worker.clock  # one clock for the whole run's trace
            events += worker.run(schedule.stages[rank])
        transport.flush_sends()
        collect_writes(block=True)  # every stage's final slices are on disk before the gather
        if pruner is not None:
            pruner.settle()
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
    except (PipelineError, torch.OutOfMemoryError) as exc:
        error = exc
        if isinstance(exc, torch.OutOfMemoryError):  # say which setting to change; the others stop as for a lost rank
            where = worker.doing() if worker is not None and worker.current is not None else where
            error = PipelineError(f"rank {rank} (stage {rank}): {out_of_memory_advice(spec, where)}")
        if monitor is not None:  # rank 0 keeps why, for `mlora status`
            monitor.failed(plan, str(error))
        if error is exc:
            raise
        raise error from exc
    finally:
        writer.close()  # writes already handed over reach the disk
    dist.destroy_process_group()
    return 0


def output_is_shared(out: Path, marker: str, rank: int) -> bool:
    """Whether every rank sees rank 0's output folder (one host, or a shared file system):
    then each stage writes its slice of a finished job there and rank 0 writes the job's
    adapter at once; otherwise the slices are gathered at the end of the run."""
    seen = [False] * dist.get_world_size()
    dist.all_gather_object(seen, (out / marker).is_file())
    if rank == 0:
        (out / marker).unlink(missing_ok=True)
    return all(seen)


def on_host(tree: Any) -> Any:
    """A stage's slice with its tensors copied to the CPU, for gather_object."""
    return map_tensors(tree, lambda t: t.detach().cpu())


def stage_slice(adapter: Any) -> dict[str, Any]:
    """What this stage holds of a finished job (its tensors where they are), for rank 0 to write."""
    if isinstance(adapter, StageAdapter):
        return {p: (a.detach(), b.detach()) for p, a, b in adapter.named_tensors()}
    return meteora_slice(adapter)
