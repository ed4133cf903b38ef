"""Rank 0's view of a pipeline run as it goes: progress and evaluations from the losses
that arrive, each job's adapter written once every stage's final slice is in, the trace
and the run summary at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from mlora.config import RunSpec
from mlora.jobs import JobState
from mlora.model.peft_io import save_adapter
from mlora.runtime.background_writer import BackgroundWriter, Written
from mlora.runtime.checkpoint import STATE, adapter_signature, prune_checkpoints, read_stage_slice
from mlora.runtime.meteora_jobs import write_meteora_slices
from mlora.runtime.output import SUMMARY, TRACE, job_dir, slices_dir
from mlora.runtime.pipeline_plan import Driver, PipelinePlan
from mlora.runtime.stage_worker import MicroBatchPlan
from mlora.runtime.trainer import adapter_meta
from mlora.schedule.trace import bubble_from_events, to_chrome_trace


def write_job_output(job: JobState, folder: Path, slices: list[dict[str, Any]], model_path: str) -> None:
    """One PEFT folder (or MeteoRA folder) from every stage's slice of the job, in stage order."""
    if job.spec.kind == "meteora":
        write_meteora_slices(folder, slices)
        return
    weights: dict[str, Any] = {}
    for stage_weights in slices:
        weights.update(stage_weights)
    save_adapter(folder, adapter_meta(job.spec, model_path), weights)


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

    def loss(self, job_name: str, step: int, loss: float, extras: dict[str, float] | None = None) -> None:
        """A step's loss arrived (with, as one process logs them, its float16 loss scale and
        a MeteoRA job's gate loss and routing accuracy)."""
        job = self.driver.jobs[job_name]
        job.losses.append(loss)
        now = time.time()
        lr = self._lr(job, step)
        self.summary.job_progress(job_name, step + 1, job.tokens, loss, now)
        row = self.summary.train_row(job_name, loss=loss, lr=lr, t=now, epoch=job.steps[step].epoch)
        self.sink.log_train({**row, **(extras or {})})
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
        self._prune(job)  # its last checkpoint's slices are written by now

    def _prune(self, job: JobState) -> None:
        """save_total_limit: delete the job's checkpoints older than its newest complete
        ones. Only rank 0 can see whether a folder is complete, and only if the ranks
        share the output folder; elsewhere every checkpoint stays."""
        if self.shared and job.spec.save_total_limit is not None:
            prune_checkpoints(self.out, job.name, job.spec.save_total_limit, self.n_stages)

    @staticmethod
    def _lr(job: JobState, step: int) -> float:
        from mlora.jobs import lr_factor

        s = job.spec
        return s.learning_rate * lr_factor(step, s.warmup_steps, job.max_steps, s.lr_scheduler)

    def checkpoint(self, job_name: str, step: int, folder: Path) -> None:
        job = self.driver.jobs[job_name]
        state = {"step": step, "tokens": job.tokens, "losses": job.losses[:step], "adapter": adapter_signature(job.spec),
                 "split": [list(b.halves) for b in self.driver.bounds]}
        folder.mkdir(parents=True, exist_ok=True)  # the stages' slices may still be on their way
        tmp = folder / f".{STATE}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, folder / STATE)
        self._prune(job)

    def interrupted(self, plan: PipelinePlan, signum: int, n_ranks: int) -> None:
        """Ctrl-C or SIGTERM: adapters handed to the writer are written, the other jobs of
        this run are stopped, the run is interrupted, and how to go on is printed."""
        try:
            self.collect(block=True)
        except Exception as exc:  # the interrupt is what the user needs to hear about
            print(f"mlora: {exc}", file=sys.stderr, flush=True)
        unfinished = self._unfinished(plan)
        for name in unfinished:
            self.driver.jobs[name].status = "stopped"
        self.summary.run_finished(time.time(), "interrupted", unfinished)
        self.summary.save(self.out / SUMMARY)
        self.sink.close()
        self.live.__exit__(None, None, None)
        self.live.print_table(self.summary)
        print(f"mlora: interrupted ({signal.Signals(signum).name}); the same launch with --resume continues "
              f"(`torchrun --nproc-per-node {n_ranks} -m mlora train {self.spec.source} --resume`: each unfinished "
              "job from its last checkpoint, or from the start without one)", file=sys.stderr, flush=True)

    def failed(self, plan: PipelinePlan, error: str) -> None:
        """A rank was lost, or this one ran out of memory: before rank 0 exits, the run is
        saved as failed, with why, and its unfinished jobs as stopped (`--resume`)."""
        try:
            self.collect(block=True)
        except Exception as exc:  # the failure is what the user needs to hear about
            print(f"mlora: {exc}", file=sys.stderr, flush=True)
        self.summary.run_finished(time.time(), "failed", self._unfinished(plan), error)
        self.summary.save(self.out / SUMMARY)
        self.sink.close()
        self.live.__exit__(None, None, None)

    def _unfinished(self, plan: PipelinePlan) -> list[str]:
        """This run's jobs still training or being written when it ends early."""
        return [name for name in plan.active if self.driver.jobs[name].status in ("running", "writing")]

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
