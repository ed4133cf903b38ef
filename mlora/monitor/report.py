"""`mlora report OUTPUT`: one PNG with every job's loss curve and the run's timeline.

The timeline shows what the user of a shared run pays: time queued (light) before
training (solid), with each job's completion time written at the end of its bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlora.monitor.metrics import METRICS_FILE, read_metrics
from mlora.monitor.status import load_summary
from mlora.monitor.summary import JobRecord, RunSummary
from mlora.monitor.table import fmt_s

REPORT = "report.png"


def _end_of_run(summary: RunSummary) -> float | None:
    """The latest moment the files know of (the run's end, or its newest step)."""
    times = [summary.finished_at] + [t for j in summary.jobs.values() for t in (j.finished_at, j.last_time, j.started_at)]
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _bar_label(job: JobRecord) -> str:
    if job.state == "finished":
        return f" done in {fmt_s(job.completion_s)}" + (f" (waited {fmt_s(job.wait_s)})" if (job.wait_s or 0.0) >= 0.5 else "")
    if job.state == "failed":
        return f" failed after {fmt_s(job.train_s)}"
    if job.state in ("running", "stopped"):
        return f" {job.state}, step {job.steps}/{job.max_steps}"
    return " queued"


def _plot_losses(ax: Any, output_dir: Path, summary: RunSummary, colors: list[str]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    handles = []
    any_eval = False
    for i, name in enumerate(summary.jobs):
        rows = read_metrics(output_dir / name / METRICS_FILE)
        train = [r for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
        evals = [r for r in rows if r.get("kind") == "eval" and r.get("eval_loss") is not None]
        color = colors[i % len(colors)]
        marker = "." if len(train) <= 30 else None  # a lone point still shows
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, marker=marker, lw=1.6)
        if evals:
            any_eval = True
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "D", color=color, ms=7,
                    markeredgecolor="black", markeredgewidth=0.6)
        handles.append(Line2D([], [], color=color, lw=2, label=name))
    if any_eval:
        handles.append(Line2D([], [], ls="", marker="D", color="grey", markeredgecolor="black", label="eval loss"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("loss per job (line: train, diamonds: eval)", fontsize=10)
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, fontsize=8, ncol=min(4, len(handles)), loc="upper right")


def _plot_timeline(ax: Any, summary: RunSummary, colors: list[str]) -> None:
    names = list(summary.jobs)
    t0 = summary.started_at if summary.started_at is not None else 0.0
    end = _end_of_run(summary)
    span = (end - t0) if end is not None and end > t0 else 1.0
    for i, name in enumerate(names):
        job, color = summary.jobs[name], colors[i % len(colors)]
        start = job.started_at if job.started_at is not None else end
        if job.queued_at is not None and start is not None and start > job.queued_at:
            ax.barh(i, start - job.queued_at, left=job.queued_at - t0, color=color, alpha=0.25, height=0.6)
        stop = job.finished_at if job.finished_at is not None else job.last_time
        if job.started_at is not None and stop is not None:
            failed = job.state == "failed"
            ax.barh(i, max(stop - job.started_at, 0.0), left=job.started_at - t0, color=color, height=0.6,
                    hatch="//" if failed else None, edgecolor="red" if failed else color)
        tip = stop if stop is not None else start
        ax.text((tip if tip is not None else t0) - t0, i, _bar_label(job), va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, span * 1.35)  # room for the labels right of the bars
    ax.set_xlabel("seconds since the run started (light: waiting in the queue, solid: training)")
    ax.set_title("per-job timeline and completion time", fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def write_report(output_dir: Path, path: Path | None = None) -> Path:
    """Top: train loss per step (eval loss as markers). Bottom: per-job wait and training bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    summary = load_summary(output_dir)
    path = Path(path) if path is not None else output_dir / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(summary.jobs), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_loss, ax_time) = plt.subplots(
        2, 1, figsize=(10, 6.5 + 0.4 * n), height_ratios=[4.5, 1 + 0.4 * n], layout="constrained"
    )
    fig.suptitle(f"mlora run {summary.name} ({summary.state}, {summary.device}, {len(summary.jobs)} jobs)")
    _plot_losses(ax_loss, output_dir, summary, colors)
    _plot_timeline(ax_time, summary, colors)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
