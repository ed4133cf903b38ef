"""The run summary: every job's state and times, kept in memory and saved atomically.

`mlora status` reads `run_summary.json` while a run is going, so it is replaced in one
`os.replace`, never half-written. Times are passed in (not read from the clock here),
which keeps this module pure and its tests exact.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def eta_s(step: int, max_steps: int, elapsed_s: float) -> float | None:
    """Seconds left at the job's average pace so far; None before the first step."""
    if step <= 0 or max_steps <= 0:
        return None
    return max(0.0, elapsed_s * (max_steps - step) / step)


@dataclass
class JobRecord:
    state: str = "queued"  # queued | running | finished | failed
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    steps: int = 0
    max_steps: int = 0
    tokens: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None
    last_time: float | None = None
    peak_memory_bytes: int | None = None
    adapter_dir: str | None = None
    error: str | None = None

    @property
    def wait_s(self) -> float | None:
        if self.started_at is None or self.queued_at is None:
            return None
        return self.started_at - self.queued_at

    @property
    def train_s(self) -> float | None:
        end = self.finished_at if self.finished_at is not None else self.last_time
        if self.started_at is None or end is None:
            return None
        return end - self.started_at

    @property
    def completion_s(self) -> float | None:
        if self.finished_at is None or self.queued_at is None:
            return None
        return self.finished_at - self.queued_at

    @property
    def tokens_per_s(self) -> float | None:
        t = self.train_s
        return self.tokens / t if t else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            wait_s=self.wait_s, train_s=self.train_s, completion_s=self.completion_s,
            tokens_per_s=self.tokens_per_s, final_loss=self.last_loss if self.state == "finished" else None,
        )
        return out


_RECORD_FIELDS = set(JobRecord.__dataclass_fields__)


@dataclass
class RunSummary:
    name: str
    output_dir: str
    device: str
    n_stages: int = 1
    started_at: float | None = None
    finished_at: float | None = None
    state: str = "running"
    info: dict[str, Any] = field(default_factory=dict)
    jobs: dict[str, JobRecord] = field(default_factory=dict)

    # ------------------------------------------------------------ events
    def job_queued(self, name: str, max_steps: int, t: float) -> None:
        self.jobs[name] = JobRecord(queued_at=t, max_steps=max_steps)
        if self.started_at is None:
            self.started_at = t

    def job_started(self, name: str, t: float) -> None:
        job = self.jobs[name]
        job.state, job.started_at = "running", t

    def job_progress(self, name: str, step: int, tokens: int, loss: float, t: float) -> None:
        job = self.jobs[name]
        job.steps, job.tokens, job.last_loss, job.last_time = step, tokens, loss, t
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

    def restore_job(self, name: str, previous: "RunSummary | None") -> None:
        """A job finished by an earlier run (before --resume) keeps its record."""
        if previous is not None and name in previous.jobs:
            self.jobs[name] = previous.jobs[name]
        else:
            self.jobs[name].state = "finished"

    def run_finished(self, t: float, state: str) -> None:
        self.finished_at, self.state = t, state

    def set_run_info(self, **info: Any) -> None:
        self.info.update(info)

    # ------------------------------------------------------------- views
    def train_row(self, name: str, *, loss: float, lr: float, t: float) -> dict[str, Any]:
        """The metrics.jsonl row of a finished step, from the job's current record."""
        job = self.jobs[name]
        elapsed = t - job.started_at if job.started_at is not None else 0.0
        return {
            "kind": "train", "job": name, "step": job.steps, "max_steps": job.max_steps, "loss": loss, "lr": lr,
            "tokens": job.tokens, "tokens_per_s": job.tokens / elapsed if elapsed > 0 else None,
            "elapsed_s": elapsed, "eta_s": eta_s(job.steps, job.max_steps, elapsed), "time": t,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "run": {
                "name": self.name, "output_dir": self.output_dir, "device": self.device, "n_stages": self.n_stages,
                "started_at": self.started_at, "finished_at": self.finished_at, "state": self.state, **self.info,
            },
            "jobs": {name: job.to_json() for name, job in self.jobs.items()},
        }

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "RunSummary":
        raw = json.loads(Path(path).read_text())
        run = dict(raw["run"])
        base = {k: run.pop(k) for k in ("name", "output_dir", "device", "n_stages", "started_at", "finished_at", "state")}
        summary = cls(**base, info=run)
        for name, job in raw["jobs"].items():
            summary.jobs[name] = JobRecord(**{k: v for k, v in job.items() if k in _RECORD_FIELDS})
        return summary
