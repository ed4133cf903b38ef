"""Monitoring: metrics files, run summary times, live/plain view, status, report, TensorBoard."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from mlora.monitor import JsonlSink, LiveView, MultiSink, NotARunError, RunSummary, TensorBoardSink, eta_s
from mlora.monitor import render_status, write_report


def fake_run(out: Path) -> RunSummary:
    """Two jobs: `a` runs from t=100, `b` waits in the queue until a finishes at t=130."""
    s = RunSummary(name="r", output_dir=str(out), device="cpu")
    s.job_queued("a", 3, 100.0)
    s.job_queued("b", 2, 100.0)
    sink = MultiSink([JsonlSink(out), TensorBoardSink(out)])
    s.job_started("a", 100.0)
    for step, loss in enumerate([4.0, 3.0, 2.0], start=1):
        s.job_progress("a", step, 100 * step, loss, 100.0 + 10 * step)
        sink.log_train(s.train_row("a", loss=loss, lr=1e-3, t=100.0 + 10 * step))
    sink.log_eval({"kind": "eval", "job": "a", "step": 3, "eval_loss": 2.5, "time": 130.0})
    s.job_eval("a", 2.5)
    s.job_finished("a", 130.0, 2**30, str(out / "a"))
    s.job_started("b", 130.0)
    s.job_progress("b", 1, 50, 5.0, 135.0)
    sink.log_train(s.train_row("b", loss=5.0, lr=1e-3, t=135.0))
    sink.close()
    s.save(out / "run_summary.json")
    return s


def test_jsonl_rows_and_summary_times(tmp_path):
    s = fake_run(tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train"] * 3 + ["eval"]
    assert rows[1] == {"kind": "train", "job": "a", "step": 2, "max_steps": 3, "loss": 3.0, "lr": 1e-3, "tokens": 200,
                       "tokens_per_s": 10.0, "elapsed_s": 20.0, "eta_s": 10.0, "time": 120.0}
    loaded = RunSummary.load(tmp_path / "run_summary.json").to_json()
    assert loaded == s.to_json()
    a, b = loaded["jobs"]["a"], loaded["jobs"]["b"]
    assert (a["wait_s"], a["completion_s"], a["final_loss"], a["first_loss"]) == (0.0, 30.0, 2.0, 4.0)
    assert (b["state"], b["wait_s"], b["completion_s"]) == ("running", 30.0, None)
    assert eta_s(0, 10, 5.0) is None and eta_s(5, 10, 5.0) == 5.0


def test_status_table(tmp_path):
    fake_run(tmp_path)
    text = render_status(tmp_path)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("a ", "b "))}
    assert "finished" in lines["a"] and "3/3" in lines["a"] and "2.0000" in lines["a"] and "2.5000" in lines["a"]
    assert "30s" in lines["a"] and "1.0 GiB" in lines["a"]
    assert "running" in lines["b"] and "1/2" in lines["b"] and "30s" in lines["b"]  # waited 30 s
    with pytest.raises(NotARunError, match=str(tmp_path / "a")):
        render_status(tmp_path / "a")


def test_plain_live_view_lines(tmp_path):
    stream = io.StringIO()
    s = RunSummary(name="r", output_dir=str(tmp_path), device="cpu")
    s.job_queued("a", 4, 0.0)
    view = LiveView(enabled=False, stream=stream, log_every_s=100.0)
    with view:
        view.update(s, now=0.0)
        s.job_started("a", 1.0)
        s.job_progress("a", 2, 64, 1.5, 3.0)
        view.update(s, now=3.0)
        s.job_progress("a", 3, 96, 1.25, 4.0)
        view.update(s, now=4.0)  # within log_every_s: no progress line
        s.job_finished("a", 5.0, None, "x")
        view.update(s, now=5.0)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[job a] queued",
        "[job a] running",
        "[job a] step 2/4 loss 1.500 32 tok/s eta 2s",
        "[job a] finished in 5s",
        "[job a] step 3/4 loss 1.250 24 tok/s eta 1s",
    ]


def test_report_png_and_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fake_run(tmp_path)
    png = write_report(tmp_path)
    data = png.read_bytes()
    assert png == tmp_path / "report.png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"a/loss", "a/lr", "a/eval_loss", "b/loss"} <= set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars("a/loss")] == [4.0, 3.0, 2.0]
