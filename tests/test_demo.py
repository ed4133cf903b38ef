"""The embedded default, shortened: the README's first command, through the real CLI."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mlora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlora", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_demo_run_file_trains_every_job(tmp_path):
    model, out = tmp_path / "tiny-llama", tmp_path / "demo"
    made = mlora("tiny-model", str(model), "--arch", "llama")
    assert made.returncode == 0, made.stderr
    overrides = [f"model.path={model}", f"output_dir={out}", "max_steps=100", "jobs.add.max_steps=80", "eval_steps=50"]
    checked = mlora("validate", "configs/demo.yaml", *overrides)
    assert checked.returncode == 0 and "OK (4 jobs)" in checked.stdout, checked.stderr
    run = mlora("train", "configs/demo.yaml", "--plain", *overrides)
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.splitlines()[-4:]
    assert [line.split()[0] for line in table] == ["reverse", "upper", "add", "sort"]
    assert all("finished" in line for line in table)

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["run"]["state"] == "finished"
    for name, job in summary["jobs"].items():
        assert (out / name / "adapter_model.safetensors").is_file()
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if r["kind"] == "train"]
        assert statistics.mean(losses[-10:]) < 0.5 * losses[0], (name, losses[0], losses[-10:])
        assert job["eval_loss"] is not None and job["completion_s"] > 0

    status = mlora("status", str(out))
    assert status.returncode == 0 and "average job completion time" in status.stdout
    report = mlora("report", str(out))
    assert report.returncode == 0 and (out / "report.png").stat().st_size > 10_000
