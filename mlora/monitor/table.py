"""The per-job table, as rows of strings: shared by the live view, the end of a run and `mlora status`."""

from __future__ import annotations

from mlora.monitor.summary import RunSummary

COLUMNS = ("job", "state", "steps", "loss", "eval", "tokens", "tok/s", "wait", "ETA / done in", "peak mem")


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def fmt_num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table_rows(summary: RunSummary, now: float | None = None) -> list[tuple[str, ...]]:
    rows = []
    for name, job in summary.jobs.items():
        if job.state == "finished":
            timing = fmt_s(job.completion_s)
        elif job.state == "running" and job.started_at is not None:
            elapsed = (now if now is not None else (job.last_time or job.started_at)) - job.started_at
            timing = "eta " + fmt_s(job.eta(elapsed))
        else:
            timing = "-"
        rows.append((
            name, job.state, f"{job.steps}/{job.max_steps}", fmt_num(job.last_loss, ".4f"), fmt_num(job.eval_loss, ".4f"),
            str(job.tokens), fmt_num(job.tokens_per_s, ".0f"), fmt_s(job.wait_s), timing, fmt_bytes(job.peak_memory_bytes),
        ))
    return rows


def plain_table(summary: RunSummary, now: float | None = None) -> str:
    rows = [COLUMNS, *table_rows(summary, now)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
