"""Monitoring: metrics sinks, the run summary, the live view, `status` and `report` (no training math)."""

from mlora.monitor.live import LiveView, print_table
from mlora.monitor.metrics import (
    JsonlSink,
    MetricsSink,
    MultiSink,
    TensorBoardSink,
    read_metrics,
    tail_metrics,
)
from mlora.monitor.report import write_report
from mlora.monitor.status import NotARunError, load_summary, render_status
from mlora.monitor.summary import JobRecord, RunSummary, eta_s

__all__ = [
    "JobRecord",
    "JsonlSink",
    "LiveView",
    "MetricsSink",
    "MultiSink",
    "NotARunError",
    "RunSummary",
    "TensorBoardSink",
    "eta_s",
    "load_summary",
    "print_table",
    "read_metrics",
    "render_status",
    "tail_metrics",
    "write_report",
]
