"""MeteoRA jobs in run files: the trainer's gates against the single-job reference,
fused with LoRA jobs == alone, waiting for LoRA jobs of the run, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import rel, write_run
from safetensors.torch import load_file

from mlora.config import ConfigError, load_run_file
from mlora.meteora import suite
from mlora.meteora.adapter import MeteoraAdapter, linear_shapes
from mlora.meteora.generate import load_model
from mlora.meteora.train import examples, train_gates
from mlora.model.peft_io import AdapterMeta, save_adapter
from mlora.model.stage import base_linear_shapes
from mlora.runtime.trainer import train

TARGETS = ("q_proj", "v_proj", "down_proj")


def random_loras(folder: Path, model: Path, n: int, r: int = 4, targets: tuple[str, ...] = TARGETS) -> list[Path]:
    shapes, _ = base_linear_shapes(model)
    out = []
    for k in range(n):
        gen = torch.Generator().manual_seed(100 + k)
        weights = {p: (torch.randn(r, d_in, generator=gen) * 0.2, torch.randn(d_out, r, generator=gen) * 0.2)
                   for p, (d_in, d_out) in shapes.items() if p.rsplit(".", 1)[1] in targets}
        out.append(save_adapter(folder / f"lora{k}", AdapterMeta(r, 2.0 * r, 0.0, False, targets, str(model)), weights))
    return out


def task_file(path: Path, tasks: dict[int, int], n: int, chains: int = 0) -> Path:
    """n records of suite tasks, relabelled: suite task → adapter index; then `chains`
    records of two of those tasks in a row (each part tagged)."""
    records = [{**r, "task": tasks[r["task"]]} for r in suite.read_jsonl(suite.DATA_DIR / "mixed_train.jsonl") if r["task"] in tasks]
    by_task = [[r for r in records if r["task"] == t] for t in sorted(set(tasks.values()))]
    chained = [{"parts": [by_task[k % len(by_task)][-1 - k], by_task[(k + 1) % len(by_task)][-1 - k]]} for k in range(chains)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:n] + chained))
    return path


def meteora_job(name: str, adapters: list, dataset: Path, **extra) -> dict:
    return {"name": name, "kind": "meteora", "adapters": [str(a) for a in adapters], "dataset": str(dataset), **extra}


def run(tmp_path: Path, model: Path, jobs: list[dict], out: str, device: str = "cpu", **run_fields) -> Path:
    raw = {
        "model": {"path": str(model), "dtype": "float32", "device": device},
        "defaults": {"template": "plain", "cutoff_len": 48, "seed": 5, "max_grad_norm": None},
        "jobs": jobs,
        "run": {"output_dir": str(tmp_path / out), **run_fields},
    }
    return write_run(tmp_path / f"{out}.yaml", raw)


def gates(out: Path, job: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / job / "gates.safetensors"))


def test_gates_match_the_single_job_reference(tmp_path, tiny_models):
    """Same init, data and AdamW: the trainer's gates == hooks on the plain HF model."""
    model_dir = tiny_models["llama"]
    folders = random_loras(tmp_path, model_dir, 3)
    data = task_file(tmp_path / "d.jsonl", {0: 0, 3: 1, 5: 2}, 12)
    job = meteora_job("mix", folders, data, micro_batch_size=12, num_epochs=3, learning_rate=1e-2, top_k=2, temperature=0.7)
    result = train(load_run_file(run(tmp_path, model_dir, [job], "mlora")), live=False)

    model, tok = load_model(model_dir)
    shapes, layers = linear_shapes(model)
    adapter = MeteoraAdapter.from_adapters(folders, shapes, n_layers=layers, top_k=2, temperature=0.7, seed=5, backend="loop")
    start = {p: g.detach().clone() for p, g in adapter.gates.items()}
    train_gates(model, tok, adapter, examples(tok, suite.read_jsonl(data), "plain", 48), steps=3, batch_size=12, lr=1e-2)

    got = gates(result.output_dir, "mix")
    assert len(got) == 4 * len(TARGETS)
    for path, gate in adapter.gates.items():
        assert not torch.allclose(gate, start[path])  # the reference moved
        torch.testing.assert_close(got[path + ".gate.weight"], gate.detach(), rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in (result.output_dir / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 <= r["route_acc"] <= 1 and r["gate_loss"] > 0 for r in rows)


def test_a_float16_job_scales_its_gate_loss_with_its_lm_loss(tmp_path, tiny_models):
    """float16 loss scaling multiplies the gate loss by the job's scale too (its share of
    the gates' gradient is kept). The first step overflows at 2^16 and is skipped, so 3
    float16 steps are 2 float32 steps (one batch of all records a step): gates within
    float16's routing noise (0.19 here; 1.4 with the gate loss left unscaled)."""
    model_dir = tiny_models["llama"]
    folders = random_loras(tmp_path, model_dir, 3)
    data = task_file(tmp_path / "d.jsonl", {0: 0, 3: 1, 5: 2}, 12)
    out = {}
    for dtype, steps in (("float32", 2), ("float16", 3)):
        job = meteora_job("mix", folders, data, micro_batch_size=12, max_steps=steps, learning_rate=1e-2, top_k=2,
                          temperature=0.7)
        out[dtype] = train(load_run_file(run(tmp_path, model_dir, [job], dtype), [f"model.dtype={dtype}"]),
                           live=False).output_dir
    rows = [json.loads(line) for line in (out["float16"] / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_scale"] for r in rows] == [2.0**16, 2.0**15, 2.0**15]
    want, got = gates(out["float32"], "mix"), gates(out["float16"], "mix")
    for key in want:
        assert rel(got[key], want[key]) < 0.5, key


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_with_lora_jobs_equals_alone(tmp_path, tiny_models, datasets, recompute):
    """Also with run.gradient_checkpointing (blocks rerun in the backward must not record
    gate logits a second time)."""
    model_dir = tiny_models["llama"]
    folders = random_loras(tmp_path, model_dir, 2)
    data = task_file(tmp_path / "d.jsonl", {1: 0, 6: 1}, 16, chains=4)
    mix = meteora_job("mix", folders, data, micro_batch_size=3, gradient_accumulation_steps=2, max_steps=3,
                      learning_rate=5e-3, top_k=1, max_grad_norm=0.5)
    lora = {"name": "copy", "dataset": str(datasets["copy"]), "lora_r": 4, "micro_batch_size": 2, "max_steps": 4,
            "target_modules": "all", "learning_rate": 1e-2}
    together = train(load_run_file(run(tmp_path, model_dir, [lora, mix], "together", max_tokens_per_batch=200,
                                       gradient_checkpointing=recompute)), live=False)
    alone = train(load_run_file(run(tmp_path, model_dir, [mix], "alone")), live=False)
    a, b = gates(alone.output_dir, "mix"), gates(together.output_dir, "mix")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert (together.output_dir / "copy" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_a_meteora_folder_is_written_while_the_other_jobs_train(tmp_path, tiny_models, datasets, monkeypatch, device):
    """A finished MeteoRA job's folder goes to the writer thread (on CUDA: copied on the
    writer's stream): a LoRA job still training logs steps while it is written, and the
    MeteoRA job counts as finished once its folder is complete."""
    import time as time_mod

    import mlora.meteora.adapter as meteora_adapter

    real = meteora_adapter.write_meteora
    window = {}

    def slow(folder, *args, **kwargs):
        window["start"] = time_mod.time()
        time_mod.sleep(1.0)
        out = real(folder, *args, **kwargs)
        window["end"] = time_mod.time()
        return out

    monkeypatch.setattr(meteora_adapter, "write_meteora", slow)
    model_dir = tiny_models["llama"]
    folders = random_loras(tmp_path, model_dir, 2)
    data = task_file(tmp_path / "d.jsonl", {1: 0, 6: 1}, 8)
    mix = meteora_job("mix", folders, data, micro_batch_size=4, max_steps=2, learning_rate=5e-3, top_k=1)
    lora = {"name": "copy", "dataset": str(datasets["copy"]), "lora_r": 4, "micro_batch_size": 2, "max_steps": 40,
            "target_modules": ["q_proj"], "learning_rate": 1e-2}
    result = train(load_run_file(run(tmp_path, model_dir, [mix, lora], "beside", device)), live=False)
    summary = json.loads((result.output_dir / "run_summary.json").read_text())["jobs"]
    assert summary["mix"]["state"] == "finished" and summary["mix"]["finished_at"] >= window["end"]
    assert (result.output_dir / "mix" / "meteora_config.json").is_file() and gates(result.output_dir, "mix")
    rows = [json.loads(line) for line in (result.output_dir / "copy" / "metrics.jsonl").read_text().splitlines()]
    during = [r for r in rows if r["kind"] == "train" and window["start"] < r["time"] < window["end"]]
    assert during, "the LoRA job stood still while the MeteoRA folder was written"


def test_waits_for_the_runs_loras_and_loads_after_a_move(tmp_path, tiny_models):
    model_dir = tiny_models["llama"]
    data = {name: task_file(tmp_path / f"{name}.jsonl", {i: 0}, 24) for i, name in ((0, "reverse"), (1, "upper"))}
    loras = [{"name": n, "dataset": str(p), "lora_r": 4, "micro_batch_size": 8, "max_steps": 6, "learning_rate": 1e-2,
              "target_modules": ["q_proj", "v_proj"]} for n, p in data.items()]
    mix = {"name": "mix", "kind": "meteora", "adapters": ["reverse", "upper"], "max_steps": 5, "micro_batch_size": 8,
           "learning_rate": 2e-2, "datasets": {"reverse": str(data["reverse"]), "1": str(data["upper"])}}
    result = train(load_run_file(run(tmp_path, model_dir, [mix, *loras], "deps")), live=False)
    summary = json.loads((result.output_dir / "run_summary.json").read_text())["jobs"]
    assert summary["mix"]["started_at"] >= max(summary[n]["finished_at"] for n in data)
    config = json.loads((result.output_dir / "mix" / "meteora_config.json").read_text())
    assert [a["folder"] for a in config["adapters"]] == ["../reverse", "../upper"]
    moved = shutil.copytree(result.output_dir, tmp_path / "moved")
    shutil.rmtree(result.output_dir)
    model, _ = load_model(model_dir)
    shapes, layers = linear_shapes(model)
    loaded = MeteoraAdapter.load(moved / "mix", shapes, n_layers=layers)
    assert loaded.n_adapters == 2 and len(loaded.gates) == 2 * 4
    upper = load_file(str(moved / "upper" / "adapter_model.safetensors"))
    torch.testing.assert_close(loaded.lora_a["model.layers.1.self_attn.q_proj"][1],
                               upper["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"])


def test_resume_gives_the_uninterrupted_gates(tmp_path, tiny_models):
    model_dir = tiny_models["llama"]
    folders = random_loras(tmp_path, model_dir, 2)
    data = task_file(tmp_path / "d.jsonl", {2: 0, 7: 1}, 16)
    mix = meteora_job("mix", folders, data, micro_batch_size=4, max_steps=6, save_steps=2, learning_rate=1e-2, train_loras=True)
    full = train(load_run_file(run(tmp_path, model_dir, [mix], "full")), live=False)
    path = run(tmp_path, model_dir, [mix], "cut")
    first = train(load_run_file(path), live=False, stop_after_batches=3)
    assert first.stopped_early
    resumed = train(load_run_file(path), resume=True, live=False)
    a, b = gates(full.output_dir, "mix"), gates(resumed.output_dir, "mix")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    # train_loras: the mixed adapters trained too and were written beside the gates
    trained = load_file(str(resumed.output_dir / "mix" / "adapters" / "lora0" / "adapter_model.safetensors"))
    original = load_file(str(folders[0] / "adapter_model.safetensors"))
    assert any(not torch.equal(trained[k], original[k]) for k in original)


@pytest.mark.parametrize("job, message", [
    ({"adapters": []}, "adapters: a meteora job needs at least one adapter"),
    ({"adapters": ["nowhere"], "top_k": 1}, "adapters: 'nowhere' is neither a job of this run nor a PEFT adapter folder"),
    ({"top_k": 3}, "top_k: must be in 1..2"),
    ({"temperature": 0}, "temperature: must be positive"),
    ({"datasets": {"a": "x"}}, "give either `dataset`"),
    ({"dataset": None, "datasets": {"lora9": "DATA"}}, "datasets: lora9: is neither an adapter of this job"),
    ({"dataset": None}, "dataset: missing: give `dataset`"),
    ({"adapters": ["ref"], "top_k": 1}, "adapters: 'ref' is a meteora job; only LoRA jobs can be mixed"),
])
def test_bad_meteora_jobs_are_named(tmp_path, tiny_models, job, message):
    model_dir = tiny_models["llama"]
    folders = random_loras(tmp_path, model_dir, 2)
    data = task_file(tmp_path / "d.jsonl", {0: 0, 1: 1}, 4)
    fields = {**meteora_job("mix", folders, data), **job}
    if fields.get("datasets"):
        fields["datasets"] = {k: str(data) if v == "DATA" else v for k, v in fields["datasets"].items()}
    other = meteora_job("ref", folders, data)
    with pytest.raises(ConfigError) as err:
        load_run_file(run(tmp_path, model_dir, [other, fields], "bad"))
    assert "jobs[1] ('mix')" in str(err.value) and message in str(err.value)


def test_meteora_fields_on_a_lora_job_are_refused(tmp_path, tiny_models, datasets):
    job = {"name": "copy", "dataset": str(datasets["copy"]), "top_k": 2}
    with pytest.raises(ConfigError, match=r"jobs\[0\] \('copy'\): top_k: only applies to jobs of kind: meteora"):
        load_run_file(run(tmp_path, tiny_models["llama"], [job], "bad"))


def test_bad_records_and_foreign_adapters_fail_before_the_output_folder(tmp_path, tiny_models):
    model_dir = tiny_models["llama"]
    folders = random_loras(tmp_path, model_dir, 2)
    untagged = tmp_path / "untagged.jsonl"
    untagged.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"job 'mix': dataset: .*untagged.jsonl: record 1: no `task` field"):
        train(load_run_file(run(tmp_path, model_dir, [meteora_job("mix", folders, untagged)], "o1")), live=False)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"instruction": "a", "output": "b", "task": "lora7"}) + "\n")
    with pytest.raises(ConfigError, match=r"record 1: task 'lora7' is neither an adapter \(lora0, lora1\)"):
        train(load_run_file(run(tmp_path, model_dir, [meteora_job("mix", folders, unknown)], "o2")), live=False)
    # an adapter trained on another base (a wider hidden size) is named before anything is written
    weights = {p: (torch.randn(4, 2 * d_in), torch.randn(d_out, 4)) for p, (d_in, d_out) in base_linear_shapes(model_dir)[0].items()
               if p.endswith(TARGETS)}
    foreign = save_adapter(tmp_path / "foreign", AdapterMeta(4, 8.0, 0.0, False, TARGETS, "wide"), weights)
    data = task_file(tmp_path / "d.jsonl", {0: 0, 1: 1}, 4)
    with pytest.raises(ConfigError, match=r"job 'mix': adapters: .*foreign: .*the base linear is 172→64; the adapter was trained on another base"):
        train(load_run_file(run(tmp_path, model_dir, [meteora_job("mix", [folders[0], foreign], data)], "o3")), live=False)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


@pytest.mark.slow
def test_pipeline_gives_the_single_process_gates(tmp_path, tiny_models, datasets):
    """2 stages over gloo: a MeteoRA job over folders shares micro-batches with a LoRA job; one
    over LoRA jobs of the run starts in a second phase from each stage's own trained slices."""
    from test_pipeline_runs import torchrun

    model_dir = tiny_models["llama"]
    folders = random_loras(tmp_path, model_dir, 2)
    data = {name: task_file(tmp_path / f"{name}.jsonl", {i: 0}, 12) for i, name in ((0, "reverse"), (1, "upper"))}
    both = task_file(tmp_path / "both.jsonl", {0: 0, 1: 1}, 12, chains=3)  # per-token task tags cross the pipe
    jobs = [
        *({"name": n, "dataset": str(p), "lora_r": 4, "micro_batch_size": 4, "max_steps": 3, "learning_rate": 2e-3,
           "target_modules": ["q_proj", "down_proj"]} for n, p in data.items()),
        meteora_job("folders", folders, both, micro_batch_size=3, gradient_accumulation_steps=2, max_steps=2,
                    learning_rate=2e-3, top_k=1, train_loras=True, max_grad_norm=0.5, eval_split=4, eval_steps=1),
        {"name": "mix", "kind": "meteora", "adapters": ["reverse", "upper"], "max_steps": 3, "micro_batch_size": 4,
         "learning_rate": 2e-3, "dataset": str(both), "eval_split": 2},
    ]
    single = train(load_run_file(run(tmp_path, model_dir, jobs, "single")), live=False)
    proc = torchrun(2, run(tmp_path, model_dir, jobs, "pipe"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, n_targets in (("folders", 3), ("mix", 2)):
        a, b = gates(single.output_dir, name), gates(tmp_path / "pipe", name)
        assert a.keys() == b.keys() and len(a) == 4 * n_targets
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    trained = [load_file(str(out / "folders" / "adapters" / "lora1" / "adapter_model.safetensors"))
               for out in (single.output_dir, tmp_path / "pipe")]
    for key in trained[0]:
        torch.testing.assert_close(trained[1][key], trained[0][key], rtol=1e-5, atol=1e-6)
    # evaluations (whose gate logits nobody trains on) between the steps, as in one process
    for name, steps in (("folders", [1, 2]), ("mix", [3])):
        rows = [[json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
                for out in (single.output_dir, tmp_path / "pipe")]
        # every step's gate loss and routing accuracy: each stage's gates' share, summed down the pipe
        for field in ("gate_loss", "route_acc"):
            want, got = ([r[field] for r in rs if r["kind"] == "train"] for rs in rows)
            assert len(got) == len(want) and got == pytest.approx(want, rel=1e-5), (name, field)
        evals = [[(r["step"], r["eval_loss"]) for r in rs if r["kind"] == "eval"] for rs in rows]
        assert [s for s, _ in evals[1]] == [s for s, _ in evals[0]] == steps
        assert [v for _, v in evals[1]] == pytest.approx([v for _, v in evals[0]], rel=1e-5)
    config = json.loads((tmp_path / "pipe" / "mix" / "meteora_config.json").read_text())
    assert [a["folder"] for a in config["adapters"]] == ["../reverse", "../upper"]
