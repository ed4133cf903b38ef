"""The run summary: every job's state and times, kept in memory and saved atomically.

`mlora status` reads `run_summary.json` while a run is going, so it is replaced in one
`os.replace`, never half-written. Times are passed in (not read from the clock here),
which keeps this module pure and its tests exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

JOB_STATES = ("queued", "running", "finished", "failed", "stopped")  # stopped: the run ended first (--resume)


def eta_s(step: int, max_steps: int, elapsed_s: float) -> float | None:
    """Seconds left at the job's average pace so far; None before the first step."""
    if step <= 0 or max_steps <= 0:
        return None
    return max(0.0, elapsed_s * (max_steps - step) / step)


@dataclass
class JobRecord:
    """One job as the monitor sees it: times, progress and results (no training state)."""

    state: str = "queued"  # one of JOB_STATES
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    steps: int = 0
    max_steps: int = 0
    tokens: int = 0
    step_tokens: int | None = None
    tokens_per_s: float | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    last_lr: float | None = None
    eval_loss: float | None = None
    last_time: float | None = None
    peak_memory_bytes: int | None = None
    adapter_dir: str | None = None
    error: str | None = None
    resumed_steps: int = 0  # steps and tokens an earlier run did (--resume): this run's
    resumed_tokens: int = 0  # rate and ETA count only its own share

    def eta(self, elapsed_s: float) -> float | None:
        """Seconds left at this run's pace for the job (`elapsed_s` since it started here)."""
        return eta_s(self.steps - self.resumed_steps, self.max_steps - self.resumed_steps, elapsed_s)

    @property
    def wait_s(self) -> float | None:
        """Time spent in the queue before training began."""
        if self.started_at is None or self.queued_at is None:
            return None
        return self.started_at - self.queued_at

    @property
    def train_s(self) -> float | None:
        """Time since training began: to the end once done, else to the last logged step."""
        end = self.finished_at if self.finished_at is not None else self.last_time
        if self.started_at is None or end is None:
            return None
        return end - self.started_at

    @property
    def completion_s(self) -> float | None:
        """What a user waits for: from submission (queued) to the adapter being written."""
        if self.state != "finished" or self.finished_at is None or self.queued_at is None:
            return None
        return self.finished_at - self.queued_at

    @property
    def final_loss(self) -> float | None:
        return self.last_loss if self.state == "finished" else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(wait_s=self.wait_s, train_s=self.train_s, completion_s=self.completion_s, final_loss=self.final_loss)
        return out


_RECORD_FIELDS = set(JobRecord.__dataclass_fields__)
_RUN_FIELDS = ("name", "output_dir", "device", "n_stages", "started_at", "finished_at", "state", "host", "pid")


@dataclass
class RunSummary:
    """All jobs of one run; the trainer reports events, views read it."""

    name: str
    output_dir: str
    device: str
    n_stages: int = 1
    started_at: float | None = None
    finished_at: float | None = None
    state: str = "running"
    host: str | None = None  # where the process running it is (`mlora status` tells a run whose
    pid: int | None = None  # process is gone from one still going)
    info: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, JobRecord] = field(default_factory=dict)

    # ------------------------------------------------------------ events
    def job_queued(self, name: str, max_steps: int, t: float) -> None:
        self.jobs[name] = JobRecord(queued_at=t, max_steps=max_steps)
        if self.started_at is None or t < self.started_at:
            self.started_at = t

    def job_started(self, name: str, t: float, steps: int = 0, tokens: int = 0) -> None:
        """The job begins training here; `steps` and `tokens` were done by an earlier run
        (a resumed job continues from them)."""
        job = self.jobs[name]
        job.state, job.started_at = "running", t
        job.steps = job.resumed_steps = steps
        job.tokens = job.resumed_tokens = tokens

    def job_progress(
        self,
        name: str,
        step: int,
        tokens: int,
        loss: float,
        t: float,
        *,
        tokens_per_s: float | None = None,
        lr: float | None = None,
        step_tokens: int | None = None,
    ) -> None:
        """A finished optimizer step. `tokens` is the job's cumulative count.

        Without `tokens_per_s` the rate is the tokens since the job started here over the
        time since; a trainer that pauses jobs passes its own.
        Without `step_tokens` it is the increase since the previous step, when that
        step was the one logged just before.
        """
        job = self.jobs[name]
        if step_tokens is None and step == job.steps + 1:
            step_tokens = tokens - job.tokens
        if tokens_per_s is None and job.started_at is not None and t > job.started_at:
            tokens_per_s = (tokens - job.resumed_tokens) / (t - job.started_at)
        job.steps, job.tokens, job.last_loss, job.last_time = step, tokens, loss, t
        job.step_tokens, job.tokens_per_s = step_tokens, tokens_per_s
        if lr is not None:
            job.last_lr = lr
        if job.first_loss is None:
            job.first_loss = loss

    def job_eval(self, name: str, eval_loss: float) -> None:
        self.jobs[name].eval_loss = eval_loss

    def job_finished(self, name: str, t: float, peak_memory_bytes: int | None, adapter_dir: str) -> None:
        job = self.jobs[name]
        job.state, job.finished_at = "finished", t
        job.peak_memory_bytes, job.adapter_dir = peak_memory_bytes, adapter_dir

    def job_failed(self, name: str, t: float, error: str) -> None:
        job = self.jobs[name]
        job.state, job.finished_at, job.error = "failed", t, error

    def job_stopped(self, name: str) -> None:
        """The run ended (interrupted or stopped) before the job's outputs were written."""
        job = self.jobs[name]
        job.state, job.finished_at = "stopped", None

    def restore_job(self, name: str, previous: RunSummary | None) -> None:
        """A job finished by an earlier run (before --resume) keeps its record."""
        if previous is not None and name in previous.jobs:
            self.jobs[name] = previous.jobs[name]
        else:
            self.jobs[name].state = "finished"

    def run_finished(self, t: float, state: str, unfinished: Iterable[str] = (), error: str | None = None) -> None:
        """The run ended in `state` at `t`: the jobs still under way (`unfinished`) are
        stopped (`job_stopped`), and a failure's reason is kept under "run" as `error`.
        One call for every way a run ends, in the trainer and in a pipeline's rank 0."""
        for name in unfinished:
            self.job_stopped(name)
        self.finished_at, self.state = t, state
        if error:
            self.set_run_info(error=error)

    def set_run_info(self, **info: Any) -> None:
        """Extra run facts (pipeline bubble, memory per stage) saved under "run"."""
        self.info.update(info)

    # ------------------------------------------------------------- views
    def train_row(self, name: str, *, loss: float, lr: float, t: float, epoch: float | None = None) -> dict[str, Any]:
        """The metrics.jsonl row of the step just reported with `job_progress`.

        `lr` is also kept as the job's latest, for the live view's log lines.
        """
        job = self.jobs[name]
        job.last_lr = lr
        elapsed = t - job.started_at if job.started_at is not None else 0.0
        return {
            "kind": "train", "job": name, "step": job.steps, "max_steps": job.max_steps, "epoch": epoch,
            "loss": loss, "lr": lr, "tokens": job.tokens, "step_tokens": job.step_tokens,
            "tokens_per_s": job.tokens_per_s, "elapsed_s": elapsed,
            "eta_s": job.eta(elapsed), "time": t,
        }

    def table_rows(self, now: float | None = None) -> list[tuple[str, ...]]:
        """One row of display strings per job (columns: `mlora.monitor.table.COLUMNS`)."""
        from mlora.monitor.table import table_rows  # the table module imports this one

        return table_rows(self, now)

    def to_json(self) -> dict[str, Any]:
        run = {k: getattr(self, k) for k in _RUN_FIELDS}
        return {"run": {**run, **self.info}, "jobs": {name: job.to_json() for name, job in self.jobs.items()}}

    def save(self, path: Path) -> None:
        """Write to a temporary file beside `path`, then replace it in one step."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> RunSummary:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        run = dict(raw["run"])
        base = {k: run.pop(k) for k in _RUN_FIELDS if k in run}
        summary = cls(**base, info=run)
        for name, job in raw["jobs"].items():
            summary.jobs[name] = JobRecord(**{k: v for k, v in job.items() if k in _RECORD_FIELDS})
        return summary
