"""`mlora report OUTPUT`: one PNG with every job's loss curve and the run's timeline."""

from __future__ import annotations

import json
from pathlib import Path

from mlora.monitor.status import load_summary


def _metrics(output_dir: Path, job: str) -> tuple[list[dict], list[dict]]:
    path = output_dir / job / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return [r for r in rows if r.get("kind") == "train"], [r for r in rows if r.get("kind") == "eval"]


def write_report(output_dir: Path, path: Path | None = None) -> Path:
    """Top: train loss per step (eval loss as markers). Bottom: per-job wait and training bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    summary = load_summary(output_dir)
    path = Path(path) if path is not None else output_dir / "report.png"
    names = list(summary.jobs)
    fig, (ax_loss, ax_time) = plt.subplots(2, 1, figsize=(10, 4 + 0.45 * len(names) + 3), height_ratios=[3, 1 + 0.3 * len(names)])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        train, evals = _metrics(output_dir, name)
        color = colors[i % len(colors)]
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=name)
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", color=color, alpha=0.7,
                         label=f"{name} (eval)")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"mlora run {summary.name}: loss per job")
    ax_loss.grid(alpha=0.3)
    if names:
        ax_loss.legend(fontsize=8, ncol=2)

    t0 = summary.started_at or 0.0
    for i, name in enumerate(names):
        job = summary.jobs[name]
        color = colors[i % len(colors)]
        if job.queued_at is not None and job.started_at is not None:
            ax_time.barh(i, job.started_at - job.queued_at, left=job.queued_at - t0, color=color, alpha=0.25)
        end = job.finished_at or job.last_time
        if job.started_at is not None and end is not None:
            ax_time.barh(i, end - job.started_at, left=job.started_at - t0, color=color)
            label = f"{job.completion_s:.1f}s" if job.completion_s is not None else job.state
            ax_time.text(end - t0, i, f" {label}", va="center", fontsize=8)
    ax_time.set_yticks(range(len(names)), names)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("seconds since the run started (light: waiting in the queue)")
    ax_time.set_title("per-job timeline and completion time")
    ax_time.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
