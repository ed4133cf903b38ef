"""`mlora status OUTPUT`: the per-job table of a run, during or after it."""

from __future__ import annotations

import json
from pathlib import Path

from mlora.monitor.summary import RunSummary
from mlora.monitor.table import fmt_s, plain_table

SUMMARY = "run_summary.json"


class NotARunError(ValueError):
    """The folder is not an mlora run's output."""


def load_summary(output_dir: Path) -> RunSummary:
    path = Path(output_dir) / SUMMARY
    if not path.is_file():
        raise NotARunError(f"{output_dir}: not an mlora run folder (no {SUMMARY})")
    summary = RunSummary.load(path)
    for name, job in summary.jobs.items():  # a running job may be ahead of the summary
        metrics = Path(output_dir) / name / "metrics.jsonl"
        if job.state == "running" and metrics.is_file():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            train = [r for r in rows if r.get("kind") == "train"]
            if train and train[-1]["step"] > job.steps:
                last = train[-1]
                job.steps, job.tokens, job.last_loss, job.last_time = last["step"], last["tokens"], last["loss"], last["time"]
    return summary


def render_status(output_dir: Path) -> str:
    summary = load_summary(output_dir)
    head = f"run {summary.name} ({summary.state}) on {summary.device}"
    if summary.n_stages > 1:
        head += f", {summary.n_stages} pipeline stages"
    if summary.started_at and summary.finished_at:
        head += f", took {fmt_s(summary.finished_at - summary.started_at)}"
    bubble = summary.info.get("bubble_fraction")
    if bubble is not None:
        head += f", bubble {100 * bubble:.1f}%"
    done = [j.completion_s for j in summary.jobs.values() if j.completion_s is not None]
    foot = f"average job completion time {fmt_s(sum(done) / len(done))}" if done else ""
    return "\n".join(x for x in (head, plain_table(summary), foot) if x)
