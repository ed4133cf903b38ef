"""Pipelining changes nothing (invariant 2), and a dead rank never hangs the others.

Real processes under torchrun, talking over gloo on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mlora.config import load_run_file
from mlora.runtime.trainer import train

from conftest import free_port, write_run
from conftest import rel as rel_err

pytestmark = pytest.mark.slow

JOBS = [
    {"name": "copy", "dataset": "copy", "lora_r": 4, "target_modules": "all", "micro_batch_size": 2, "gradient_accumulation_steps": 2,
     "eval_split": 5, "eval_steps": 2},
    {"name": "reverse", "dataset": "reverse", "lora_r": 8, "target_modules": ["q_proj", "v_proj"], "micro_batch_size": 3,
     "lr_scheduler": "cosine", "lora_dropout": 0.1, "eval_split": 0.25},
    {"name": "count", "dataset": "count", "lora_r": 2, "target_modules": ["down_proj", "up_proj"], "micro_batch_size": 1,
     "gradient_accumulation_steps": 3, "optimizer": "sgd", "momentum": 0.9, "learning_rate": 0.05},
    # (AdamW turns gradient rounding noise into updates of up to ~lr, so lr stays small for 1e-5)
    {"name": "copy2", "dataset": "copy", "lora_r": 16, "lora_alpha": 8, "target_modules": ["o_proj", "k_proj"], "micro_batch_size": 4,
     "max_grad_norm": 0.02, "seed": 9, "eval_split": 3, "eval_steps": 1},
]
EVAL_STEPS = {"copy": [2, 4], "reverse": [4], "count": [], "copy2": [1, 2, 3, 4]}


def run_file(tmp_path: Path, model: Path, datasets: dict[str, Path], out: str, max_steps: int = 4,
             model_dtype: str = "float32", **run) -> Path:
    raw = {
        "model": {"path": str(model), "dtype": model_dtype, "device": "cpu"},
        "defaults": {"template": "plain", "cutoff_len": 32, "max_steps": max_steps, "learning_rate": 2e-3, "seed": 5},
        "jobs": [{**j, "dataset": str(datasets[j["dataset"]])} for j in JOBS],
        "run": {"output_dir": str(tmp_path / out), **run},
    }
    return write_run(tmp_path / f"{out}.yaml", raw)


def train_losses(metrics: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]


def assert_same_adapters(want: Path, got: Path, rel: float | None = None) -> None:
    """Every job's adapter in `got` equals the one in `want` (fp32, 1e-5; or each
    tensor within `rel` relative error, as a whole)."""
    for job in JOBS:
        a = load_file(str(want / job["name"] / "adapter_model.safetensors"))
        b = load_file(str(got / job["name"] / "adapter_model.safetensors"))
        assert a.keys() == b.keys(), job["name"]
        for key in a:
            if rel is not None:
                assert torch.isfinite(b[key]).all() and rel_err(b[key], a[key]) < rel, (job["name"], key)
                continue
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5, msg=lambda m, j=job["name"], k=key: f"{j} {k}: {m}")


def eval_losses(metrics: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "eval"]


def kill_everything_running(arg: str) -> None:
    """SIGKILL every process whose command line holds `arg` (torchrun puts workers in their own sessions)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in cmdline:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def torchrun(n: int, run: Path, *extra: str, timeout: float = 300, entry: tuple[str, ...] = ("-m", "mlora"),
             **env_vars: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", f"--master-port={free_port()}",
           *entry, "train", str(run), "--plain", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_gives_the_single_process_adapters(tmp_path, tiny_models, datasets, stages):
    single = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, "single")), live=False)
    # the 3-stage run also rounds batch lengths up (run.pad_to_multiple_of: right padding changes
    # nothing) and reruns each block in the backward (run.gradient_checkpointing: the same gradients)
    extra = {"pad_to_multiple_of": 16, "gradient_checkpointing": True} if stages == 3 else {}
    pipe_run = run_file(tmp_path, tiny_models["llama"], datasets, "pipe", **extra)
    if stages == 3:  # and checkpoints every step, keeping the newest complete one (save_total_limit)
        raw = yaml.safe_load(pipe_run.read_text())
        raw["defaults"].update(save_steps=1, save_total_limit=1)
        pipe_run.write_text(yaml.safe_dump(raw))
    outline = subprocess.run([sys.executable, "-m", "mlora", "validate", str(pipe_run), "--stages", str(stages)],
                             capture_output=True, text=True, timeout=300)
    assert outline.returncode == 0 and f"pipeline of {stages} stages:" in outline.stdout, outline.stderr
    proc = torchrun(stages, pipe_run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"pipeline of {stages} stages" in proc.stdout
    out = tmp_path / "pipe"
    assert_same_adapters(single.output_dir, out)
    for job in JOBS:
        # every step's loss, summed over its micro-batches on the last stage and relayed to rank 0
        losses = [train_losses(d / job["name"] / "metrics.jsonl") for d in (single.output_dir, out)]
        assert len(losses[1]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5), job["name"]
        # held-out rows forwarded through the stages between two steps' updates, as the trainer evaluates them
        evals = [eval_losses(d / job["name"] / "metrics.jsonl") for d in (single.output_dir, out)]
        assert [s for s, _ in evals[1]] == [s for s, _ in evals[0]] == EVAL_STEPS[job["name"]], job["name"]
        assert [v for _, v in evals[1]] == pytest.approx([v for _, v in evals[0]], rel=1e-5), job["name"]
    if stages == 3:  # steps 1-3 were checkpointed (not the last); step 3's, complete, is the one left
        for job in JOBS:
            assert sorted(p.name for p in (out / job["name"] / "checkpoints").iterdir()) == ["step-000003"], job["name"]
    trace = json.loads((out / "trace.json").read_text())
    assert {e["tid"] for e in trace["traceEvents"] if e.get("ph") == "X"} == set(range(stages))
    summary = json.loads((out / "run_summary.json").read_text())
    assert all(j["state"] == "finished" for j in summary["jobs"].values())
    assert 0.0 <= summary["run"]["bubble_fraction"] < 1.0
    # the schedule was costed by the simulator before it ran
    predicted = summary["run"]["predicted_bubble_fraction"]
    assert 0.0 < predicted < 1.0 and f"predicted bubble: {predicted:.3f}" in proc.stdout
    # `mlora validate --stages` plans exactly what the run then ran
    trace_mbs = {e["args"]["mb"] for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("args", {}).get("mb") is not None}
    assert f"{len(trace_mbs)} micro-batches (" in outline.stdout and f"predicted bubble {100 * predicted:.1f}%" in outline.stdout


def loss_scales(metrics: Path) -> list[float]:
    return [r["loss_scale"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]


def test_a_float16_pipeline_scales_losses_and_skips_overflowed_steps_as_one_process_does(tmp_path, tiny_models, datasets):
    """float16 with dynamic loss scaling: every stage skips a job's overflowed step (the
    whole adapter's norm decides), and keeps the same scale, so the adapters, the losses
    and the logged scales are one process's. The 'count' job's first step overflows at
    the initial scale (2^16) here; without the skip its adapter would be nan."""
    single = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, "single"), ["model.dtype=float16"]),
                   live=False)
    proc = torchrun(2, run_file(tmp_path, tiny_models["llama"], datasets, "pipe", model_dtype="float16"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "pipe"
    # float16 rounds differently as rows are batched differently (another GEMM blocking):
    # one process training the jobs one at a time differs from the fused run by 2.4e-3
    assert_same_adapters(single.output_dir, out, rel=1e-2)
    for job in JOBS:
        metrics = [d / job["name"] / "metrics.jsonl" for d in (single.output_dir, out)]
        assert train_losses(metrics[1]) == pytest.approx(train_losses(metrics[0]), rel=1e-3), job["name"]
        assert loss_scales(metrics[1]) == loss_scales(metrics[0]), job["name"]
    assert loss_scales(out / "count" / "metrics.jsonl")[:2] == [2.0**16, 2.0**15]
    assert loss_scales(out / "copy" / "metrics.jsonl") == [2.0**16] * 4


def test_a_job_that_ends_early_has_its_adapter_written_while_the_others_train(tmp_path, tiny_models, datasets):
    """Each stage puts its slice of a finished job in the (shared) output folder; rank 0
    writes the PEFT folder from them at once and only then counts the job finished."""
    run = run_file(tmp_path, tiny_models["llama"], datasets, "out", max_steps=40)
    raw = yaml.safe_load(run.read_text())
    raw["jobs"][0]["max_steps"] = 2  # copy: eval at steps 2 (and the end, the same)
    run.write_text(yaml.safe_dump(raw))
    proc = torchrun(2, run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "run_summary.json").read_text())
    copy = summary["jobs"]["copy"]
    last_rows = {j["name"]: json.loads((out / j["name"] / "metrics.jsonl").read_text().splitlines()[-1]) for j in JOBS}
    assert copy["state"] == "finished" and copy["finished_at"] < min(r["time"] for n, r in last_rows.items() if n != "copy")
    config = out / "copy" / "adapter_config.json"
    assert config.stat().st_mtime <= copy["finished_at"] + 1e-3  # written, then counted finished
    assert last_rows["copy"]["kind"] == "eval" and last_rows["copy"]["time"] <= copy["finished_at"]
    assert not any(out.glob("*/.stage-slices")) and not any(out.glob(".mlora-shared-*"))


def test_without_a_shared_output_folder_adapters_are_gathered_at_the_end(tmp_path, tiny_models, datasets):
    """Ranks that cannot see rank 0's output folder (hosts without a shared file system):
    rank 0 writes every adapter at the end from slices sent over torch.distributed."""
    single = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, "single")), live=False)
    entry = (str(Path(__file__).with_name("unshared_output.py")),)
    proc = torchrun(2, run_file(tmp_path, tiny_models["llama"], datasets, "pipe"), entry=entry)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "pipe"
    assert_same_adapters(single.output_dir, out)
    summary = json.loads((out / "run_summary.json").read_text())
    assert all(j["state"] == "finished" for j in summary["jobs"].values())
    assert not any(out.glob("*/.stage-slices"))


def test_ranks_without_a_shared_folder_resume_from_their_own_checkpoint_slices(tmp_path, tiny_models, datasets):
    """Hosts without a shared file system: each rank writes its checkpoint slices to its
    own disk (here its own working folder), and --resume continues from the newest step
    that every rank holds (rank 0 alone sees only its own slices: it restarted every job
    from scratch, over the old checkpoints); the adapters are the uninterrupted run's.
    save_total_limit: 2 prunes each rank's own disk, as the ranks agree by notes while
    they train, and exactly at the end (it pruned nothing there before)."""
    steps = 60
    single = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, "single", max_steps=steps)),
                   live=False)
    run = run_file(tmp_path, tiny_models["llama"], datasets, "pipe", max_steps=steps)
    raw = yaml.safe_load(run.read_text())
    raw["run"]["output_dir"] = "out"  # relative: each rank's own
    raw["defaults"].update(save_steps=5, save_total_limit=2)
    run.write_text(yaml.safe_dump(raw))
    ranks = tmp_path / "ranks"
    entry = str(Path(__file__).with_name("unshared_output.py"))
    cmd = [sys.executable, "-m", "mlora.runtime.torchrun_launch", "--nproc-per-node=2", f"--master-port={free_port()}",
           entry, "train", str(run), "--plain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLORA_TEST_RANK_DIRS": str(ranks)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

    def steps_held(rank: int, job: str, file: str = "*") -> list[int]:
        root = ranks / f"rank{rank}" / "out" / job / "checkpoints"
        return sorted({int(f.parent.name[5:]) for f in root.glob(f"step-*/{file}")})

    def checkpointed(step: int) -> bool:  # every job, on both ranks, has a checkpoint at `step` or after
        return all(max(steps_held(k, j["name"], f), default=0) >= step
                   for j in JOBS for k, f in ((0, "state.json"), (1, "stage1.pt")))

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not checkpointed(25):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert not (ranks / "rank1" / "out" / "copy" / "checkpoints" / "step-000010" / "stage0.pt").exists()
    for job in JOBS:  # while training: step 5's went once both ranks held 10 and 15 (both hold 25 or later now)
        assert all(5 not in steps_held(k, job["name"]) for k in (0, 1)), job["name"]
    resumed = subprocess.run([*cmd[:4], f"--master-port={free_port()}", *cmd[5:], "--resume"], capture_output=True,
                             text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out = ranks / "rank0" / "out"
    summary = json.loads((out / "run_summary.json").read_text())
    assert all(j["resumed_steps"] >= 20 for j in summary["jobs"].values()), summary["jobs"]
    assert_same_adapters(single.output_dir, out)
    for job in JOBS:  # checkpoints at 5, 10, ..., 55 (not the last step): the newest 2 are left on each disk
        assert [steps_held(k, job["name"]) for k in (0, 1)] == [[50, 55], [50, 55]], job["name"]
        folder = ranks / "rank1" / "out" / job["name"] / "checkpoints" / "step-000050"
        assert sorted(p.name for p in folder.iterdir()) == ["stage1.pt"]


def test_a_stage_out_of_gpu_memory_says_which_settings_to_change(tmp_path, tiny_models, datasets):
    """A stage's batch that does not fit: that rank names the micro-batch, its shape and
    the run-file fields to lower, without a traceback; the others stop as for a lost rank."""
    entry = (str(Path(__file__).with_name("oom_entry.py")),)
    proc = torchrun(2, run_file(tmp_path, tiny_models["llama"], datasets, "out", pipeline_timeout_s=20), entry=entry,
                    MLORA_TEST_OOM_RANK="1", MLORA_TEST_OOM_AT="3")
    assert proc.returncode != 0
    line = next((x for x in proc.stderr.splitlines() if "out of GPU memory" in x), "")
    assert line.startswith("mlora: rank 1 (stage 1): out of GPU memory at the forward of micro-batch "), proc.stderr[-3000:]
    assert " rows x " in line and "lower run.max_tokens_per_batch (now 8192), or a job's micro_batch_size" in line
    assert "[rank1]:" not in proc.stderr  # no traceback from the rank that said why


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_pipeline_refuses_the_triton_backend_without_a_gpu(tmp_path, tiny_models, datasets):
    """Rank 0 checks `backend: triton` against the stages' device with the other inputs:
    every rank stops before loading a weight, the message naming the file and field."""
    run = run_file(tmp_path, tiny_models["llama"], datasets, "refused", backend="triton")
    proc = torchrun(2, run, timeout=120, TRITON_INTERPRET="0")  # (the test process has the interpreter on)
    assert proc.returncode != 0
    assert "mlora train: error: " in proc.stderr and "refused.yaml: run: backend: 'triton'" in proc.stderr, \
        proc.stderr[-2000:]
    assert not (tmp_path / "refused").exists()


def test_a_killed_rank_stops_every_rank_with_an_error(tmp_path, tiny_models, datasets):
    timeout_s = 8
    run = run_file(tmp_path, tiny_models["llama"], datasets, "killed", max_steps=400, pipeline_timeout_s=timeout_s)
    port = free_port()
    procs = []
    for rank in range(3):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "mlora", "train", str(run), "--plain"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    metrics = tmp_path / "killed" / "copy" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.2)
    assert metrics.is_file(), "the run never got going"
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    errors = {}
    for rank in (0, 2):
        try:
            _, errors[rank] = procs[rank].communicate(timeout=timeout_s + 30)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} still running {timeout_s + 30} s after rank 1 was killed")
        assert procs[rank].returncode != 0
        assert f"mlora: rank {rank} (stage {rank}): " in errors[rank], errors[rank][-2000:]
    # The first survivor to notice can only have noticed rank 1; the other may instead
    # lose that one as it exits (rank 2 waiting for rank 0's targets saw rank 0's
    # connection close first in one CI run), so each names a lost rank, one of them rank 1.
    assert all("lost rank" in err or "no answer from rank" in err for err in errors.values()), errors
    assert any("lost rank 1 (stage 1)" in err or "no answer from rank 1 (stage 1)" in err
               for err in errors.values()), errors
    assert time.time() - killed_at < timeout_s + 30
    # rank 0 saved the run as failed, with its own line, and the jobs as stopped (--resume)
    summary = json.loads((tmp_path / "killed" / "run_summary.json").read_text())
    assert summary["run"]["state"] == "failed" and summary["run"]["error"] in errors[0], summary["run"]
    assert {j["state"] for j in summary["jobs"].values()} == {"stopped"}


def test_pipeline_resume_after_a_crash_ends_with_the_uninterrupted_adapters(tmp_path, tiny_models, datasets):
    """Crash a 2-stage run mid-way, resume it: same adapters as the same run uninterrupted."""
    steps = 120

    def with_checkpoints(out: str) -> Path:
        run = run_file(tmp_path, tiny_models["llama"], datasets, out, max_steps=steps, pipeline_timeout_s=10)
        raw = yaml.safe_load(run.read_text())
        raw["defaults"]["save_steps"] = 3
        run.write_text(yaml.safe_dump(raw))
        return run

    full = torchrun(2, with_checkpoints("full"))
    assert full.returncode == 0, full.stderr[-3000:]
    run = with_checkpoints("crash")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "mlora", "train", str(run), "--plain"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = tmp_path / "crash"

    def ready() -> bool:
        files = ("state.json", "stage0.pt", "stage1.pt")
        return all((out / j["name"] / "checkpoints" / "step-000006" / f).is_file() for j in JOBS for f in files)

    deadline = time.time() + 120
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.05)
    kill_everything_running(str(run))  # the launcher and its workers die at once, mid-run
    proc.wait()
    assert ready(), "no complete checkpoint before the crash"
    assert not (out / "trace.json").exists(), "the run ended before the crash: nothing to resume"
    resumed = torchrun(2, run, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_same_adapters(tmp_path / "full", out)
    rows = [json.loads(x) for x in (out / "copy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, steps + 1))
    # every evaluation once, none lost at the crash (one due at the checkpoint runs on resume)
    for job in JOBS:
        want, got = (eval_losses(d / job["name"] / "metrics.jsonl") for d in (tmp_path / "full", out))
        assert [s for s, _ in want] == [s for s, _ in got], job["name"]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), job["name"]
    assert [s for s, _ in eval_losses(out / "copy" / "metrics.jsonl")] == list(range(2, steps + 1, 2))


def test_notes_hold_floats_and_device_scalars_alike():
    """A note's value is a float (a loss) or a 0-d tensor (a stage's norm partial, never read
    on the host there); both land in the float64 rows a message carries."""
    from mlora.runtime.transport import NOTE_GRAD_NORM, NOTE_GRAD_SQ, NOTE_LOSS, Note, notes_tensor

    partial = torch.tensor([0.5, 1.5], dtype=torch.float32).square().sum()  # 2.5 in fp32
    rows = notes_tensor([Note(NOTE_GRAD_SQ, 1, 7, partial), Note(NOTE_LOSS, 3, 4, 0.25),
                         Note(NOTE_GRAD_NORM, 0, 2, partial.double().sqrt())], torch.device("cpu"))
    assert rows.dtype == torch.float64 and rows.shape == (3, 4)
    assert rows[:, :3].tolist() == [[NOTE_GRAD_SQ, 1, 7], [NOTE_LOSS, 3, 4], [NOTE_GRAD_NORM, 0, 2]]
    assert rows[:, 3].tolist() == [2.5, 0.25, 2.5**0.5]


@pytest.mark.parametrize("logged", [True, False])
def test_a_resumed_pipeline_evaluates_first_when_the_crash_lost_the_checkpoints_evaluation(tmp_path, tiny_models, datasets, logged):
    """A pipeline's evaluation reaches rank 0 after the checkpoint of the same step is
    written; a run killed in between resumes by evaluating the weights it restarts from."""
    from mlora.runtime.checkpoint import STATE, step_dir
    from mlora.runtime.output import SUMMARY
    from mlora.runtime.pipeline_plan import Driver

    run = run_file(tmp_path, tiny_models["llama"], datasets, "out")
    raw = yaml.safe_load(run.read_text())
    raw["jobs"] = [j for j in raw["jobs"] if j["name"] == "copy"]  # eval_steps 2, 4 steps
    run.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    folder = step_dir(out, "copy", 2)
    folder.mkdir(parents=True)
    (folder / STATE).write_text(json.dumps({"step": 2, "tokens": 100, "losses": [3.0, 2.9]}))
    for k in range(2):
        (folder / f"stage{k}.pt").write_bytes(b"")
    (out / SUMMARY).write_text("{}")
    rows = [{"kind": "train", "job": "copy", "step": s, "loss": 3.0} for s in (1, 2, 3)]
    if logged:
        rows.insert(2, {"kind": "eval", "job": "copy", "step": 2, "eval_loss": 2.5})
    (out / "copy" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    plan = Driver(load_run_file(run), 2, resume=True, overwrite=False, live=False).plan()
    (_, schedule), = plan.phases
    first = schedule.micro_batches[0].slices[0]
    assert (first.eval, first.step, first.micro) == ((False, 2, 0) if logged else (True, 2, 0))
    evals = sorted({s.step for m in schedule.micro_batches for s in m.slices if s.eval})
    assert evals == ([4] if logged else [2, 4])
    kept = [json.loads(line) for line in (out / "copy" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in kept] == [("train", 1), ("train", 2)] + [("eval", 2)] * logged


def test_ctrl_c_stops_every_rank_cleanly_and_resume_finishes(tmp_path, tiny_models, datasets):
    """Ctrl-C reaches torchrun, which passes it to the ranks: rank 0 saves the run as
    interrupted with its jobs stopped and says how to go on; no rank, and not the
    launcher, ends with a traceback; --resume then finishes the run."""
    run = run_file(tmp_path, tiny_models["llama"], datasets, "out", max_steps=150)
    raw = yaml.safe_load(run.read_text())
    raw["defaults"]["save_steps"] = 5
    run.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlora.runtime.torchrun_launch", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "mlora", "train", str(run), "--plain"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "copy" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 12):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "mlora: interrupted (SIGINT); the same launch with --resume continues" in stderr, stderr[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["run"]["state"] == "interrupted"
    assert {j["state"] for j in summary["jobs"].values()} <= {"stopped", "queued"}, summary["jobs"]
    assert all(j["finished_at"] is None for j in summary["jobs"].values())  # no adapter is written yet
    assert not any((out / j["name"] / "adapter_model.safetensors").exists() for j in JOBS)
    resumed = torchrun(2, run, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["run"]["state"] == "finished" and all(j["state"] == "finished" for j in summary["jobs"].values())
    assert [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"] == list(range(1, 151))
