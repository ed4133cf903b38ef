"""Monitoring: metrics files, run summary times, live/plain view, status, report, TensorBoard."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from mlora.monitor import (
    JsonlSink,
    LiveView,
    MultiSink,
    NotARunError,
    RunSummary,
    TensorBoardSink,
    eta_s,
    load_summary,
    print_table,
    read_metrics,
    render_status,
    tail_metrics,
    write_report,
)

TRAIN_FIELDS = {"kind", "job", "step", "max_steps", "epoch", "loss", "lr", "tokens", "step_tokens", "tokens_per_s",
                "elapsed_s", "eta_s", "time"}


def fake_run(out: Path, finish_b: bool = False) -> RunSummary:
    """Three jobs queued at t=100: `a` trains 100-130; `c` trains from 100 and fails at 112;
    `b` waits in the queue until `a` is done, then trains from 130 (and ends at 140 if finish_b)."""
    s = RunSummary(name="r", output_dir=str(out), device="cpu")
    for name, steps in (("a", 3), ("b", 2), ("c", 5)):
        s.job_queued(name, steps, 100.0)
    sink = MultiSink([JsonlSink(out), TensorBoardSink(out)])

    def step(job: str, n: int, tokens: int, loss: float, t: float) -> None:
        s.job_progress(job, n, tokens, loss, t, lr=1e-3)
        sink.log_train(s.train_row(job, loss=loss, lr=1e-3, t=t, epoch=n / 2))

    s.job_started("a", 100.0)
    s.job_started("c", 100.0)
    for n, loss in enumerate([4.0, 3.0, 2.0], start=1):
        step("a", n, 100 * n, loss, 100.0 + 10 * n)
    step("c", 1, 40, 9.0, 105.0)
    s.job_failed("c", 112.0, "out of memory")
    sink.log_eval({"kind": "eval", "job": "a", "step": 3, "eval_loss": 2.5, "time": 130.0})
    s.job_eval("a", 2.5)
    s.job_finished("a", 130.0, 2**30, str(out / "a"))
    s.job_started("b", 130.0)
    step("b", 1, 50, 5.0, 135.0)
    if finish_b:
        step("b", 2, 100, 4.5, 140.0)
        s.job_finished("b", 140.0, 2**20, str(out / "b"))
        s.run_finished(140.0, "failed")
    sink.close()
    s.save(out / "run_summary.json")
    return s


def test_jsonl_rows_and_summary_times(tmp_path):
    s = fake_run(tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["train"] * 3 + ["eval"]
    assert all(set(r) == TRAIN_FIELDS for r in rows[:3])
    assert rows[1] == {"kind": "train", "job": "a", "step": 2, "max_steps": 3, "epoch": 1.0, "loss": 3.0, "lr": 1e-3,
                       "tokens": 200, "step_tokens": 100, "tokens_per_s": 10.0, "elapsed_s": 20.0, "eta_s": 10.0,
                       "time": 120.0}
    assert rows[0]["step_tokens"] == 100
    assert rows[3] == {"kind": "eval", "job": "a", "step": 3, "eval_loss": 2.5, "time": 130.0}
    assert read_metrics(tmp_path / "a" / "metrics.jsonl") == rows

    assert (tmp_path / "run_summary.json").is_file() and not list(tmp_path.glob(".*tmp"))
    loaded = RunSummary.load(tmp_path / "run_summary.json").to_json()
    assert loaded == s.to_json()
    assert loaded["run"]["started_at"] == 100.0 and loaded["run"]["state"] == "running"
    a, b, c = (loaded["jobs"][k] for k in "abc")
    assert (a["state"], a["wait_s"], a["train_s"], a["completion_s"]) == ("finished", 0.0, 30.0, 30.0)
    assert (a["first_loss"], a["final_loss"], a["eval_loss"], a["tokens"], a["peak_memory_bytes"]) == (4.0, 2.0, 2.5, 300, 2**30)
    assert (b["state"], b["wait_s"], b["completion_s"], b["final_loss"], b["tokens_per_s"]) == ("running", 30.0, None, None, 10.0)
    assert (c["state"], c["error"], c["completion_s"], c["train_s"]) == ("failed", "out of memory", None, 12.0)


def test_progress_rates_and_eta():
    s = RunSummary(name="r", output_dir="x", device="cpu")
    s.job_queued("j", 10, 0.0)
    s.job_started("j", 2.0)
    s.job_progress("j", 1, 30, 1.0, 4.0)
    assert (s.jobs["j"].tokens_per_s, s.jobs["j"].step_tokens) == (15.0, 30)
    s.job_progress("j", 2, 70, 0.9, 6.0, tokens_per_s=99.0)
    assert (s.jobs["j"].tokens_per_s, s.jobs["j"].step_tokens) == (99.0, 40)
    s.job_progress("j", 5, 200, 0.8, 8.0, step_tokens=7)  # a gap in steps (resume): only an explicit count
    assert s.jobs["j"].step_tokens == 7
    assert s.train_row("j", loss=0.8, lr=3e-4, t=8.0)["step_tokens"] == 7 and s.jobs["j"].last_lr == 3e-4
    assert eta_s(0, 10, 5.0) is None and eta_s(5, 10, 5.0) == 5.0 and eta_s(12, 10, 5.0) == 0.0


def test_a_resumed_job_counts_its_rate_and_eta_from_where_it_resumed():
    """It restarts at step 1000 of 5000 with 50,000 tokens done by the earlier run: the
    first step here must not look like 1,001 steps in one second."""
    s = RunSummary(name="r", output_dir="x", device="cpu")
    s.job_queued("j", 5000, 0.0)
    s.job_started("j", 100.0, steps=1000, tokens=50_000)
    assert (s.jobs["j"].steps, s.jobs["j"].tokens) == (1000, 50_000)  # shown before its first step here
    s.job_progress("j", 1001, 50_050, 1.0, 101.0)
    job = s.jobs["j"]
    assert (job.tokens_per_s, job.step_tokens) == (50.0, 50)
    assert job.eta(1.0) == 3999.0
    assert s.train_row("j", loss=1.0, lr=1e-4, t=101.0)["eta_s"] == 3999.0
    assert "eta 1h06m" in s.table_rows(now=101.0)[0][8]
    s.job_stopped("j")
    assert s.jobs["j"].state == "stopped" and s.table_rows()[0][1:3] == ("stopped", "1001/5000")


def test_a_run_ending_early_stops_its_unfinished_jobs_and_keeps_why():
    """Every way a run ends goes through run_finished: the jobs named as still under way
    are stopped (no finish time), the others keep their state, and the error is saved."""
    s = RunSummary(name="r", output_dir="x", device="cpu")
    for name in ("done", "busy", "waiting"):
        s.job_queued(name, 10, 0.0)
    s.job_started("done", 1.0)
    s.job_finished("done", 2.0, None, "out/done")
    s.job_started("busy", 2.0)
    s.run_finished(3.0, "failed", ["busy"], "RuntimeError: lost rank 1")
    assert [s.jobs[n].state for n in ("done", "busy", "waiting")] == ["finished", "stopped", "queued"]
    assert s.jobs["busy"].finished_at is None and s.jobs["done"].finished_at == 2.0
    assert s.to_json()["run"]["state"] == "failed" and s.to_json()["run"]["error"] == "RuntimeError: lost rank 1"
    s.run_finished(4.0, "finished")
    assert "error" in s.to_json()["run"]  # a later end adds no error and takes none away


def test_jsonl_accepts_numpy_scalars_and_tail_skips_partial_lines(tmp_path):
    np = pytest.importorskip("numpy")
    sink = JsonlSink(tmp_path)
    for step in range(1, 201):
        sink.log_train({"kind": "train", "job": "j", "step": step, "loss": np.float32(0.5)})
    sink.close()
    path = tmp_path / "j" / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"kind": "train", "job": "j", "st')  # a writer caught mid-line
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 201))
    tail = tail_metrics(path, max_bytes=500)
    assert tail[-1] == {"kind": "train", "job": "j", "step": 200, "loss": 0.5} and 0 < len(tail) < 20


def test_status_table(tmp_path):
    fake_run(tmp_path, finish_b=True)
    text = render_status(tmp_path)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith(("a ", "b ", "c "))}
    assert text.startswith("run r (failed) on cpu, took 40s")
    assert "finished" in lines["a"] and "3/3" in lines["a"] and "2.0000" in lines["a"] and "2.5000" in lines["a"]
    assert "300" in lines["a"] and " 10 " in lines["a"] and "30s" in lines["a"] and "1.0 GiB" in lines["a"]
    assert "finished" in lines["b"] and "2/2" in lines["b"] and "30s" in lines["b"] and "40s" in lines["b"]
    assert "failed" in lines["c"] and "1/5" in lines["c"] and "9.0000" in lines["c"]
    assert "average job completion time 35s" in text and "failed c: out of memory" in text


def test_status_sorts_a_sweeps_jobs_by_loss(tmp_path):
    s = RunSummary(name="sweep", output_dir=str(tmp_path), device="cpu")
    for name, loss, eval_loss in (("a", 3.0, 3.0), ("b", 1.0, None), ("c", 2.0, 1.0)):
        s.job_queued(name, 2, 100.0)
        s.job_started(name, 100.0)
        s.job_progress(name, 2, 64, loss, 110.0)
        if eval_loss is not None:
            s.job_eval(name, eval_loss)
    s.save(tmp_path / "run_summary.json")

    def order(sort):
        lines = render_status(tmp_path, now=111.0, sort=sort).splitlines()
        return [line.split()[0] for line in lines if line[:2] in ("a ", "b ", "c ")]

    assert order(None) == ["a", "b", "c"] and order("loss") == ["b", "c", "a"]
    assert order("eval") == ["c", "a", "b"]  # lowest eval loss first, none last


def test_status_of_a_pipeline_shows_its_predicted_then_measured_bubble(tmp_path):
    s = RunSummary(name="p", output_dir=str(tmp_path), device="pipeline", n_stages=4)
    s.job_queued("a", 4, 100.0)
    s.set_run_info(predicted_bubble_fraction=0.0625)  # known when the run starts
    s.save(tmp_path / "run_summary.json")
    assert render_status(tmp_path, now=101.0).splitlines()[0].endswith("4 pipeline stages, last update 1s ago, predicted bubble 6.2%")
    s.set_run_info(bubble_fraction=0.1)
    s.run_finished(120.0, "finished")
    s.save(tmp_path / "run_summary.json")
    assert render_status(tmp_path).splitlines()[0].endswith("bubble 10.0% (predicted 6.2%)")


def test_status_during_a_run_reads_the_metrics(tmp_path):
    """The summary was saved while `b` was still queued; its metrics show it running."""
    s = RunSummary(name="r", output_dir=str(tmp_path), device="cpu")
    s.job_queued("a", 4, 100.0)
    s.job_queued("b", 4, 100.0)
    s.job_started("a", 100.0)
    s.save(tmp_path / "run_summary.json")
    sink = JsonlSink(tmp_path)
    s.job_started("b", 110.0)
    for n in (1, 2):
        s.job_progress("b", n, 64 * n, 3.0 - n, 110.0 + 4 * n)
        sink.log_train(s.train_row("b", loss=3.0 - n, lr=2e-4, t=110.0 + 4 * n))
    sink.log_eval({"kind": "eval", "job": "b", "step": 2, "eval_loss": 1.75, "time": 118.0})
    sink.close()
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "job": "b", "step": 3, "lo')
    text = render_status(tmp_path, now=148.0)
    line = next(x for x in text.splitlines() if x.startswith("b "))
    assert "running" in line and "2/4" in line and "1.0000" in line and "1.7500" in line and "128" in line
    assert "10s" in line  # waited from 100 to 110, recovered from the metrics row
    assert "last update 30s ago" in text.splitlines()[0]


def test_status_on_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(NotARunError, match=str(tmp_path / "a")):
        render_status(tmp_path / "a")
    with pytest.raises(NotARunError, match="no such folder"):
        render_status(tmp_path / "missing")
    (tmp_path / "a" / "run_summary.json").write_text("{not json")
    with pytest.raises(NotARunError, match="run_summary.json"):
        render_status(tmp_path / "a")


def test_plain_live_view_lines(tmp_path):
    stream = io.StringIO()
    s = RunSummary(name="r", output_dir=str(tmp_path), device="cpu")
    s.job_queued("a", 4, 0.0)
    view = LiveView(enabled=False, stream=stream, log_every_s=100.0)
    with view:
        view.update(s, now=0.0)
        s.job_started("a", 1.0)
        s.job_progress("a", 2, 64, 1.5, 3.0, lr=1e-3)
        view.update(s, now=3.0)
        s.job_progress("a", 3, 96, 1.25, 4.0, lr=5e-4)
        view.update(s, now=4.0)  # within log_every_s: no progress line
        view.update(s, now=4.5)
        s.job_finished("a", 5.0, None, "x")
        view.update(s, now=5.0)
        view.update(s, now=500.0)  # nothing new
    view.print_table(s)
    lines = stream.getvalue().splitlines()
    assert lines[:5] == [
        "[job a] queued",
        "[job a] running after waiting 1s",
        "[job a] step 2/4 loss 1.500 lr 1.0e-03 32 tok/s eta 2s",
        "[job a] step 3/4 loss 1.250 lr 5.0e-04 32 tok/s eta 1s",
        "[job a] finished in 5s (waited 1s)",
    ]
    assert lines[-1].split()[:3] == ["a", "finished", "3/4"]  # the final table


def test_live_view_mode_and_rich_table(tmp_path, monkeypatch):
    from rich.console import Console

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("MLORA_PLAIN", raising=False)
    assert LiveView(stream=Tty()).rich and not LiveView(stream=io.StringIO()).rich
    monkeypatch.setenv("MLORA_PLAIN", "1")
    assert not LiveView(stream=Tty()).rich
    monkeypatch.delenv("MLORA_PLAIN")

    s = fake_run(tmp_path, finish_b=True)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with LiveView(console=console) as view:
        assert view.rich
        view.update(s, now=140.0)
    print_table(s, console)
    text = out.getvalue()
    assert all(name in text for name in "abc") and "finished" in text and "failed" in text and "1.0 GiB" in text


def test_report_png_and_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fake_run(tmp_path)
    png = write_report(tmp_path)
    data = png.read_bytes()
    assert png == tmp_path / "report.png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    other = write_report(tmp_path, tmp_path / "plots" / "r.png")
    assert other.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"a/loss", "a/lr", "a/tokens_per_s", "a/eval_loss", "b/loss", "c/loss"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("a/loss")] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert [e.value for e in acc.Scalars("a/eval_loss")] == [2.5]
    assert acc.Scalars("a/lr")[0].value == pytest.approx(1e-3)


def test_status_tells_a_run_whose_process_is_gone(tmp_path):
    """A run killed outright cannot mark itself: `mlora status` sees that the process
    named in its summary, on this machine, has ended, and says so instead of showing
    the jobs running with an ETA."""
    import socket
    import subprocess
    import sys

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    for pid, host, state in ((ended.pid, socket.gethostname(), "lost"), (os.getpid(), socket.gethostname(), "running"),
                             (ended.pid, "another-host", "running")):
        s = RunSummary(name="r", output_dir=str(tmp_path), device="cpu", host=host, pid=pid)
        s.job_queued("j", 10, 0.0)
        s.job_started("j", 1.0)
        s.job_progress("j", 3, 30, 1.0, 4.0)
        s.save(tmp_path / "run_summary.json")
        loaded = load_summary(tmp_path)
        assert (loaded.state, loaded.jobs["j"].state) == (state, "stopped" if state == "lost" else "running"), host
    text = render_status(tmp_path, now=5.0)
    assert "run r (running)" in text  # the other host's run: nothing can be known from here
    s.host = socket.gethostname()
    s.save(tmp_path / "run_summary.json")
    text = render_status(tmp_path, now=5.0)
    assert f"run r (lost) on cpu: its process ({ended.pid} on {socket.gethostname()}) ended without finishing" in text
    assert "stopped  3/10" in text
