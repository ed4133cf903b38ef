"""`mlora status OUTPUT`: the per-job table of a run, during or after it.

The trainer saves run_summary.json on state changes only, so while a run goes on the
newest facts are in each job's metrics.jsonl; `load_summary` merges the two.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from mlora.monitor.metrics import METRICS_FILE, tail_metrics
from mlora.monitor.summary import JobRecord, RunSummary
from mlora.monitor.table import fmt_s, plain_table

SUMMARY = "run_summary.json"


class NotARunError(ValueError):
    """The folder is not an mlora run's output."""


def _read_summary(output_dir: Path) -> RunSummary:
    path = output_dir / SUMMARY
    if not output_dir.is_dir():
        raise NotARunError(f"{output_dir}: no such folder")
    if not path.is_file():
        raise NotARunError(f"{output_dir}: not an mlora run folder (no {SUMMARY})")
    try:
        return RunSummary.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise NotARunError(f"{path}: not a readable mlora run summary ({type(exc).__name__}: {exc})") from exc


def _merge_metrics(job: JobRecord, rows: list[dict[str, Any]]) -> None:
    """Bring a job that is not done up to its newest metrics rows."""
    train = [r for r in rows if r.get("kind") == "train" and isinstance(r.get("step"), int)]
    evals = [r for r in rows if r.get("kind") == "eval" and r.get("eval_loss") is not None]
    if train and train[-1]["step"] >= job.steps:
        last = train[-1]
        if job.state == "queued":  # started after the summary was last saved
            job.state = "running"
            if last.get("time") is not None and last.get("elapsed_s") is not None:
                job.started_at = last["time"] - last["elapsed_s"]
        job.steps = last["step"]
        job.tokens = last.get("tokens", job.tokens)
        job.last_loss = last.get("loss", job.last_loss)
        job.last_lr = last.get("lr", job.last_lr)
        job.last_time = last.get("time", job.last_time)
        job.step_tokens = last.get("step_tokens", job.step_tokens)
        job.tokens_per_s = last.get("tokens_per_s", job.tokens_per_s)
        if job.first_loss is None and train[0]["step"] == 1:
            job.first_loss = train[0].get("loss")
    if evals:
        job.eval_loss = evals[-1]["eval_loss"]


def load_summary(output_dir: Path) -> RunSummary:
    """The run summary, with unfinished jobs updated from the tail of their metrics.jsonl."""
    output_dir = Path(output_dir)
    summary = _read_summary(output_dir)
    for name, job in summary.jobs.items():
        if job.state in ("queued", "running"):
            _merge_metrics(job, tail_metrics(output_dir / name / METRICS_FILE))
    if summary.state == "running" and process_gone(summary.host, summary.pid):
        summary.state = "lost"  # killed or crashed: it could not say so itself
        for job in summary.jobs.values():
            if job.state == "running":
                job.state = "stopped"
    return summary


def process_gone(host: str | None, pid: int | None) -> bool:
    """Whether the process that ran a run, on this machine, has ended. Unknown (another
    machine, or a summary from before hosts were saved) counts as not gone."""
    if host != socket.gethostname() or pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    try:  # a zombie (ended, not yet reaped by its parent) still answers
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _headline(summary: RunSummary, now: float) -> str:
    head = f"run {summary.name} ({summary.state}) on {summary.device}"
    if summary.n_stages > 1:
        head += f", {summary.n_stages} pipeline stages"
    if summary.started_at is not None and summary.finished_at is not None:
        head += f", took {fmt_s(summary.finished_at - summary.started_at)}"
    elif summary.state == "lost":
        head += (f": its process ({summary.pid} on {summary.host}) ended without finishing; "
                 "`mlora train RUN.yaml --resume` continues it")
    elif summary.state == "running":
        times = [j.last_time or j.started_at or j.queued_at for j in summary.jobs.values()]
        known = [t for t in times if t is not None]
        if known:  # a run that crashed stays "running": the age of its newest news tells
            head += f", last update {fmt_s(max(0.0, now - max(known)))} ago"
    bubble, predicted = summary.info.get("bubble_fraction"), summary.info.get("predicted_bubble_fraction")
    if bubble is not None:
        head += f", bubble {100 * bubble:.1f}%" + (f" (predicted {100 * predicted:.1f}%)" if predicted is not None else "")
    elif predicted is not None:
        head += f", predicted bubble {100 * predicted:.1f}%"
    return head


def render_status(output_dir: Path, now: float | None = None, sort: str | None = None) -> str:
    """What `mlora status OUTPUT` prints: headline, per-job table, average completion time.
    `sort`: "eval" or "loss" orders the jobs by that loss, lowest first (a sweep's best on
    top), jobs without one last; else the run file's order."""
    summary = load_summary(output_dir)
    if sort is not None:
        key = {"eval": lambda j: j.eval_loss, "loss": lambda j: j.last_loss}[sort]
        ordered = sorted(summary.jobs.items(), key=lambda item: (key(item[1]) is None, key(item[1]) or 0.0))
        summary.jobs = dict(ordered)
    now = time.time() if now is None else now
    done = [j.completion_s for j in summary.jobs.values() if j.completion_s is not None]
    foot = f"average job completion time {fmt_s(sum(done) / len(done))}" if done else ""
    failed = [f"{name}: {j.error}" for name, j in summary.jobs.items() if j.state == "failed" and j.error]
    error = summary.info.get("error")  # why a failed run stopped (out of GPU memory)
    parts = [_headline(summary, now), plain_table(summary), foot, *(f"failed {x}" for x in failed),
             f"error: {error}" if error else ""]
    return "\n".join(p for p in parts if p)
