"""Watching a run: a live table on a terminal, plain log lines everywhere else.

Plain mode (CI, pipes, `NO_COLOR`, `MLORA_PLAIN=1`) prints one progress line per job
at most every `log_every_s` seconds and one line on every state change, so logs stay
readable however many steps a job takes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from mlora.monitor.summary import JobRecord, RunSummary
from mlora.monitor.table import COLUMNS, fmt_s, plain_table

STATE_STYLE = {"queued": "dim", "running": "yellow", "finished": "green", "failed": "bold red", "stopped": "magenta"}
BAR_COLOR = {"queued": "bright_black", "running": "yellow", "finished": "green", "failed": "red",
             "stopped": "magenta"}


def plain_requested() -> bool:
    """The user asked for plain lines even on a terminal."""
    return os.environ.get("MLORA_PLAIN", "") not in ("", "0") or "NO_COLOR" in os.environ


def progress_line(name: str, job: JobRecord) -> str:
    """`[job sum] step 12/40 loss 2.314 lr 1.0e-03 1520 tok/s eta 31s`, at the job's last step."""
    parts = [f"[job {name}] step {job.steps}/{job.max_steps}"]
    if job.last_loss is not None:
        parts.append(f"loss {job.last_loss:.3f}")
    if job.last_lr is not None:
        parts.append(f"lr {job.last_lr:.1e}")
    if job.tokens_per_s:
        parts.append(f"{job.tokens_per_s:.0f} tok/s")
    parts.append(f"eta {fmt_s(job.eta(job.train_s or 0.0))}")
    return " ".join(parts)


def state_line(name: str, job: JobRecord) -> str:
    """One line per state change: what a user scanning a log wants to know about it."""
    line = f"[job {name}] {job.state}"
    if job.state == "running" and (job.wait_s or 0.0) >= 0.5:
        line += f" after waiting {fmt_s(job.wait_s)}"
    elif job.state == "finished":
        line += f" in {fmt_s(job.completion_s)}"
        if (job.wait_s or 0.0) >= 0.5:
            line += f" (waited {fmt_s(job.wait_s)})"
    elif job.state == "failed":
        line += f" after {fmt_s(job.train_s)}: {job.error}" if job.error else ""
    return line


def rich_table(summary: RunSummary, now: float | None = None) -> Any:
    """The per-job table as a rich Table, with a progress bar per job."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"mlora · {summary.name}", title_justify="left")
    table.add_column("job")
    table.add_column("state")
    table.add_column("progress", min_width=12)
    for col in COLUMNS[2:]:
        table.add_column(col, justify="right")
    for (name, job), row in zip(summary.jobs.items(), summary.table_rows(now)):
        color = BAR_COLOR.get(job.state, "white")
        bar = ProgressBar(total=max(job.max_steps, 1), completed=min(job.steps, job.max_steps), width=20,
                          style="bright_black", complete_style=color, finished_style=color)
        table.add_row(row[0], Text(row[1], style=STATE_STYLE.get(job.state, "")), bar, *row[2:])
    return table


def print_table(summary: RunSummary, console: Any = None, stream: TextIO | None = None) -> None:
    """The final per-job table: rich on a terminal console, else plain text that survives in logs."""
    if console is not None and getattr(console, "is_terminal", False) and not plain_requested():
        console.print(rich_table(summary))
        return
    out = stream or (getattr(console, "file", None) if console is not None else None) or sys.stdout
    print("\n" + plain_table(summary), file=out, flush=True)


class LiveView:
    """`with LiveView() as view: ... view.update(summary)` from the training loop."""

    def __init__(
        self,
        enabled: bool | None = None,
        console: Any = None,
        log_every_s: float = 5.0,
        stream: TextIO | None = None,
        refresh_s: float = 0.25,
    ) -> None:
        self.stream = stream or (console.file if console is not None else sys.stdout)
        if enabled is None:
            terminal = console.is_terminal if console is not None else self.stream.isatty()
            enabled = terminal and not plain_requested()
        self.rich = bool(enabled)
        self.console, self.log_every_s, self.refresh_s = console, log_every_s, refresh_s
        self._live: Any = None
        self._last: RunSummary | None = None
        self._rendered_states: dict[str, str] = {}
        self._last_refresh = float("-inf")
        self._states: dict[str, str] = {}
        self._line_at: dict[str, float] = {}
        self._line_step: dict[str, int] = {}

    def __enter__(self) -> LiveView:
        if self.rich:
            from rich.console import Console
            from rich.live import Live

            self.console = self.console or Console(file=self.stream)
            self._live = Live(console=self.console, refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is None:
            return
        self._live.__exit__(*exc)
        self._live = None
        if exc and exc[0] is not None and self._last is not None:
            # the live table vanishes on exit; after a crash leave where each job got to
            print_table(self._last, self.console)

    def update(self, summary: RunSummary, now: float | None = None) -> None:
        """Cheap to call every batch: redraws at most every `refresh_s`, logs at most every `log_every_s`."""
        now = time.time() if now is None else now
        self._last = summary
        if self._live is not None:
            states = {name: job.state for name, job in summary.jobs.items()}
            if states != self._rendered_states or now - self._last_refresh >= self.refresh_s:
                self._live.update(rich_table(summary, now))
                self._last_refresh, self._rendered_states = now, states
            return
        for name, job in summary.jobs.items():
            self._plain(name, job, now)

    def _plain(self, name: str, job: JobRecord, now: float) -> None:
        changed = self._states.get(name) != job.state
        new_step = job.steps > self._line_step.get(name, 0)
        due = now - self._line_at.get(name, float("-inf")) >= self.log_every_s
        if changed and job.state in ("finished", "failed") and new_step:
            self._progress(name, job, now)  # the last step first, then how it ended
        if changed:
            self._states[name] = job.state
            self._emit(state_line(name, job))
        if job.state == "running" and new_step and due:
            self._progress(name, job, now)

    def _progress(self, name: str, job: JobRecord, now: float) -> None:
        self._line_at[name], self._line_step[name] = now, job.steps
        self._emit(progress_line(name, job))

    def _emit(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def print_table(self, summary: RunSummary) -> None:
        """The final per-job table (see the module function)."""
        print_table(summary, self.console if self.rich else None, self.stream)
