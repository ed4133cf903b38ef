"""The single-process trainer: invariant 1, queueing, resume and eval, on a tiny real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlora.config import load_run_file
from mlora.model.stage import StageModel
from mlora.runtime.trainer import train

from conftest import write_run

JOBS = [
    # different ranks, targets, micro-batch sizes, accumulation, optimizers and schedules
    {"name": "copy", "dataset": "copy", "lora_r": 4, "target_modules": ["q_proj", "v_proj"], "micro_batch_size": 2,
     "gradient_accumulation_steps": 2, "learning_rate": 1e-2},
    {"name": "reverse", "dataset": "reverse", "lora_r": 8, "target_modules": "all", "micro_batch_size": 3,
     "learning_rate": 5e-3, "lr_scheduler": "cosine", "warmup_steps": 1, "lora_dropout": 0.1},
    {"name": "count", "dataset": "count", "lora_r": 2, "lora_alpha": 4, "target_modules": ["down_proj", "o_proj"],
     "micro_batch_size": 1, "gradient_accumulation_steps": 3, "optimizer": "sgd", "momentum": 0.9,
     "learning_rate": 0.05, "max_grad_norm": 0.05, "use_rslora": True},
]


def run_file(tmp_path: Path, model: Path, datasets: dict[str, Path], jobs: list[dict], out: str, **run) -> Path:
    resolved = [{**j, "dataset": str(datasets[j["dataset"]])} for j in jobs]
    raw = {
        "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
        "defaults": {"template": "plain", "cutoff_len": 32, "max_steps": 4, "seed": 3},
        "jobs": resolved,
        "run": {"output_dir": str(tmp_path / out), **run},
    }
    return write_run(tmp_path / f"{out}.yaml", raw)


def adapter(out: Path, job: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / job / "adapter_model.safetensors"))


def test_jobs_together_equal_alone(tmp_path, tiny_models, datasets):
    together = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, JOBS, "together")), live=False)
    for job in JOBS:
        alone = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, [job], f"alone-{job['name']}")), live=False)
        a, b = adapter(alone.output_dir, job["name"]), adapter(together.output_dir, job["name"])
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
        # the adapter moved away from its initialisation (B starts at zero)
        assert any(key.endswith("lora_B.weight") and a[key].abs().max() > 0 for key in a)


def test_token_budget_and_queue_do_not_change_adapters(tmp_path, tiny_models, datasets):
    base = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, JOBS, "base")), live=False)
    queued = train(
        load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, JOBS, "queued", max_concurrent_jobs=1, max_tokens_per_batch=64)),
        live=False,
    )
    summary = json.loads((queued.output_dir / "run_summary.json").read_text())["jobs"]
    order = sorted(summary, key=lambda j: summary[j]["started_at"])
    assert order == ["copy", "reverse", "count"]

    def step_times(job: str) -> list[float]:
        rows = (json.loads(line) for line in (queued.output_dir / job / "metrics.jsonl").read_text().splitlines())
        return [r["time"] for r in rows if r["kind"] == "train"]

    for first, second in zip(order, order[1:]):
        # one job trains at a time: the next starts once the last step of the one before
        # is done (its adapter may still be on its way to disk: written beside training)
        assert summary[second]["started_at"] >= step_times(first)[-1]
        assert step_times(second)[0] > summary[first]["started_at"]
        assert summary[second]["wait_s"] > 0
    for job in JOBS:
        a, b = adapter(base.output_dir, job["name"]), adapter(queued.output_dir, job["name"])
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)


def test_padding_batches_to_a_multiple_changes_no_adapter(tmp_path, tiny_models, datasets):
    """run.pad_to_multiple_of (recurring shapes for CUDA graphs) only adds right padding:
    same adapters, dropout masks included, and the batches really are padded."""
    base = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, JOBS, "unpadded")), live=False)
    spec = load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, JOBS, "padded", pad_to_multiple_of=24))
    lengths = []
    original = StageModel.forward

    def spy(self, inputs, layout, op_cache=None):
        lengths.append(layout.seq_len)
        return original(self, inputs, layout, op_cache)

    StageModel.forward = spy
    try:
        padded = train(spec, live=False)
    finally:
        StageModel.forward = original
    assert lengths and all(n % 24 == 0 for n in lengths)
    for job in JOBS:
        a, b = adapter(base.output_dir, job["name"]), adapter(padded.output_dir, job["name"])
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)


def test_resume_ends_with_the_same_adapters(tmp_path, tiny_models, datasets, monkeypatch):
    """Checkpoints are written on a thread: here each waits 0.2 s, while the jobs train
    on, and must still hold the state of its own step."""
    import time as time_mod

    import mlora.runtime.background_writer as writer

    jobs = [{**j, "save_steps": 2, "max_steps": 5} for j in JOBS]
    full = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, jobs, "full")), live=False)
    jobs = [{**j, "save_total_limit": 1} for j in jobs]  # the interrupted run keeps only its newest checkpoint
    spec = load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, jobs, "cut"))
    real = writer.write_checkpoint
    monkeypatch.setattr(writer, "write_checkpoint", lambda *a, **k: (time_mod.sleep(0.2), real(*a, **k))[1])
    stopped = train(spec, live=False, stop_after_batches=7)
    assert stopped.stopped_early
    summary = json.loads((stopped.output_dir / "run_summary.json").read_text())
    assert summary["run"]["state"] == "stopped"
    assert {j["state"] for j in summary["jobs"].values()} <= {"stopped", "finished"}
    assert "stopped" in {j["state"] for j in summary["jobs"].values()}
    kept = {j["name"]: sorted(p.name for p in (stopped.output_dir / j["name"] / "checkpoints").glob("step-*"))
            for j in jobs if (stopped.output_dir / j["name"] / "checkpoints").is_dir()}
    assert kept and all(len(names) == 1 for names in kept.values()), kept
    assert "step-000004" in {n for names in kept.values() for n in names}  # step 2's went when step 4's was written
    resumed = train(spec, resume=True, live=False)
    assert not resumed.stopped_early
    for job in jobs:
        a, b = adapter(full.output_dir, job["name"]), adapter(resumed.output_dir, job["name"])
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
    # metrics cover every step exactly once after the resume
    for job in jobs:
        rows = [json.loads(x) for x in (resumed.output_dir / job["name"] / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if r["kind"] == "train"]
        assert steps == list(range(1, 6))


def test_resume_refuses_a_job_whose_adapter_changed_and_takes_a_new_learning_rate(tmp_path, tiny_models, datasets):
    """A checkpoint records the adapter it was written for: --resume with another rank or
    other targets stops before any weight is read, naming the job and the change, and
    leaves the checkpoints as they were; the learning rate or step count may change."""
    from mlora.config import ConfigError

    jobs = [{**JOBS[0], "save_steps": 2, "max_steps": 6}]
    path = run_file(tmp_path, tiny_models["llama"], datasets, jobs, "cut")
    train(load_run_file(path), live=False, stop_after_batches=10)
    before = sorted(p.name for p in (tmp_path / "cut" / "copy" / "checkpoints").iterdir())
    for change, message in ((["jobs.copy.lora_r=8"], "lora_r: 4 -> 8"),
                            (["jobs.copy.target_modules=[q_proj]"], "target_modules: ['q_proj', 'v_proj'] -> ['q_proj']")):
        with pytest.raises(ConfigError) as err:
            train(load_run_file(path, change), resume=True, live=False)
        assert f"{path}: job 'copy': --resume: its checkpoint step-000004 was written for another adapter ({message})" \
            in str(err.value), str(err.value)
        assert sorted(p.name for p in (tmp_path / "cut" / "copy" / "checkpoints").iterdir()) == before
    resumed = train(load_run_file(path, ["jobs.copy.learning_rate=5e-3", "max_steps=7"]), resume=True, live=False)
    assert resumed.final_loss["copy"] > 0 and (resumed.output_dir / "copy" / "adapter_model.safetensors").is_file()


def test_eval_split_reports_eval_loss(tmp_path, tiny_models, datasets):
    jobs = [{**JOBS[0], "eval_split": 0.25, "eval_steps": 2}]
    result = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, jobs, "eval")), live=False)
    rows = [json.loads(x) for x in (result.output_dir / "copy" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 < r["eval_loss"] < 20 for r in evals)


def test_a_failed_adapter_write_names_the_job_and_the_others_are_written(tmp_path, tiny_models, datasets, monkeypatch,
                                                                         capsys):
    """Adapters go to disk on a writer thread: a write that fails is raised in the run,
    naming the job and its folder; the other jobs' adapters are still written whole."""
    import mlora.runtime.background_writer as writer
    from mlora.model.peft_io import CONFIG_FILE, load_adapter

    real = writer.save_adapter

    def full_disk(folder, meta, weights, *args, **kwargs):
        if Path(folder).name == "copy":
            raise OSError(28, "No space left on device")
        return real(folder, meta, weights, *args, **kwargs)

    monkeypatch.setattr(writer, "save_adapter", full_disk)
    jobs = [{**j, "max_steps": 2 if j["name"] == "count" else 4} for j in JOBS]  # count ends first
    spec = load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, jobs, "failing"))
    with pytest.raises(writer.WriteError, match=r"job 'copy': writing its adapter under .*copy failed: .*No space"):
        train(spec, live=False)
    out = tmp_path / "failing"
    assert not (out / "copy" / CONFIG_FILE).exists()
    summary = json.loads((out / "run_summary.json").read_text())  # not left "running"
    assert summary["run"]["state"] == "failed" and summary["run"]["error"].startswith("WriteError: job 'copy'")
    assert summary["jobs"]["copy"]["state"] == "stopped"
    for name in ("count", "reverse"):
        meta, weights = load_adapter(out / name)
        assert weights and meta.r == next(j["lora_r"] for j in JOBS if j["name"] == name)
    # from the command line: that line, exit status 1, no traceback
    from mlora.cli import main

    path = run_file(tmp_path, tiny_models["llama"], datasets, [{**JOBS[0], "max_steps": 1}], "cli")
    assert main(["train", str(path), "--plain"]) == 1
    err = capsys.readouterr().err
    assert "mlora train: error: job 'copy': writing its adapter under " in err and "No space left" in err, err[-2000:]
    assert "Traceback" not in err


def test_a_job_counts_as_finished_once_its_adapter_is_on_disk(tmp_path, tiny_models, datasets, monkeypatch):
    """With the writer slow, the run still ends with every adapter complete, and each
    job's finish time is when its folder was complete, after its last step."""
    import time as time_mod

    import mlora.runtime.background_writer as writer

    real = writer.save_adapter
    done_at = {}

    def slow(folder, meta, weights, *args, **kwargs):
        time_mod.sleep(0.3)
        out = real(folder, meta, weights, *args, **kwargs)
        done_at[Path(folder).name] = time_mod.time()
        return out

    monkeypatch.setattr(writer, "save_adapter", slow)
    result = train(load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, JOBS, "slow")), live=False)
    summary = json.loads((result.output_dir / "run_summary.json").read_text())["jobs"]
    for job in JOBS:
        name = job["name"]
        assert (result.output_dir / name / "adapter_config.json").is_file()
        rows = [json.loads(line) for line in (result.output_dir / name / "metrics.jsonl").read_text().splitlines()]
        last_step = max(r["time"] for r in rows if r["kind"] == "train")
        assert summary[name]["state"] == "finished"
        assert summary[name]["finished_at"] >= max(done_at[name], last_step + 0.3)


def test_out_of_gpu_memory_names_the_batch_and_the_settings_and_resume_finishes(tmp_path, tiny_models, datasets,
                                                                               monkeypatch, capsys):
    """torch's out-of-memory error in a fused batch (raised here by hand: a CPU has no GPU
    to fill): the run ends `failed` with the batch's shape and the fields to lower, not a
    traceback; the launch's exit status is 1; checkpoints written before it resume."""
    from mlora.monitor.status import render_status
    from mlora.runtime.launch import train_from_cli

    jobs = [{**j, "save_steps": 2, "max_steps": 5} for j in JOBS]
    path = run_file(tmp_path, tiny_models["llama"], datasets, jobs, "out")
    real, calls = StageModel.forward, [0]

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 9:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StageModel, "forward", forward)
    assert train_from_cli(str(path), [], resume=False, overwrite=False, live=False) == 1
    err = capsys.readouterr().err
    assert "mlora: out of GPU memory in a fused batch of " in err and " rows x " in err, err[-2000:]
    assert "(jobs " in err and "lower run.max_tokens_per_batch (now 8192), or a job's micro_batch_size" in err
    assert "set run.gradient_checkpointing: true" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["run"]["state"] == "failed"
    assert "stopped" in {j["state"] for j in summary["jobs"].values()}
    status = render_status(tmp_path / "out")
    assert status.startswith("run out (failed)") and "error: out of GPU memory in a fused batch of " in status
    monkeypatch.setattr(StageModel, "forward", real)
    resumed = train(load_run_file(path), resume=True, live=False)
    assert all((resumed.output_dir / j["name"] / "adapter_model.safetensors").is_file() for j in jobs)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_ends_the_run_cleanly_and_resume_finishes_it(tmp_path, tiny_models, datasets, signame):
    """Ctrl-C (SIGINT), or a scheduler's SIGTERM, in the middle of a run: no traceback,
    exit status 128 + the signal, the run and its unfinished jobs marked interrupted /
    stopped (not left "running"), the way to continue printed; `--resume` then finishes
    every job."""
    import os
    import signal
    import subprocess
    import sys
    import time

    signum = getattr(signal, signame)

    jobs = [{**j, "save_steps": 5, "max_steps": 300} for j in JOBS[:2]]
    run = run_file(tmp_path, tiny_models["llama"], datasets, jobs, "cut")
    cmd = [sys.executable, "-m", "mlora", "train", str(run), "--plain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "cut" / "copy" / "checkpoints" / "step-000005"
    deadline = time.time() + 120
    while not first.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert first.is_dir() and proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"interrupted ({signame}); continue with `mlora train {run} --resume`" in err, err[-3000:]
    summary = json.loads((tmp_path / "cut" / "run_summary.json").read_text())
    assert summary["run"]["state"] == "interrupted"
    assert {j["state"] for j in summary["jobs"].values()} == {"stopped"}

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "cut" / "run_summary.json").read_text())
    assert summary["run"]["state"] == "finished"
    assert all(adapter(tmp_path / "cut", j["name"]) for j in jobs)


def test_ctrl_c_while_starting_ends_with_one_line(tmp_path, tiny_models, datasets):
    """Ctrl-C before the run is under way (Python importing torch, the model loading, data
    tokenising): one line and exit status 130, not a KeyboardInterrupt traceback from
    wherever the import was, nor torch's C++ aborting on it ("terminate called", -6), nor
    CPython ending the process by the signal (-2) after the line (both seen at 0.3-2.7 s
    before torch's import held SIGINT back and the program exited at once)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = run_file(tmp_path, tiny_models["llama"], datasets, JOBS, "early")
    for delay in (0.3, 0.8):  # importing torch alone takes longer
        proc = subprocess.Popen([sys.executable, "-m", "mlora", "train", str(run), "--plain"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err and "terminate" not in err, (delay, err[-3000:])
        assert err.strip().splitlines()[-1] == "mlora train: interrupted"


def test_a_run_stopped_before_its_first_step_leaves_a_folder_the_same_command_reuses(tmp_path, tiny_models, datasets):
    """Everything a run sets up before training (output folder claimed, model loaded,
    trainer built) writes no file: a Ctrl-C there leaves an empty folder, which the same
    command takes again (a folder with files but no run summary is refused as not ours,
    even with --overwrite: TensorBoard's event file, opened eagerly, left exactly that)."""
    from mlora.runtime.trainer import Trainer, prepare

    spec = load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, JOBS, "early"))
    Trainer(prepare(spec), live=False)  # the run would start here
    out = tmp_path / "early"
    assert out.is_dir() and list(out.iterdir()) == []
    result = train(spec, live=False)
    assert all((result.output_dir / j["name"] / "adapter_model.safetensors").is_file() for j in JOBS)
    assert any((out / "tensorboard").iterdir())  # the event file came with the first row


def test_gradient_checkpointing_keeps_less_for_the_backward_and_changes_no_adapter(tmp_path, tiny_models, datasets):
    """run.gradient_checkpointing: each block keeps only its input and runs again in the
    backward (same dropout masks, same routing): the same adapters and losses, and far
    fewer bytes held for the backward."""

    def run(out: str, **flags) -> tuple[object, int]:
        held = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        spec = load_run_file(run_file(tmp_path, tiny_models["llama"], datasets, JOBS, out, **flags))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = train(spec, live=False)
        return result, sum(held.values())

    plain, plain_bytes = run("plain")
    recomputed, recomputed_bytes = run("recomputed", gradient_checkpointing=True)
    for job in JOBS:
        a, b = adapter(plain.output_dir, job["name"]), adapter(recomputed.output_dir, job["name"])
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
        losses = [[json.loads(x)["loss"] for x in (r.output_dir / job["name"] / "metrics.jsonl").read_text().splitlines()]
                  for r in (plain, recomputed)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert recomputed_bytes < 0.25 * plain_bytes, (recomputed_bytes, plain_bytes)  # 1.3 MB against 16.6 MB
