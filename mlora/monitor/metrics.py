"""Metric sinks (per-job JSONL files, TensorBoard event files) and the JSONL readers.

The trainer writes every row to a `MetricsSink`; which files exist is decided here,
so the training loop never changes when an output format is added.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
TB_TRAIN_KEYS = ("loss", "lr", "tokens_per_s")


class MetricsSink(Protocol):
    def log_train(self, row: dict[str, Any]) -> None: ...
    def log_eval(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _scalar(value: Any) -> Any:
    """JSON for numpy / torch scalars a trainer may hand over (anything with .item())."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class JsonlSink:
    """OUTPUT/<job>/metrics.jsonl, one JSON object per line, flushed per row (tail -f works)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self._files: dict[str, IO[str]] = {}

    def _file(self, job: str) -> IO[str]:
        if job not in self._files:
            folder = self.output_dir / job
            folder.mkdir(parents=True, exist_ok=True)
            self._files[job] = (folder / METRICS_FILE).open("a", encoding="utf-8")
        return self._files[job]

    def _write(self, row: dict[str, Any]) -> None:
        f = self._file(row["job"])
        f.write(json.dumps(row, default=_scalar) + "\n")  # one write per line: readers see whole lines
        f.flush()

    def log_train(self, row: dict[str, Any]) -> None:
        self._write(row)

    def log_eval(self, row: dict[str, Any]) -> None:
        self._write(row)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class TensorBoardSink:
    """OUTPUT/tensorboard/ with tags <job>/loss, <job>/lr, <job>/tokens_per_s, <job>/eval_loss.

    Without a working TensorBoard writer it says so once and records nothing: a
    missing optional viewer must never stop a training run. The writer (and its event
    file) comes with the first row: a run stopped while it starts leaves its output
    folder empty, so the same command starts it again.
    """

    def __init__(self, output_dir: Path) -> None:
        self.log_dir = Path(output_dir) / TB_DIR
        self.writer: Any = None
        self._tried = False

    def _open(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                print(f"mlora: TensorBoard logging off ({exc})", file=sys.stderr)
            else:
                self.writer = SummaryWriter(log_dir=str(self.log_dir))
        return self.writer

    def log_train(self, row: dict[str, Any]) -> None:
        writer = self._open()
        if writer is None:
            return
        for key in TB_TRAIN_KEYS:
            if row.get(key) is not None:
                writer.add_scalar(f"{row['job']}/{key}", float(row[key]), row["step"], walltime=row.get("time"))

    def log_eval(self, row: dict[str, Any]) -> None:
        writer = self._open()
        if writer is not None:
            writer.add_scalar(f"{row['job']}/eval_loss", float(row["eval_loss"]), row["step"], walltime=row.get("time"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MultiSink:
    """Fans every row out to several sinks, in order."""

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self.sinks = list(sinks)

    def log_train(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log_train(row)

    def log_eval(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log_eval(row)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def _parse(lines: list[str]) -> list[dict[str, Any]]:
    """Rows from lines; a line cut short by a writer mid-flush (or damaged) is skipped."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every readable row of a metrics.jsonl file ([] when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return _parse(path.read_text(encoding="utf-8", errors="replace").splitlines())


def tail_metrics(path: Path, max_bytes: int = 256 * 1024) -> list[dict[str, Any]]:
    """The rows in the last `max_bytes` of the file: the latest state of a long run, cheaply."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - max_bytes))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # began mid-line
    return _parse(lines)
