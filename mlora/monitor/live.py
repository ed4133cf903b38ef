"""Watching a run: a live table on a terminal, plain log lines everywhere else.

Plain mode (CI, pipes, `MLORA_PLAIN=1`) prints one line per job at most every
`log_every_s` seconds and a line on every state change, so logs stay readable.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from mlora.monitor.summary import RunSummary, eta_s
from mlora.monitor.table import COLUMNS, fmt_s, plain_table, table_rows


class LiveView:
    def __init__(self, enabled: bool | None = None, console: Any = None, log_every_s: float = 5.0,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        if enabled is None:
            enabled = self.stream.isatty() and not os.environ.get("MLORA_PLAIN") and not os.environ.get("NO_COLOR")
        self.rich = bool(enabled)
        self.console, self.log_every_s = console, log_every_s
        self._live: Any = None
        self._last_line: dict[str, float] = {}
        self._states: dict[str, str] = {}
        self._last_refresh = 0.0

    def __enter__(self) -> "LiveView":
        if self.rich:
            from rich.console import Console
            from rich.live import Live

            self.console = self.console or Console(file=self.stream)
            self._live = Live(console=self.console, refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def update(self, summary: RunSummary, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self._live is not None:
            if now - self._last_refresh >= 0.25:
                self._live.update(self._rich_table(summary, now))
                self._last_refresh = now
            return
        for name, job in summary.jobs.items():
            changed = self._states.get(name) != job.state
            due = now - self._last_line.get(name, -1e18) >= self.log_every_s and job.state == "running" and job.steps
            if changed:
                self._states[name] = job.state
                extra = f" in {fmt_s(job.completion_s)}" if job.state == "finished" else ""
                self._emit(f"[job {name}] {job.state}{extra}")
            if due or (changed and job.state == "finished"):
                self._last_line[name] = now
                elapsed = (job.last_time or now) - (job.started_at or now)
                loss = f"{job.last_loss:.3f}" if job.last_loss is not None else "-"
                rate = f"{job.tokens_per_s:.0f}" if job.tokens_per_s else "-"
                self._emit(
                    f"[job {name}] step {job.steps}/{job.max_steps} loss {loss} {rate} tok/s "
                    f"eta {fmt_s(eta_s(job.steps, job.max_steps, elapsed))}"
                )

    def _emit(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def _rich_table(self, summary: RunSummary, now: float) -> Any:
        from rich.table import Table

        table = Table(title=f"mlora · {summary.name}")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col in ("job", "state") else "right")
        for row in table_rows(summary, now):
            table.add_row(*row)
        return table

    def print_table(self, summary: RunSummary) -> None:
        """The final per-job table (plain text, so it survives in logs)."""
        print("\n" + plain_table(summary), file=self.stream, flush=True)
