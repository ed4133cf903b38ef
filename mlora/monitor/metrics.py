"""Metric sinks: per-job JSONL files and TensorBoard event files, behind one interface."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol, Sequence


class MetricsSink(Protocol):
    def log_train(self, row: dict[str, Any]) -> None: ...
    def log_eval(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """OUTPUT/<job>/metrics.jsonl, one JSON object per line, flushed per row (tail -f works)."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self._files: dict[str, Any] = {}

    def _file(self, job: str) -> Any:
        if job not in self._files:
            folder = self.output_dir / job
            folder.mkdir(parents=True, exist_ok=True)
            self._files[job] = (folder / "metrics.jsonl").open("a", encoding="utf-8")
        return self._files[job]

    def _write(self, row: dict[str, Any]) -> None:
        f = self._file(row["job"])
        f.write(json.dumps(row) + "\n")
        f.flush()

    log_train = _write
    log_eval = _write

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class TensorBoardSink:
    """OUTPUT/tensorboard/ with tags <job>/loss, <job>/lr, <job>/tokens_per_s, <job>/eval_loss."""

    def __init__(self, output_dir: Path) -> None:
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is a dependency; still, never fail a run over it
            print(f"mlora: TensorBoard logging off ({exc})", file=sys.stderr)
            return
        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log_train(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key in ("loss", "lr", "tokens_per_s"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"{row['job']}/{key}", row[key], row["step"], walltime=row.get("time"))

    def log_eval(self, row: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.add_scalar(f"{row['job']}/eval_loss", row["eval_loss"], row["step"], walltime=row.get("time"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MultiSink:
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
