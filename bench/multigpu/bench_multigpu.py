"""Several GPUs: mlora's P-stage pipeline against 1 GPU and against PEFT under FSDP.

    python3 bench/multigpu/bench_multigpu.py                  # --gpus 2,4 --shapes 7b,13b
    python3 bench/multigpu/bench_multigpu.py --gpus 2 --shapes 7b --steps 20
    python bench/multigpu/bench_multigpu.py --small           # CPU proof: gloo, fp32, 2 processes

For every shape (random-weight Llama, bf16) and job count it writes a model folder
(config, safetensors, a small BPE tokenizer; vocab 32000) and one text dataset per job
whose records tokenize to exactly `--seq` tokens, then runs, each in fresh processes:

1. mlora on 1 GPU (the single-process trainer, all jobs fused);
2. for each P in --gpus: mlora as a P-stage pipeline (`torchrun --nproc-per-node P`,
   NCCL), independent job groups interleaving;
3. for each P: the baseline users reach for on several GPUs: HF PEFT LoRA over the HF
   model under FSDP (FSDP2 `fully_shard`, one unit per decoder block) over P GPUs, the
   jobs trained one after another with the same steps and micro-batch (each step's
   `--micro` rows are split over the P ranks, so a step is the same global batch).
   The model is built and sharded once for all jobs (no per-job load, in the
   baseline's favour); the frozen base is sharded, the LoRA weights are replicated
   (FSDP `ignored_params`) and the running job's gradients all-reduced once a step.

Defaults: 8 jobs, r = 16 (alpha 32) on all 7 projections, micro-batch 4 × 512 tokens,
20 steps per job, AdamW lr 1e-4, gradient clipping at 1.0 (mlora's default; the
baseline clips too). Plus two 13B-shape jobs on 2 GPUs (--two-job-shape).

Figures (one run per configuration):
- tokens/s over the whole run (from the run's start after the model is loaded to the
  last job's end) and steady (from the moment every job has logged step --warmup to the
  end: Triton compile and first-step costs left out); scaling = P-GPU tokens/s over
  1-GPU tokens/s (target ≥ 0.9 P);
- bubble: `run.bubble_fraction` of the pipeline run's run_summary.json, measured from
  its trace.json (target ≤ 5 % with 8 jobs). On CUDA mlora's trace times each action
  with CUDA events on the compute stream, so a stage's GPU time is busy time;
  `--trace-sync` also synchronises the device after every compute action (a check of
  that measure, at the cost of host/GPU overlap);
- average job completion time (JCT; from the run's start after loading to the job's
  end; for FSDP, from the start of the first job) against PEFT+FSDP on P GPUs
  (target ≥ 45 % lower) and against mlora on 1 GPU;
- peak memory per GPU (torch.cuda.max_memory_allocated; on the CPU the process's
  peak RSS).

A run that runs out of GPU memory is repeated with max_tokens_per_batch halved (the
figure actually used is in the table). Worker processes get NCCL_NVLS_ENABLE=0,
NCCL_CUMEM_ENABLE=0 and TORCH_DIST_INIT_BARRIER=1 (so every rank starts its action
list after all ranks have loaded their stage: one clock for the trace).
Per-configuration JSON and the run folders' summaries go to --out (a JSON file);
`--table-from FILE` prints the table of an earlier --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.multigpu import workers  # noqa: E402
from bench.multigpu.workers import worker_env  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40),
    "small": dict(hidden_size=128, num_hidden_layers=4, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
}
WORDS = ("the cat sat on a mat and the dog ran in the park while sun moon river stone cloud tree bird fish house "
         "apple banana cherry lemon orange reverse upper add sort one two three four five six seven eight nine ten "
         "hello world yes no maybe letter word number sum text book walk home back again quick brown fox lazy").split()


# ================================================================== orchestrator
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_cmd(kind: str, spec_file: Path, n_proc: int) -> list[str]:
    tail = [str(workers.SCRIPT), kind, str(spec_file)]
    if n_proc == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n_proc}", f"--master-port={free_port()}",
            *tail]


def is_oom(text: str) -> bool:
    return "OutOfMemoryError" in text or "CUDA out of memory" in text


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.env = worker_env(args.small)
        self.info: dict[str, Any] = {}
        self.unit = "GPU" if args.device == "cuda" else "process"

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def call(self, kind: str, spec: dict[str, Any], n_proc: int, tag: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
        spec_file = self.work / f"{tag}.{kind}.json"
        spec_file.write_text(json.dumps(spec, indent=1))
        t = time.perf_counter()
        # a session of its own: on a timeout torchrun *and* its workers are ended (they hold GPUs)
        proc = subprocess.Popen(worker_cmd(kind, spec_file, n_proc), cwd=ROOT, env=env or self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=self.args.run_timeout)
            rc, text = proc.returncode, out + err
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    out, err = proc.communicate(timeout=30)
                    break
                except subprocess.TimeoutExpired:
                    out, err = "", ""
            rc, text = 124, (out or "") + (err or "") + f"\n(timed out after {self.args.run_timeout:.0f} s)"
        wall = time.perf_counter() - t
        log = self.work / f"{tag}.{kind}.log"
        log.write_text(text)
        if rc:  # the first traceback is the cause; torchrun's report comes after it
            first = text.find("Traceback")
            text = (text[first:first + 6000] if first >= 0 else "") + "\n...\n" + text[-3000:] + f"\n(full log: {log})"
        return rc, text, wall

    # ------------------------------------------------------------------ inputs
    def write_model(self, shape: str) -> Path:
        a = self.args
        folder = self.work / f"model-{shape}"
        spec = {"folder": str(folder), "dims": SHAPES[shape], "vocab": a.vocab, "dtype": a.dtype, "seq": a.seq,
                "device": a.device, "info": str(self.work / f"model-{shape}.info.json")}
        self.log(f"writing a random {shape} model to {folder}")
        rc, text, wall = self.call("write-model", spec, 1, f"model-{shape}")
        if rc:
            raise SystemExit(f"writing the {shape} model failed:\n{text}")
        self.info[shape] = json.loads(Path(spec["info"]).read_text())
        self.log(f"  {self.info[shape]['params'] / 1e6:,.1f}M parameters written in {wall:.0f} s")
        return folder

    def write_data(self, model: Path, n_jobs: int) -> list[Path]:
        """One alpaca file per job; each record's output is long enough that the plain
        template's tokens are cut at exactly --seq (every row the same length)."""
        from transformers import AutoTokenizer

        a = self.args
        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
        files = []
        for j in range(n_jobs):
            rng = random.Random(1000 + j)
            path = self.work / f"data-{model.name}-job{j}.jsonl"
            with path.open("w") as f:
                for _ in range((a.steps + 1) * a.micro):
                    text = " ".join(rng.choice(WORDS) for _ in range(2 * a.seq))
                    f.write(json.dumps({"instruction": f"Copy the text, job {j}.", "output": text}) + "\n")
            first = json.loads(path.read_text().splitlines()[0])
            n = len(tok(first["output"], add_special_tokens=False)["input_ids"])
            if n < a.seq:
                raise SystemExit(f"a record tokenizes to only {n} tokens (< {a.seq})")
            files.append(path)
        return files

    def run_file(self, model: Path, data: list[Path], out: Path, budget: int) -> Path:
        import yaml

        a = self.args
        run = {
            "model": {"path": str(model), "dtype": a.dtype, "device": a.device},
            "defaults": {"template": "plain", "cutoff_len": a.seq, "lora_r": a.rank, "lora_alpha": 2 * a.rank,
                         "target_modules": "all", "micro_batch_size": a.micro, "max_steps": a.steps,
                         "learning_rate": a.lr, "eval_split": 0, "max_grad_norm": 1.0},
            "jobs": [{"name": f"job{j}", "dataset": str(p), "seed": j} for j, p in enumerate(data)],
            "run": {"output_dir": str(out), "max_concurrent_jobs": len(data), "max_tokens_per_batch": budget,
                    "backend": a.backend, "log_every_s": 60.0, "pipeline_timeout_s": 1200.0},
        }
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(run, sort_keys=False))
        return path

    # -------------------------------------------------------------------- runs
    def run_mlora(self, model: Path, data: list[Path], n_proc: int, tag: str) -> dict[str, Any]:
        a = self.args
        budget = a.max_tokens
        env = dict(self.env)
        if n_proc == 1 and a.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        while True:
            out = self.work / tag
            shutil.rmtree(out, ignore_errors=True)
            run_file = self.run_file(model, data, out, budget)
            spec = {"run_file": str(run_file), "trace_sync": a.trace_sync and n_proc > 1}
            self.log(f"{tag}: mlora on {n_proc} {self.unit}{'s' if n_proc > 1 else ''}, max_tokens_per_batch {budget}")
            rc, text, wall = self.call("mlora", spec, n_proc, tag, env)
            if rc == 0:
                break
            if is_oom(text) and budget > a.micro * a.seq:
                budget //= 2
                self.log(f"{tag}: out of memory; again with max_tokens_per_batch {budget}")
                continue
            raise SystemExit(f"{tag} failed (exit {rc}):\n{text}")
        res = self.mlora_figures(out, len(data))
        res.update(system="mlora", n_proc=n_proc, max_tokens_per_batch=budget, wall_s=wall,
                   trace_sync=spec["trace_sync"])
        self.log(f"  {res['tokens_per_s']:.0f} tokens/s, avg JCT {statistics.mean(res['completion_s']):.1f} s, wall {wall:.0f} s")
        return res

    def mlora_figures(self, out: Path, n_jobs: int) -> dict[str, Any]:
        from mlora.schedule.trace import TraceEvent, bubble_from_events

        a = self.args
        summary = json.loads((out / "run_summary.json").read_text())
        run, jobs = summary["run"], summary["jobs"]
        names = [f"job{j}" for j in range(n_jobs)]
        start = run["started_at"]
        finished = [jobs[n]["finished_at"] for n in names]
        end = max(finished)
        tokens = n_jobs * a.steps * a.micro * a.seq
        warm = []
        for n in names:
            rows = [json.loads(line) for line in (out / n / "metrics.jsonl").read_text().splitlines() if line.strip()]
            warm.append(next(r["time"] for r in rows if r.get("kind", "train") == "train" and r["step"] == a.warmup))
        res: dict[str, Any] = {
            "completion_s": [f - start for f in finished],
            "total_s": end - start,
            "tokens": tokens,
            "tokens_logged": sum(jobs[n]["tokens"] for n in names),
            "tokens_per_s": tokens / (end - start),
            "steady_tokens_per_s": n_jobs * (a.steps - a.warmup) * a.micro * a.seq / (end - max(warm)),
            "final_loss": {n: jobs[n]["last_loss"] for n in names},
        }
        if "peak_memory_per_stage" in run:
            res["peak_memory_bytes"] = run["peak_memory_per_stage"]
            res["bubble_fraction"] = run["bubble_fraction"]
            trace = json.loads((out / "trace.json").read_text())
            events = [TraceEvent(e["tid"], e["name"], e["args"]["kind"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
                      for e in trace["traceEvents"] if e.get("ph") == "X"]
            res["bubble_fraction_per_stage_window"] = bubble_from_events(events, run["n_stages"], per_stage_window=True)
        else:
            res["peak_memory_bytes"] = [max(jobs[n]["peak_memory_bytes"] or 0 for n in names)]
        return res

    def run_fsdp(self, model: Path, n_jobs: int, n_proc: int, tag: str) -> dict[str, Any]:
        a = self.args
        spec = {"model": str(model), "device": a.device, "dtype": a.dtype, "jobs": n_jobs, "steps": a.steps,
                "warmup": a.warmup, "micro": a.micro, "seq": a.seq, "rank": a.rank, "lr": a.lr,
                "result": str(self.work / f"{tag}.result.json")}
        self.log(f"{tag}: PEFT + FSDP over {n_proc} {self.unit}s, {n_jobs} jobs in turn")
        result = Path(spec["result"])
        result.unlink(missing_ok=True)
        rc, text, wall = self.call("fsdp", spec, n_proc, tag)
        if rc and not result.is_file():
            raise SystemExit(f"{tag} failed (exit {rc}):\n{text}")
        if rc:  # every job done and the figures written: only the teardown failed
            self.log(f"{tag}: exit {rc} after the figures were written (teardown); kept. Log: {self.work / tag}.fsdp.log")
        res = json.loads(Path(spec["result"]).read_text())
        res.update(system="peft+fsdp", n_proc=n_proc, wall_s=wall)
        bad = [c for c in res["adapter_checks"] if not (c["trained_B_abs"] > 0 and c["next_B_abs"] == 0 and c["replicas_agree"])]
        if bad:
            raise SystemExit(f"{tag}: the FSDP baseline did not train one adapter at a time: {res['adapter_checks']}")
        self.log(f"  {res['tokens_per_s']:.0f} tokens/s, avg JCT {statistics.mean(res['completion_s']):.1f} s, wall {wall:.0f} s")
        return res

    # ------------------------------------------------------------------- plan
    def configs(self, shape: str) -> list[tuple[int, list[int]]]:
        a = self.args
        out = [(a.jobs, a.gpus)]
        if shape == a.two_job_shape and 2 in a.gpus and a.jobs != 2:
            out.append((2, [2]))
        return out

    def run_all(self) -> list[dict[str, Any]]:
        a = self.args
        configs = []
        for shape in a.shapes:
            model = self.write_model(shape)
            for n_jobs, gpus in self.configs(shape):
                data = self.write_data(model, n_jobs)
                base = f"{shape}-{n_jobs}jobs"
                one = self.run_mlora(model, data, 1, f"{base}-mlora1")
                for p in gpus:
                    pipe = self.run_mlora(model, data, p, f"{base}-mlora{p}")
                    fsdp = self.run_fsdp(model, n_jobs, p, f"{base}-fsdp{p}")
                    configs.append({"shape": shape, "params": self.info[shape]["params"], "jobs": n_jobs, "gpus": p,
                                    "mlora_1": one, "mlora_p": pipe, "fsdp_p": fsdp})
                    self.save(configs)
            if not a.keep:
                shutil.rmtree(model, ignore_errors=True)
        return configs

    def save(self, configs: list[dict[str, Any]]) -> None:
        a = self.args
        info = next(iter(self.info.values()), {})
        doc = {"date": datetime.date.today().isoformat(), "device": info.get("device"), "n_devices": info.get("n_devices"),
               "versions": {k: info.get(k) for k in ("torch", "cuda", "transformers", "peft")},
               "settings": {k: getattr(a, k) for k in ("jobs", "steps", "warmup", "micro", "seq", "rank", "lr", "dtype",
                                                      "max_tokens", "backend", "trace_sync", "vocab", "device")},
               "configs": configs}
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))


# ========================================================================= table
def gib(b: float | None) -> str:
    return f"{b / 2**30:.1f}" if b else "-"


def table(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [f"{doc['date']}  {doc.get('n_devices')} x {doc.get('device')}  {doc.get('versions')}",
             (f"{s['dtype']}, r={s['rank']} on 7 projections, micro-batch {s['micro']}x{s['seq']} per job, "
              f"{s['steps']} steps per job (steady: after step {s['warmup']}), max_tokens_per_batch {s['max_tokens']}, "
              f"trace sync {'on' if s['trace_sync'] and s.get('device') == 'cuda' else 'off'}")]
    unit = "GPU" if s.get("device") == "cuda" else "proc"
    head = (f"{'shape':5} {'jobs':>4} {'P':>2} {'system':22} {'tok/s':>8} {'steady':>8} {'scale':>6} {'scale st':>8} "
            f"{'bubble':>7} {'avg JCT':>8} {'vs FSDP':>8} {'vs 1GPU':>8} {'budget':>6}  peak GiB per GPU")
    lines.append(head)
    lines.append("-" * len(head))
    verdicts = []
    for c in doc["configs"]:
        one, pipe, fsdp, p = c["mlora_1"], c["mlora_p"], c["fsdp_p"], c["gpus"]
        jct1, jctp, jctf = (statistics.mean(r["completion_s"]) for r in (one, pipe, fsdp))
        scale, scale_st = pipe["tokens_per_s"] / one["tokens_per_s"], pipe["steady_tokens_per_s"] / one["steady_tokens_per_s"]
        rows = [
            (f"mlora, 1 {unit}", one, "", "", "", "", "", one.get("max_tokens_per_batch")),
            (f"mlora, {p}-stage pipeline", pipe, f"{scale:.2f}", f"{scale_st:.2f}",
             f"{100 * pipe['bubble_fraction']:.1f}%", f"{100 * (jctp / jctf - 1):+.0f}%", f"{100 * (jctp / jct1 - 1):+.0f}%",
             pipe.get("max_tokens_per_batch")),
            (f"PEFT+FSDP {p}, in turn", fsdp, "", "", "", "", "", None),
        ]
        for name, r, sc, scs, bub, vf, v1, budget in rows:
            st = f"{r['steady_tokens_per_s']:.0f}" if r.get("steady_tokens_per_s") else "-"
            peaks = "/".join(gib(b) for b in r["peak_memory_bytes"])
            lines.append(f"{c['shape']:5} {c['jobs']:>4} {p:>2} {name:22} {r['tokens_per_s']:8.0f} {st:>8} {sc:>6} {scs:>8} "
                         f"{bub:>7} {statistics.mean(r['completion_s']):8.1f} {vf:>8} {v1:>8} {budget or '-':>6}  {peaks}")
        ok_scale = scale_st >= 0.9 * p
        ok_bubble = pipe["bubble_fraction"] <= 0.05
        ok_jct = jctp <= 0.55 * jctf
        verdicts.append(f"{c['shape']} {c['jobs']} jobs P={p}: scaling {scale_st:.2f} (steady) / {scale:.2f} (run) vs "
                        f"target {0.9 * p:.1f} {'met' if ok_scale else 'MISSED'}; bubble {100 * pipe['bubble_fraction']:.1f}% "
                        f"{'met' if ok_bubble else 'MISSED'}{' (target is for 8 jobs)' if c['jobs'] != 8 else ''}; avg JCT "
                        f"{100 * (1 - jctp / jctf):.0f}% below FSDP {'met' if ok_jct else 'MISSED'}")
    lines.append("")
    lines.append("targets: scaling >= 0.9 P, bubble <= 5% with 8 jobs, avg JCT >= 45% below PEFT+FSDP")
    lines.extend(verdicts)
    return "\n".join(lines)


# ========================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="2,4", help="pipeline sizes P to measure (comma-separated)")
    parser.add_argument("--shapes", default="7b,13b")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--two-job-shape", help="also run 2 jobs of this shape on 2 GPUs (default 13b; '' to skip)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the steady tokens/s")
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", help="bfloat16 (default; --small: float32)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="mlora's run.max_tokens_per_batch (halved on OOM)")
    parser.add_argument("--backend", default="auto", help="mlora's run.backend")
    parser.add_argument("--trace-sync", dest="trace_sync", action="store_true",
                        help="synchronise mlora's stage workers after every compute action (the trace is device-timed already)")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds per run before it is abandoned")
    parser.add_argument("--workdir", help="where models, data and run folders go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the model folders and run outputs")
    parser.add_argument("--out", help="the JSON file (default bench/multigpu/results.json; --small: out/bench_multigpu_small.json)")
    parser.add_argument("--table-from", help="print the table of earlier --out files (comma-separated) and exit")
    parser.add_argument("--small", action="store_true", help="CPU proof: tiny shape, gloo, fp32, P = 2, few steps")
    args = parser.parse_args(argv)
    if args.small:
        args.gpus, args.shapes = "2", "small"
        args.two_job_shape = "small" if args.two_job_shape is None else args.two_job_shape
        for name, value in (("steps", 4), ("warmup", 1), ("seq", 64), ("vocab", 0)):  # unless given
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.dtype = args.dtype or "float32"
        args.out = args.out or "out/bench_multigpu_small.json"
    args.out = args.out or "bench/multigpu/results.json"
    args.dtype = args.dtype or "bfloat16"
    args.two_job_shape = "13b" if args.two_job_shape is None else args.two_job_shape
    args.gpus = [int(g) for g in str(args.gpus).split(",") if g]
    args.shapes = [s for s in str(args.shapes).split(",") if s]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table_from:
        docs = [json.loads(Path(f).read_text()) for f in args.table_from.split(",")]
        merged: list[dict[str, Any]] = []
        for doc in docs:  # files of the same settings become one table
            same = next((m for m in merged if m["settings"] == doc["settings"] and m["device"] == doc["device"]), None)
            if same is None:
                merged.append(doc)
            else:
                same["configs"] = same["configs"] + doc["configs"]
        print("\n\n".join(table(doc) for doc in merged))
        return
    import torch

    args.device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    if args.device == "cuda" and max(args.gpus) > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPUs here")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}: use {', '.join(SHAPES)}")
    if args.warmup >= args.steps:
        raise SystemExit("--warmup must be below --steps")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mlora_bench_multigpu_"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ok = False
    try:
        Bench(args, work).run_all()
        ok = True
    finally:
        if ok and not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"(models, data, run folders and logs kept in {work})", file=sys.stderr)
    print(table(json.loads(Path(args.out).read_text())))
    print(f"\nwrote {args.out} ({time.perf_counter() - t:.0f} s in all)")


if __name__ == "__main__":
    main()
