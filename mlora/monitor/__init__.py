"""Monitoring: metrics sinks, the run summary, the live view, `status` and `report` (no training math)."""

from mlora.monitor.live import LiveView
from mlora.monitor.metrics import JsonlSink, MetricsSink, MultiSink, TensorBoardSink
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
    "render_status",
    "write_report",
]
