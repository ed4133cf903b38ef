"""`mlora train --ray P`: the pipeline as P Ray actors (real Ray, started locally; gloo on
the CPU) gives the torchrun pipeline's results, its errors reach the driver, and a dead
stage ends the run with an error naming it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlora.config import ConfigError, load_run_file
from mlora.runtime.trainer import train

from test_pipeline_runs import JOBS, run_file

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def mlora_on_ray(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "mlora", "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_a_ray_pipeline_gives_the_single_process_adapters(tmp_path, tiny_models, datasets):
    single = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, "single")), live=False)
    run = run_file(tmp_path, tiny_models["llama"], datasets, "pipe")
    # a relative output folder: the actors work in the driver's folder
    proc = mlora_on_ray(run.name, "--ray", "2", "output_dir=pipe", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pipeline of 2 stages" in proc.stdout
    for job in JOBS:
        a = load_file(str(single.output_dir / job["name"] / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "pipe" / job["name"] / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)

    alone = mlora_on_ray(run.name, "--ray", "1", "output_dir=one", cwd=tmp_path)  # one actor: the single-process trainer
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    for job in JOBS:
        a = load_file(str(single.output_dir / job["name"] / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "one" / job["name"] / "adapter_model.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)

    again = mlora_on_ray(run.name, "--ray", "2", "output_dir=pipe", cwd=tmp_path)  # rank 0 refuses: the folder holds a run
    assert again.returncode == 2
    assert "mlora train: error: pipe: holds an earlier run" in again.stderr, again.stderr[-3000:]


def test_bad_input_is_refused_before_ray_starts(tmp_path, tiny_models, datasets):
    run = run_file(tmp_path, tiny_models["llama"], datasets, "bad")
    proc = mlora_on_ray(str(run), "--ray", "2", "jobs.copy.lora_r=0", cwd=tmp_path)
    assert proc.returncode == 2 and "lora_r" in proc.stderr and "bad.yaml" in proc.stderr, proc.stderr[-3000:]
    assert "Ray instance" not in proc.stderr + proc.stdout
    zero = mlora_on_ray(str(run), "--ray", "0", cwd=tmp_path)
    assert zero.returncode == 2 and "--ray: the number of stages must be at least 1" in zero.stderr


def test_stage_resources_follow_the_device_and_the_cluster(tmp_path, tiny_models, datasets):
    from mlora.runtime.ray_launch import RayLaunchError, stage_resources

    spec = load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, "r"))  # model.device: cpu
    assert stage_resources(spec, 2, {"CPU": 8.0, "GPU": 8.0}) == {"CPU": 1.0}
    auto = load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, "r"), ["model.device=auto"])
    assert stage_resources(auto, 4, {"CPU": 8.0, "GPU": 4.0}) == {"CPU": 1.0, "GPU": 1.0}
    assert stage_resources(auto, 4, {"CPU": 8.0, "GPU": 2.0}) == {"CPU": 1.0}  # too few GPUs: on the CPUs
    with pytest.raises(RayLaunchError, match="3 stages on the CPU need a CPU each, and the Ray cluster has 2"):
        stage_resources(auto, 3, {"CPU": 2.0})
    cuda = load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, "r"), ["model.device=cuda"],
                         check_paths=False)
    with pytest.raises(ConfigError, match=r"r\.yaml: model: device: 'cuda' with 4 stages needs 4 GPUs, and the Ray "
                                          r"cluster has 2"):
        stage_resources(cuda, 4, {"CPU": 8.0, "GPU": 2.0})


def stage_pids(stdout_lines: list[str]) -> set[int]:
    return {int(m.group(1)) for line in stdout_lines for m in [re.search(r"\(StageActor pid=(\d+)", line)] if m}


def test_a_killed_stage_ends_the_ray_run_with_an_error(tmp_path, tiny_models, datasets):
    timeout_s = 8
    run = run_file(tmp_path, tiny_models["llama"], datasets, "killed", max_steps=400, pipeline_timeout_s=timeout_s)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "mlora", "train", str(run), "--ray", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    while not any("pipeline of 2 stages" in line for line in lines):  # rank 0's first line
        line = proc.stdout.readline()
        assert line, (lines, proc.communicate()[1][-3000:])
        lines.append(line)
    metrics = tmp_path / "killed" / "copy" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert metrics.is_file(), "the run never got going"
    rank0 = stage_pids(lines)
    others = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) not in rank0
              and _is_stage_actor(p)]
    assert len(rank0) == 1 and len(others) == 1, (rank0, others)
    os.kill(others[0], signal.SIGKILL)
    killed_at = time.time()
    try:
        out, err = proc.communicate(timeout=timeout_s + 90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the Ray run still going {timeout_s + 90} s after a stage was killed")
    assert proc.returncode == 3, err[-3000:]
    assert "a stage's actor ended with an error: rank 1 (stage 1) first" in err, err[-3000:]
    assert time.time() - killed_at < timeout_s + 90


def _is_stage_actor(proc_dir: Path) -> bool:
    try:
        return b"StageActor" in (proc_dir / "cmdline").read_bytes()
    except OSError:
        return False


def test_a_cuda_run_on_a_cluster_without_gpus_is_refused(tmp_path, tiny_models, datasets):
    """Refused by the launcher, naming the file and field, before any stage starts (this
    machine's local Ray has no GPU)."""
    if torch.cuda.is_available():
        pytest.skip("checks a cluster without GPUs")
    run = run_file(tmp_path, tiny_models["llama"], datasets, "gpu")
    proc = mlora_on_ray(str(run), "--ray", "2", "model.device=cuda", cwd=tmp_path)
    assert proc.returncode == 2
    assert "gpu.yaml: model: device: 'cuda' with 2 stages needs 2 GPUs, and the Ray cluster has 0" in proc.stderr, \
        proc.stderr[-3000:]
    assert not (tmp_path / "gpu").exists()
