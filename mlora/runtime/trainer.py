"""The training recipe: many LoRA jobs over one frozen base, in one process.

Read it top to bottom: check everything, load the base once, then loop — admit queued
jobs, fuse the running jobs' next micro-batches into one batch, one forward and one
backward, and step each job whose gradient accumulation is complete. A job that ends
hands its PEFT adapter to a writer thread while the others go on; it counts as finished
once the adapter is on disk.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mlora.config import ALL_TARGET_MODULES, JobSpec, RunSpec
from mlora.jobs import JobOptimizer, JobState, PendingMicro, plan_steps
from mlora.meteora.gate import gate_step_terms
from mlora.model.lora_linear import BatchLayout, StageAdapter
from mlora.model.loss import job_loss_sums
from mlora.model.peft_io import (
    AdapterError,
    AdapterMeta,
    load_adapter,
    read_adapter_meta,
)
from mlora.model.stage import StageModel, base_linear_shapes, load_stage
from mlora.runtime.background_writer import BackgroundWriter, Written, snapshot
from mlora.runtime.batch import collate, padded_length
from mlora.runtime.checkpoint import (
    adapter_signature,
    check_resumable,
    latest_checkpoint,
    read_stage_slice,
    read_state,
)
from mlora.runtime.deferred import DeferredScalar
from mlora.runtime.meteora_jobs import (
    check_meteora_inputs,
    gated_linears,
    make_meteora_on_stage,
    run_dependencies,
    with_relative_folders,
)
from mlora.runtime.output import SUMMARY, is_finished, job_dir, prepare_output
from mlora.runtime.setup import (
    build_job_states,
    check_backend,
    load_tokenizer,
    out_of_memory_advice,
    resolve_device,
    warn_about_data,
)
from mlora.runtime.step_graphs import StepGraphs
from mlora.schedule.planner import Candidate, plan_fused_batch, split_by_length


MAX_BATCHES_AHEAD = 2  # fused batches the host may queue beyond the one the GPU is on


@dataclass(frozen=True)
class StepLog:
    """A finished optimizer step whose loss may still be on its way from the GPU."""

    job: str
    step: int
    tokens: int
    lr: float
    loss: DeferredScalar
    time: float
    extra: dict[str, DeferredScalar] = field(default_factory=dict)  # MeteoRA: gate_loss, route_acc


@dataclass
class RunResult:
    output_dir: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    interrupted_by: int | None = None  # the signal that stopped the run: SIGINT (Ctrl-C) or SIGTERM
    failed: str | None = None  # why the run stopped with an error it could say in a line (out of GPU memory)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def adapter_meta(spec: JobSpec, model_path: str) -> AdapterMeta:
    return AdapterMeta(
        r=spec.lora_r,
        alpha=spec.lora_alpha,
        dropout=spec.lora_dropout,
        use_rslora=spec.use_rslora,
        target_modules=spec.target_modules,
        base_model=model_path,
    )


def check_init_adapter(spec: JobSpec, source: str) -> None:
    """An init_from adapter must match the job's rank, alpha and targets: say which differs."""
    if spec.init_from is None:
        return
    try:
        meta = read_adapter_meta(Path(spec.init_from))
    except AdapterError as exc:
        raise AdapterError(f"{source}: job {spec.name!r}: init_from: {exc}") from exc
    for name, mine, theirs in (
        ("lora_r", spec.lora_r, meta.r),
        ("lora_alpha", spec.lora_alpha, meta.alpha),
        ("target_modules", tuple(sorted(spec.target_modules)), meta.target_modules),
        ("use_rslora", spec.use_rslora, meta.use_rslora),
    ):
        if mine != theirs:
            raise AdapterError(
                f"{source}: job {spec.name!r}: init_from: adapter {spec.init_from} has {name}={theirs!r}, job has {mine!r}"
            )


def make_adapter(spec: JobSpec, stage: StageModel, device: torch.device) -> StageAdapter:
    """A fresh PEFT-initialised adapter, or the init_from adapter's weights, for this stage."""
    shapes = stage.linear_shapes(spec.target_modules)
    adapter = StageAdapter.create(
        spec.name, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.use_rslora, shapes, spec.seed, device
    )
    if spec.init_from is not None:
        _, weights = load_adapter(Path(spec.init_from))
        with torch.no_grad():
            for path in shapes:
                if path not in weights:
                    raise AdapterError(f"job {spec.name!r}: init_from {spec.init_from} lacks {path}")
                a, b = weights[path]
                adapter.a[path].copy_(a)
                adapter.b[path].copy_(b)
    return adapter


@dataclass
class Prepared:
    """Everything a run needs, checked and loaded: what `Trainer` runs over."""

    spec: RunSpec
    jobs: list[JobState]
    stage: StageModel
    pad_id: int
    out: Path
    device: torch.device


def prepare(spec: RunSpec, *, resume: bool = False, overwrite: bool = False) -> Prepared:
    """Check every input, then claim the output folder, then load the base once.

    The order matters: a bad dataset or adapter is reported before the output folder
    is touched and before any weight is read.
    """
    device = resolve_device(spec.model.device, spec.source)
    check_backend(spec, device)
    tokenizer = load_tokenizer(spec.model.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for job_spec in spec.jobs:
        check_init_adapter(job_spec, spec.source)
    if any(j.kind == "meteora" for j in spec.jobs):
        check_meteora_inputs(spec, *base_linear_shapes(spec.model.path))
    jobs = build_job_states(spec, tokenizer, plan_steps)
    out = prepare_output(Path(spec.run.output_dir), resume, overwrite)
    if resume:
        check_resumable(spec, out)
    warn_about_data(jobs)
    stage = load_stage(
        spec.model.path, dtype=spec.model.dtype, device=device, attn_implementation=spec.model.attn_implementation
    )
    return Prepared(spec, jobs, stage, pad_id, out, device)


class StopSignal:
    """While entered, SIGTERM (a scheduler's or `kill`'s polite stop) interrupts the run as
    Ctrl-C does, so it too ends with its outputs written and its state saved; `received`
    says which one came. Only the main thread can take signals; elsewhere it does nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        raise KeyboardInterrupt

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """State of one single-process run over prepared parts; `run()` is the loop."""

    def __init__(
        self,
        prepared: Prepared,
        *,
        resume: bool = False,
        live: bool | None = None,
        console: Any = None,
        stop_after_batches: int | None = None,
    ) -> None:
        from mlora.monitor import (
            JsonlSink,
            LiveView,
            MultiSink,
            RunSummary,
            TensorBoardSink,
        )

        spec = self.spec = prepared.spec
        self.device, self.pad_id, self.out = prepared.device, prepared.pad_id, prepared.out
        self.jobs: dict[str, JobState] = {j.name: j for j in prepared.jobs}
        self.stage = prepared.stage
        self.stage.routing.backend = spec.run.backend
        self.stage.gradient_checkpointing = spec.run.gradient_checkpointing
        self.optimizers: dict[str, JobOptimizer] = {}
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # streams, events and graphs belong to the current device
        self.writer = BackgroundWriter(self.device)  # adapters and checkpoints go to disk beside training
        # CUDA graphs replay recurring batch shapes with one launch (mlora/runtime/step_graphs.py);
        # a recording and the writer's copies off the GPU take turns (`BackgroundWriter.device_lock`)
        # (not with gradient checkpointing: a block rerun in the backward would draw its dropout
        # masks from the graphs' kept generators, already advanced)
        self.graphs = (StepGraphs(self.stage, recording_lock=self.writer.device_lock)
                       if spec.run.cuda_graphs and not spec.run.gradient_checkpointing and self.device.type == "cuda"
                       else None)
        self.stop_after_batches = stop_after_batches
        self._logs: deque[StepLog] = deque()
        self._in_flight: deque[torch.cuda.Event] = deque()
        self.result = RunResult(self.out)
        self._where: str | tuple[BatchLayout, list[JobState]] = "starting the run"  # for an out-of-memory message
        self.loss_scaling = spec.model.dtype == "float16"  # one dynamic loss scale per job (jobs.loss_scale)

        previous = RunSummary.load(self.out / SUMMARY) if resume and (self.out / SUMMARY).is_file() else None
        self.summary = RunSummary(
            name=spec.run.name or Path(spec.source).stem, output_dir=str(self.out), device=str(self.device), n_stages=1,
            host=socket.gethostname(), pid=os.getpid(),
        )
        self.sink = MultiSink([JsonlSink(self.out), TensorBoardSink(self.out)])
        self.live = LiveView(enabled=live, console=console, log_every_s=spec.run.log_every_s)
        now = time.time()
        for job in self.jobs.values():
            self.summary.job_queued(job.name, job.max_steps, now)
            if resume:
                self._restore(job, previous)

    # ----------------------------------------------------------------- resume
    def _restore(self, job: JobState, previous: Any) -> None:
        """Finished jobs stay finished; others continue from their newest checkpoint."""
        folder = job_dir(self.out, job.name)
        if is_finished(folder):
            job.step, job.status = job.max_steps, "finished"
            self.summary.restore_job(job.name, previous)
            self.result.adapters[job.name] = folder
            return
        ckpt = latest_checkpoint(self.out, job.name)
        if ckpt is not None:
            state = read_state(ckpt)
            job.step, job.tokens, job.losses = state["step"], state["tokens"], state["losses"]
            job.resume_slice = read_stage_slice(ckpt, 0)  # applied when the job starts
        truncate_metrics(folder / "metrics.jsonl", job.step)

    # ------------------------------------------------------------------- loop
    def run(self) -> RunResult:
        self.summary.save(self.out / SUMMARY)
        stop = StopSignal()
        with self.live, stop:
            try:
                self._loop()
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: end as a stopped run, keeping what is written
                self.result.interrupted_by = stop.received or signal.SIGINT
                self._collect_writes(block=True)  # adapters already handed over reach the disk
            except torch.OutOfMemoryError:  # a batch too large for the GPU: say which setting to change
                self.result.failed = out_of_memory_advice(self.spec, self._doing())
                self._collect_writes(block=True)
            except Exception as exc:  # anything else: the summary says failed, and why, then it goes on up
                unfinished = [job.name for job in self.jobs.values() if job.status in ("running", "writing")]
                self.summary.run_finished(time.time(), "failed", unfinished, f"{type(exc).__name__}: {exc}")
                self.summary.save(self.out / SUMMARY)
                raise
            finally:
                self.writer.close()  # even when the run fails: finished jobs' adapters reach the disk
        self._flush_logs(block=True)
        finished = all(j.status == "finished" for j in self.jobs.values())
        state = ("finished" if finished else "interrupted" if self.result.interrupted_by
                 else "failed" if self.result.failed else "stopped")
        unfinished = [job.name for job in self.jobs.values() if job.status == "running"]
        self.summary.run_finished(time.time(), state, unfinished, self.result.failed)
        self.summary.save(self.out / SUMMARY)
        self.sink.close()
        self.live.print_table(self.summary)
        if self.result.failed:
            print(f"mlora: {self.result.failed}", file=sys.stderr, flush=True)
        if self.result.interrupted_by:
            name = signal.Signals(self.result.interrupted_by).name
            print(f"mlora: interrupted ({name}); continue with `mlora train {self.spec.source} --resume` (each "
                  "unfinished job from its last checkpoint, or from the start without one)", file=sys.stderr, flush=True)
        return self.result

    def _doing(self) -> str:
        """What the trainer was doing, in words (formatted only when an error needs it)."""
        if isinstance(self._where, str):
            return self._where
        layout, jobs = self._where
        return f"in a fused batch of {layout.rows} rows x {layout.seq_len} tokens (jobs {', '.join(j.name for j in jobs)})"

    def _loop(self) -> None:
        """Fused batches until every job is finished (or `stop_after_batches`)."""
        batches = 0
        turn = 0
        while True:
            self._collect_writes(block=False)
            self._admit()
            running = [j for j in self.jobs.values() if j.status == "running"]
            if not running:
                if not self.writer.pending:
                    break
                self._collect_writes(block=True)  # a queued job may wait on one of them
                continue
            self._train_one_batch(running, turn)
            self._keep_close_to_the_gpu()
            self._flush_logs(block=False)
            turn += 1
            batches += 1
            self.live.update(self.summary)
            if self.stop_after_batches is not None and batches >= self.stop_after_batches:
                self.result.stopped_early = True
                break
        self._collect_writes(block=True)

    def _keep_close_to_the_gpu(self) -> None:
        """Let the host run at most MAX_BATCHES_AHEAD batches ahead of the GPU.

        Nothing in a step waits for the GPU, so without a bound a fast host (CUDA
        graphs) would queue the whole run: step times and ETAs would be issue times,
        and pinned buffers would pile up. Two batches ahead keeps the GPU fed.
        """
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record()
        self._in_flight.append(event)
        while len(self._in_flight) > MAX_BATCHES_AHEAD:
            self._in_flight.popleft().synchronize()

    def _admit(self) -> None:
        """Start queued jobs, in file order, while fewer than max_concurrent_jobs run."""
        running = sum(1 for j in self.jobs.values() if j.status == "running")
        for job in self.jobs.values():
            if running >= self.spec.run.max_concurrent_jobs:
                return
            if job.status != "queued" or not self._dependencies_done(job):
                continue
            self._where = f"starting job {job.name} (its adapter and optimizer)"
            adapter = self._make_adapter(job)
            self.stage.routing.adapters[job.name] = adapter
            opt = JobOptimizer(job.spec, adapter, job.max_steps, self.device, loss_scaling=self.loss_scaling)
            if job.resume_slice is not None:
                opt.load_state_dict(job.resume_slice)
                job.resume_slice = None
            self.optimizers[job.name] = opt
            job.status = "running"
            self.summary.job_started(job.name, time.time(), steps=job.step, tokens=job.tokens)
            self.summary.save(self.out / SUMMARY)  # `mlora status` sees it start (and from which step)
            running += 1

    def _dependencies_done(self, job: JobState) -> bool:
        """A MeteoRA job mixing LoRA jobs of this run waits until they have written their adapters."""
        return all(self.jobs[d].status == "finished" for d in run_dependencies(job.spec, self.spec))

    def _make_adapter(self, job: JobState) -> Any:
        if job.spec.kind != "meteora":
            return make_adapter(job.spec, self.stage, self.device)
        shapes = self.stage.linear_shapes(ALL_TARGET_MODULES)
        n_layers = int(self.stage.config.num_hidden_layers)
        # the run's LoRA jobs it mixes are finished and written: every adapter comes from its folder
        adapter = make_meteora_on_stage(job.spec, self.spec, self.out, {}, shapes, self.device, self.spec.run.backend)
        job.gate_count = gated_linears(job.spec, self.spec, n_layers)
        return adapter

    def _train_one_batch(self, running: list[JobState], turn: int) -> None:
        pending = [j.pending() for j in running]
        multiple = self.spec.run.pad_to_multiple_of
        longest = [max(len(self.jobs[p.job].train[i].input_ids) for i in p.examples) for p in pending]
        candidates = [Candidate(p.job, len(p.examples), padded_length(n, multiple)) for p, n in zip(pending, longest)]
        picked = plan_fused_batch(candidates, self.spec.run.max_tokens_per_batch, turn)
        for one_pass in split_by_length(candidates, picked):
            self._forward_backward([pending[i] for i in one_pass])

    def _forward_backward(self, chosen: list[PendingMicro]) -> None:
        """One forward and one backward over these jobs' micro-batches, fused."""
        jobs = [self.jobs[m.job] for m in chosen]
        # Each job's loss is the mean over its whole step's target tokens, so every
        # micro-batch's token-loss sum is divided by that step's count.
        batch = collate(
            chosen,
            [[j.train[i] for i in m.examples] for j, m in zip(jobs, chosen)],
            [j.spec.seed for j in jobs],
            self.pad_id,
            self.device,
            loss_weights=[1.0 / j.step_targets(m.step) for j, m in zip(jobs, chosen)],
            with_tasks=[j.spec.kind == "meteora" for j in jobs],
            pad_to_multiple_of=self.spec.run.pad_to_multiple_of,
        )
        scales = None
        if self.loss_scaling:  # float16: each job's loss times its scale (a power of two: exact)
            scales = torch.stack([self.optimizers[j.name].scaler.scale for j in jobs])  # type: ignore[union-attr]
            batch = replace(batch, loss_weights=batch.loss_weights * scales)
        self._where = (batch.layout, jobs)
        adapters = [self.stage.routing.adapters[j.name] for j in jobs]
        graphed = self.graphs.step(batch, adapters) if self.graphs is not None else None
        if graphed is not None:
            per_job = graphed
        else:
            hidden = self.stage(batch.input_ids, batch.layout)
            per_job = job_loss_sums(self.stage.lm_head, hidden, batch.targets, self.stage.fused_loss) * batch.loss_weights
            total = per_job.sum()
            for k, (job, micro) in enumerate(zip(jobs, chosen)):
                if job.spec.kind == "meteora":
                    gate = self._gate_loss(job, micro.step, batch.task_labels[k])
                    total = total + (gate if scales is None else gate * scales[k])
            total.backward()
            per_job = per_job.detach()
        if scales is not None:
            per_job = per_job / scales
        for k, job in enumerate(jobs):
            job.loss_sum = job.loss_sum + per_job[k]
            if job.micro_done(batch.tokens[k]):
                self._finish_step(job)

    def _gate_loss(self, job: JobState, step: int, task: Any) -> Any:
        """coef × this micro-batch's share of the step's mean gate cross-entropy.

        The mean is over every gated linear and every real token of the job's step,
        so it, like the LM loss, does not depend on how the step is cut or fused.
        """
        adapter = self.stage.routing.adapters[job.name]
        ce, hits = gate_step_terms(adapter.take_gate_logits(), task)
        denom = float(job.gate_count * job.step_tokens(step))
        for key, value in (("gate_loss", ce.detach() / denom), ("route_acc", hits / denom)):
            job.gate_sums[key] = job.gate_sums.get(key, 0.0) + value
        return job.spec.gate_loss_coef * ce / denom

    def _finish_step(self, job: JobState) -> None:
        opt = self.optimizers[job.name]
        extra = {k: DeferredScalar(v) for k, v in job.gate_sums.items()}
        if opt.scaler is not None:  # the scale this step's loss was multiplied by
            extra["loss_scale"] = DeferredScalar(opt.scaler.scale.clone())
        self._logs.append(StepLog(job.name, job.step, job.tokens, opt.lr, DeferredScalar(job.loss_sum), time.time(), extra))
        opt.step(opt.grad_sq_norm().sqrt())
        job.loss_sum = 0.0
        job.gate_sums = {}
        spec = job.spec
        eval_due = job.evaluates_after(job.step)
        save_due = spec.save_steps is not None and job.step % spec.save_steps == 0 and not job.done
        if eval_due or save_due or job.done:
            self._flush_logs(block=True)
        if eval_due:
            eval_loss = self.evaluate(job)
            self.summary.job_eval(job.name, eval_loss)
            self.sink.log_eval({"kind": "eval", "job": job.name, "step": job.step, "eval_loss": eval_loss, "time": time.time()})
        if save_due:
            state = {"step": job.step, "tokens": job.tokens, "losses": list(job.losses), "adapter": adapter_signature(spec),
                     "split": [list(self.stage.bounds.halves)]}
            self.writer.submit_checkpoint(job.name, self.out, job.step, snapshot(opt.state_dict()), state,
                                          keep=spec.save_total_limit)
        if job.done:
            self._finish_job(job)

    def _flush_logs(self, block: bool) -> None:
        """Log finished steps whose loss has reached the host (all of them if block)."""
        while self._logs and (block or self._logs[0].loss.ready()):
            rec = self._logs.popleft()
            loss = rec.loss.get()
            job = self.jobs[rec.job]
            job.losses.append(loss)
            self.summary.job_progress(rec.job, rec.step, rec.tokens, loss, rec.time)
            epoch = job.steps[rec.step - 1].epoch
            row = self.summary.train_row(rec.job, loss=loss, lr=rec.lr, t=rec.time, epoch=epoch)
            row.update({k: v.get() for k, v in rec.extra.items()})
            self.sink.log_train(row)

    def _finish_job(self, job: JobState) -> None:
        """Free the job's slot and hand its adapter (or MeteoRA folder) to the writer; the
        other jobs go on."""
        adapter = self.stage.routing.adapters.pop(job.name)
        if self.graphs is not None:
            self.graphs.forget(job.name)
        del self.optimizers[job.name]
        folder = job_dir(self.out, job.name)
        job.status = "writing"
        if job.spec.kind == "meteora":
            save = with_relative_folders(adapter, folder).save
            self.writer.submit_folder(job.name, folder, lambda: save(folder))
            return
        self.writer.submit_adapter(job.name, folder, adapter_meta(job.spec, self.spec.model.path),
                                   {p: (a, b) for p, a, b in adapter.named_tensors()})

    def _collect_writes(self, block: bool) -> None:
        for written in self.writer.collect(block):
            self._job_written(written)

    def _job_written(self, written: Written) -> None:
        """The job's adapter is on disk: now it is finished."""
        job = self.jobs[written.job]
        job.status = "finished"
        self.result.adapters[job.name] = written.folder
        self.result.final_loss[job.name] = job.losses[-1]
        self.summary.job_finished(job.name, written.time, peak_memory_bytes(self.device), str(written.folder))
        self.summary.save(self.out / SUMMARY)

    @torch.no_grad()
    def evaluate(self, job: JobState) -> float:
        """Mean next-token loss over the job's held-out examples (no dropout)."""
        total = torch.zeros((), device=self.device)
        for i, exs in enumerate(job.eval_batches()):
            pm = PendingMicro(job.name, -1, i, True, tuple(range(len(exs))))
            batch = collate([pm], [exs], [job.spec.seed], self.pad_id, self.device, training=False)
            hidden = self.stage(batch.input_ids, batch.layout)
            if job.spec.kind == "meteora":
                self.stage.routing.adapters[job.name].take_gate_logits()  # not trained on here
            total += job_loss_sums(self.stage.lm_head, hidden, batch.targets, self.stage.fused_loss)[0]
        return float(total) / max(1, job.eval_targets())


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric rows past the checkpoint a resumed job restarts from."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def train(spec: RunSpec, *, resume: bool = False, overwrite: bool = False, **kwargs: Any) -> RunResult:
    """Train every job of the run file; see Trainer for the other keyword options."""
    prepared = prepare(spec, resume=resume, overwrite=overwrite)
    return Trainer(prepared, resume=resume, **kwargs).run()

