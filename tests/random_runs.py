"""Random run files against the invariants: a developer's search for the cases nobody wrote.

    .venv/bin/python tests/random_runs.py --seeds 0:30                # together == each job alone, resumed == not
    .venv/bin/python tests/random_runs.py --seeds 0:30 --pipeline     # and 2 or 3 stages, also Ctrl-C'd and resumed
    MLORA_TRITON_COMPILED=1 python3 tests/random_runs.py --device cuda  # on a GPU: fp32 steps replayed as CUDA graphs

Each seed draws 2-5 jobs (ranks, targets, micro-batch and accumulation, schedules,
AdamW or SGD, clipping, dropout, evaluation, rsLoRA, checkpoints; a third of the seeds
add a MeteoRA job over two of them, top-1 or 2, its adapters trained or not) and run limits (token
budget down to 64, one to four jobs at a time, padding, gradient checkpointing) over a
tiny Llama, Mistral, Qwen2 or Qwen3, and checks invariant 1 (the jobs trained together
give each job the adapter it gets alone), that a run stopped after a few batches and
resumed gives the same adapters, and with --pipeline invariant 2 (torchrun, gloo) and a
pipeline stopped by Ctrl-C at a random moment, then resumed; the loss and evaluation rows
must come at the same steps with the same values (1e-4). fp32; each adapter tensor
within 5e-3 relative error: AdamW turns the rounding noise of other batch shapes into
updates of up to ~lr on entries whose gradient is near zero (6 of 560 seeds showed
1e-4 to 1.7e-3 in one tensor, each an AdamW job whose losses agreed to 1e-6, worst in a
rank-2 B of Qwen2's q_proj and where Qwen3's q_norm makes q_proj's gradients cancel);
a wrong row, step or mask moves the adapter by 1e-2 or more. The fixed-shape parity tests hold 1e-5 with learning rates chosen for it.
Cases that fail are kept under --work (default /tmp/mlora-random-runs). The test suite
runs a few seeds of the single-process checks (test_random_runs.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import free_port, make_dataset, write_run  # noqa: E402

from mlora.config import load_run_file  # noqa: E402
from mlora.runtime.trainer import train  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOLERANCE = 5e-3


def random_job(rng: random.Random, i: int, datasets: dict[str, Path]) -> dict[str, Any]:
    job: dict[str, Any] = {
        "name": f"j{i}", "dataset": str(datasets[rng.choice(sorted(datasets))]), "lora_r": rng.choice([1, 2, 4, 8, 16]),
        "lora_alpha": rng.choice([4, 8, 16]), "target_modules": rng.choice(["all", rng.sample(TARGETS, rng.randint(1, 4))]),
        "micro_batch_size": rng.randint(1, 5), "gradient_accumulation_steps": rng.randint(1, 3),
        "max_steps": rng.randint(2, 5), "lr_scheduler": rng.choice(["constant", "linear", "cosine"]),
        "warmup_steps": rng.randint(0, 2), "lora_dropout": rng.choice([0.0, 0.0, 0.1]), "seed": rng.randint(0, 99),
        "cutoff_len": rng.choice([16, 24, 32, 48]), "max_grad_norm": rng.choice([None, 1.0, 0.02]),
    }
    if rng.random() < 0.3:
        job.update(optimizer="sgd", momentum=rng.choice([0.0, 0.9]), learning_rate=0.05)
    else:
        job.update(learning_rate=rng.choice([1e-3, 2e-3]), weight_decay=rng.choice([0.0, 0.01]))
    if rng.random() < 0.4:
        job.update(eval_split=rng.choice([3, 5, 0.2]), eval_steps=rng.choice([None, 1, 2]))
    if rng.random() < 0.2:
        job["use_rslora"] = True
    if rng.random() < 0.5:
        job["save_steps"] = rng.choice([1, 2])
    return job


def random_case(seed: int, folder: Path, archs: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any], str, random.Random]:
    """Datasets written to `folder`; the jobs, the run limits and the model's architecture."""
    rng = random.Random(seed)
    datasets = {t: make_dataset(folder / f"{t}.jsonl", t, rng.randint(6, 30), seed * 7 + i)
                for i, t in enumerate(("copy", "reverse", "count"))}
    jobs = [random_job(rng, i, datasets) for i in range(rng.randint(2, 5))]
    if rng.random() < 0.35:  # a MeteoRA job over two of the run's LoRA jobs (which must adapt the same modules)
        jobs[1]["target_modules"] = jobs[0]["target_modules"]
        mix = {"name": "mix", "kind": "meteora", "adapters": ["j0", "j1"],
               "datasets": {"j0": jobs[0]["dataset"], "j1": jobs[1]["dataset"]}, "top_k": rng.choice([1, 2]),
               "temperature": rng.choice([1.0, 0.7]), "train_loras": rng.random() < 0.3,
               "micro_batch_size": rng.randint(1, 4), "gradient_accumulation_steps": rng.randint(1, 2),
               "max_steps": rng.randint(2, 4), "learning_rate": 5e-3, "max_grad_norm": rng.choice([None, 0.5]),
               "seed": rng.randint(0, 99), "cutoff_len": rng.choice([24, 32, 48])}
        if rng.random() < 0.5:
            mix["save_steps"] = 1
        jobs.insert(rng.randint(0, len(jobs)), mix)
    run = {"max_concurrent_jobs": rng.randint(1, 4), "max_tokens_per_batch": rng.choice([64, 128, 256, 8192]),
           "pad_to_multiple_of": rng.choice([1, 1, 8]), "gradient_checkpointing": rng.random() < 0.3}
    return jobs, run, rng.choice(archs), rng


def run_file(path: Path, model: Path, jobs: list[dict[str, Any]], out: Path, run: dict[str, Any],
             device: str = "cpu") -> Path:
    raw = {"model": {"path": str(model), "dtype": "float32", "device": device}, "defaults": {"template": "plain"},
           "jobs": jobs, "run": {"output_dir": str(out), **run}}
    return write_run(path, raw)


def tensors(folder: Path) -> dict[tuple[str, str], torch.Tensor]:
    """Every tensor a job wrote: a LoRA job's adapter; a MeteoRA job's gates (and its
    trained adapters' copies), by file and key."""
    return {(str(f.relative_to(folder)), k): v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


def differences(want: Path, got: Path, names: list[str]) -> dict[str, float]:
    """Each job's worst tensor relative error, for the jobs over TOLERANCE (or with other keys: inf)."""
    out = {}
    for name in names:
        a, b = tensors(want / name), tensors(got / name)
        worst = float("inf") if a.keys() != b.keys() or not a else max(
            float((b[k] - a[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)
        if worst > TOLERANCE:
            out[name] = worst
    return out


def curves(out: Path, job: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """A job's (step, train loss) and (step, eval loss) rows."""
    rows = [json.loads(line) for line in (out / job / "metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["loss"]) for r in rows if r["kind"] == "train"],
            [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"])


def curve_differences(want: Path, got: Path, names: list[str]) -> dict[str, str]:
    """Jobs whose loss or evaluation rows differ: other steps, or values beyond 1e-4 relative."""
    out = {}
    for name in names:
        for kind, a, b in zip(("train", "eval"), curves(want, name), curves(got, name)):
            if [s for s, _ in a] != [s for s, _ in b]:
                out[name] = f"{kind} rows at steps {[s for s, _ in b]}, not {[s for s, _ in a]}"
            elif any(abs(x - y) > 1e-4 * abs(x) for (_, x), (_, y) in zip(a, b)):
                out[name] = f"{kind} losses {[round(y, 6) for _, y in b]}, not {[round(x, 6) for _, x in a]}"
    return out


def mismatches(want: Path, got: Path, names: list[str]) -> dict[str, Any]:
    """The jobs whose tensors or loss and evaluation rows differ, and how."""
    return {**{f"{n} adapter": worst for n, worst in differences(want, got, names).items()},
            **{f"{n} losses": how for n, how in curve_differences(want, got, names).items()}}


def check_single_process(case: Path, model: Path, jobs: list[dict[str, Any]], run: dict[str, Any],
                         rng: random.Random, device: str = "cpu") -> tuple[Path, dict[str, dict[str, Any]]]:
    """Together against each job alone, and a run stopped after a few batches and resumed."""
    names = [j["name"] for j in jobs]
    together = train(load_run_file(run_file(case / "together.yaml", model, jobs, case / "together", run, device)),
                     live=False)
    bad = {}
    for job in jobs:
        if job.get("kind") == "meteora":  # alone, it mixes the folders the run wrote for the LoRA jobs
            job = {**job, "adapters": [str(together.output_dir / a) for a in job["adapters"]]}
        alone = train(load_run_file(run_file(case / f"{job['name']}.yaml", model, [job], case / f"alone-{job['name']}",
                                             {}, device)), live=False)
        bad[f"{job['name']} alone"] = mismatches(alone.output_dir, together.output_dir, [job["name"]])
    if any(j.get("save_steps") for j in jobs):
        spec = load_run_file(run_file(case / "resumed.yaml", model, jobs, case / "resumed", run, device))
        batches = rng.randint(1, 6)
        train(spec, live=False, stop_after_batches=batches)
        train(spec, live=False, resume=True)
        bad[f"resumed after {batches} batches"] = mismatches(together.output_dir, case / "resumed", names)
    return together.output_dir, {k: v for k, v in bad.items() if v}


def torchrun(stages: int, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mlora.runtime.torchrun_launch", f"--nproc-per-node={stages}",
            f"--master-port={free_port()}", "-m", "mlora", "train", str(run), "--plain", *extra]


def check_pipeline(case: Path, model: Path, jobs: list[dict[str, Any]], run: dict[str, Any], rng: random.Random,
                   together: Path) -> dict[str, Any]:
    """2 or 3 stages against one process; then a pipeline Ctrl-C'd at a random moment and resumed."""
    names, stages = [j["name"] for j in jobs], rng.choice([2, 3])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun(stages, run_file(case / "pipe.yaml", model, jobs, case / "pipe", run)),
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0:
        return {f"{stages} stages": proc.stderr[-2000:]}
    bad: dict[str, Any] = {}
    if diff := mismatches(together, case / "pipe", names):
        bad[f"{stages} stages"] = diff
    if any(j.get("save_steps") for j in jobs):
        cmd = torchrun(stages, run_file(case / "cut.yaml", model, jobs, case / "cut", run))
        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        delay = rng.uniform(2, 9)
        time.sleep(delay)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=300)
        # -2: the signal came as the launcher exited after a finished run
        if first.returncode not in (0, 130, -2):
            return {**bad, f"{stages} stages, Ctrl-C after {delay:.1f} s": err[-2000:]}
        again = [*cmd, "--resume"] if (case / "cut" / "run_summary.json").is_file() else cmd
        proc = subprocess.run(again, capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode != 0:
            return {**bad, f"{stages} stages, resumed after Ctrl-C at {delay:.1f} s": proc.stderr[-2000:]}
        if diff := mismatches(together, case / "cut", names):
            bad[f"{stages} stages, resumed after Ctrl-C at {delay:.1f} s"] = diff
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0:10", help="first:last (last excluded)")
    parser.add_argument("--pipeline", action="store_true", help="also 2 / 3-stage pipelines under torchrun")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlora-random-runs"))
    parser.add_argument("--device", default="cpu", help="cuda: the single-process checks on a GPU (fp32, CUDA graphs)")
    args = parser.parse_args()
    from mlora.model.tiny import write_tiny_model

    first, last = map(int, args.seeds.split(":"))
    archs = ["llama", "mistral", "qwen2", "qwen3"]
    models = {a: args.work / f"model-{a}" for a in archs}
    for arch, folder in models.items():
        if not (folder / "config.json").is_file():
            write_tiny_model(folder, arch)
    failed = 0
    for seed in range(first, last):
        case = args.work / f"case{seed}"
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir(parents=True)
        jobs, run, arch, rng = random_case(seed, case, archs)
        print(f"seed {seed}: {len(jobs)} jobs on {arch}, run {run}", file=sys.stderr, flush=True)
        together, bad = check_single_process(case, models[arch], jobs, run, rng, args.device)
        if args.pipeline:
            bad.update(check_pipeline(case, models[arch], jobs, run, rng, together))
        if bad:
            failed += 1
            (case / "failed.json").write_text(json.dumps({"jobs": jobs, "run": run, "arch": arch, "bad": bad}, indent=1))
            print(f"  FAILED: {bad}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(case)
    print(f"{failed} of {last - first} seeds failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
