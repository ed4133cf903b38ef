"""Bad input fails before any compute, with a message naming the file and field; nothing
already written is lost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_run

ROOT = Path(__file__).resolve().parents[1]


def mlora(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlora", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def base_run(tmp_path: Path, model: Path, dataset: Path, **job) -> dict:
    return {
        "model": {"path": str(model), "device": "cpu"},
        "defaults": {"template": "plain", "cutoff_len": 32, "max_steps": 2},
        "jobs": [{"name": "j", "dataset": str(dataset), **job}],
        "run": {"output_dir": str(tmp_path / "out")},
    }


def broken_model_dirs(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    bert = tmp_path / "bert"
    shutil.copytree(good, bert)
    cfg = json.loads((bert / "config.json").read_text())
    cfg["model_type"] = "bert"
    (bert / "config.json").write_text(json.dumps(cfg))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(good, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    return {
        "no config": (no_config, "has no config.json"),
        "unsupported": (bert, "model_type 'bert' is not supported"),
        "no weights": (no_weights, "no *.safetensors weight files"),
    }


def test_bad_model_folders(tmp_path, tiny_models, datasets):
    for label, (folder, message) in broken_model_dirs(tmp_path, tiny_models["llama"]).items():
        run = write_run(tmp_path / f"{label.replace(' ', '-')}.yaml", base_run(tmp_path, folder, datasets["copy"]))
        proc = mlora("validate", str(run), cwd=tmp_path)
        assert proc.returncode == 2, (label, proc.stdout, proc.stderr)
        assert message in proc.stderr and str(folder) in proc.stderr, (label, proc.stderr)
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "line 2"),
        ('{"instruction": "a", "input": "x"}\n', "output"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', "wizard"),
        ("", "empty"),
    ],
    ids=["bad json", "missing output", "unknown role", "empty"],
)
def test_bad_datasets(tmp_path, tiny_models, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    run = write_run(tmp_path / "run.yaml", base_run(tmp_path, tiny_models["llama"], data))
    proc = mlora("train", str(run), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "data.jsonl" in proc.stderr and message in proc.stderr and "'j'" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()  # refused before the output folder was made


def test_init_from_that_does_not_fit(tmp_path, tiny_models, datasets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"])).save_pretrained(str(tmp_path / "start"))
    run = write_run(tmp_path / "run.yaml", base_run(tmp_path, tiny_models["llama"], datasets["copy"], lora_r=8, init_from=str(tmp_path / "start")))
    proc = mlora("validate", str(run), cwd=tmp_path)
    assert proc.returncode == 2
    assert "init_from" in proc.stderr and "lora_r=16" in proc.stderr and "job has 8" in proc.stderr, proc.stderr


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_output_is_never_overwritten_without_flag(tmp_path, tiny_models, datasets):
    run = write_run(tmp_path / "run.yaml", base_run(tmp_path, tiny_models["llama"], datasets["copy"]))
    first = mlora("train", str(run), "--plain", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = digest(tmp_path / "out")
    assert "j/adapter_model.safetensors" in before

    again = mlora("train", str(run), "--plain", "learning_rate=0.5", cwd=tmp_path)
    assert again.returncode == 2
    assert "holds an earlier run" in again.stderr and "--overwrite" in again.stderr
    assert digest(tmp_path / "out") == before

    both = mlora("train", str(run), "--resume", "--overwrite", cwd=tmp_path)
    assert both.returncode == 2 and "contradict" in both.stderr

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    other = mlora("train", str(run), "--overwrite", f"output_dir={foreign}", cwd=tmp_path)
    assert other.returncode == 2 and "not an mlora run folder" in other.stderr
    assert (foreign / "notes.txt").read_text() == "mine"

    replaced = mlora("train", str(run), "--plain", "--overwrite", "learning_rate=0.5", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert digest(tmp_path / "out")["j/adapter_model.safetensors"] != before["j/adapter_model.safetensors"]


@pytest.mark.skipif(torch_cuda_available(), reason="checks the refusal on a machine without a GPU")
def test_the_triton_backend_without_a_gpu_is_refused_before_any_compute(tmp_path, tiny_models, datasets):
    """`backend: triton` on the CPU names the file and field (it used to fail mid-step in
    Triton's driver lookup); Triton's CPU interpreter is the one way to run it there."""
    raw = base_run(tmp_path, tiny_models["llama"], datasets["copy"])
    raw["run"]["backend"] = "triton"
    run = write_run(tmp_path / "run.yaml", raw)
    for command in ("validate", "train"):
        proc = mlora(command, str(run), cwd=tmp_path, TRITON_INTERPRET="0")
        assert proc.returncode == 2, (command, proc.stderr)
        assert "run.yaml: run: backend: 'triton'" in proc.stderr and "CUDA GPU" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    interpreted = mlora("validate", str(run), cwd=tmp_path, TRITON_INTERPRET="1")
    assert interpreted.returncode == 0, interpreted.stderr

    raw["run"]["backend"] = "auto"
    raw["model"]["device"] = "cuda"
    proc = mlora("train", str(write_run(tmp_path / "cuda.yaml", raw)), cwd=tmp_path)
    assert proc.returncode == 2
    assert "cuda.yaml: model: device: 'cuda'" in proc.stderr and "no CUDA device" in proc.stderr, proc.stderr


def test_validate_and_train_say_what_cutoff_len_takes(tmp_path, tiny_models):
    """Examples dropped or cut by cutoff_len are otherwise silently not learned."""
    data = tmp_path / "long.jsonl"
    data.write_text('{"instruction": "' + "word " * 40 + '", "output": "late"}\n'
                    '{"instruction": "short", "output": "' + "a b c d e f g h " * 4 + '"}\n'
                    '{"instruction": "ok", "output": "fine"}\n')
    run = write_run(tmp_path / "run.yaml", base_run(tmp_path, tiny_models["llama"], data, cutoff_len=16))
    checked = mlora("validate", str(run), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    note = "1 of 3 examples dropped (no response token within cutoff_len=16); 1 of 3 cut to 16 tokens"
    assert f"  note: {note}" in checked.stdout, checked.stdout
    trained = mlora("train", str(run), "--plain", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert f"mlora: job 'j': {note}" in trained.stderr, trained.stderr


def test_a_folder_holding_only_a_pipelines_start_marker_counts_as_empty(tmp_path):
    """A pipeline run stopped while it began (its ranks had not yet checked they share the
    output folder) leaves its marker and nothing else: the folder is still free to use."""
    from mlora.runtime.output import SHARED_MARKER, OutputError, prepare_output

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{SHARED_MARKER}0123abcd").touch()
    assert prepare_output(tmp_path / "out", resume=False, overwrite=False) == tmp_path / "out"
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an mlora run folder"):
        prepare_output(tmp_path / "out", resume=False, overwrite=False)


def test_validate_plans_a_pipeline_only_of_two_stages_or_more(tmp_path, tiny_models, datasets):
    run = write_run(tmp_path / "run.yaml", base_run(tmp_path, tiny_models["llama"], datasets["copy"]))
    one = mlora("validate", str(run), "--stages", "1", cwd=tmp_path)
    assert one.returncode == 2 and "--stages 1: a pipeline has at least 2 stages" in one.stderr
    many = mlora("validate", str(run), "--stages", "64", cwd=tmp_path)
    assert many.returncode == 2 and "run.yaml: model: path:" in many.stderr and "into 64 stages" in many.stderr, many.stderr


def test_validate_says_float16_trains_with_loss_scaling(tmp_path, tiny_models, datasets):
    raw = base_run(tmp_path, tiny_models["llama"], datasets["copy"])
    run = write_run(tmp_path / "run.yaml", {**raw, "model": {**raw["model"], "dtype": "float16"}})
    checked = mlora("validate", str(run), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "note: " + str(run) + ": model: dtype: float16 trains with dynamic loss scaling" in checked.stdout
    plain = mlora("validate", str(write_run(tmp_path / "bf16.yaml", raw)), cwd=tmp_path)
    assert "loss scaling" not in plain.stdout


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path, tiny_models, datasets):
    """`mlora validate RUN | head -1`: the reader gone, the command ends with 141 (as
    SIGPIPE would end it), no traceback."""
    run = write_run(tmp_path / "run.yaml", base_run(tmp_path, tiny_models["llama"], datasets["copy"]))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-m", "mlora", "validate", str(run)], cwd=tmp_path, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_examples_longer_than_the_models_positions_are_noted(tmp_path, tiny_models):
    """The tiny model has 512 positions; a cutoff_len of 2048 lets a long record run past them."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"instruction": "w " * 700, "output": "ok"}) + "\n"
                    + json.dumps({"instruction": "short", "output": "x"}) + "\n")
    raw = base_run(tmp_path, tiny_models["llama"], data, cutoff_len=2048)
    checked = mlora("validate", str(write_run(tmp_path / "run.yaml", raw)), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "note: 1 of 2 examples run past the model's 512 positions (max_position_embeddings; the longest has" \
        in checked.stdout, checked.stdout
    within = mlora("validate", str(write_run(tmp_path / "ok.yaml", base_run(tmp_path, tiny_models["llama"], data))),
                   cwd=tmp_path)
    assert "positions" not in within.stdout
