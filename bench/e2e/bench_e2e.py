"""End to end, one GPU: HF PEFT training jobs one at a time vs mlora training them together.

Random-weight Llama models of 7B shape (hidden 4096, 32 layers, MLP 11008) and 1.1B
shape (hidden 2048, 22 layers, MLP 5632, 4 KV heads), bf16, micro-batch 4 × 512 tokens
per job, r = 16 on all 7 projections, AdamW. Prints a table and writes a JSON file:
tokens/s, each job's completion time, peak memory, MFU = 4 · params · tokens / time
over the measured bf16 matmul peak (frozen base: forward 2·P·T, backward to the
activations 2·P·T).

    python bench/e2e/bench_e2e.py --out bench/e2e/results.json      # on a GPU
    python bench/e2e/bench_e2e.py --small                           # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlora.config import JobSpec, ModelSpec, RunLimits, RunSpec  # noqa: E402
from mlora.config.schema import ALL_TARGET_MODULES  # noqa: E402
from mlora.jobs import JobState, plan_steps  # noqa: E402
from mlora.model.stage import stage_from_model  # noqa: E402
from mlora.runtime.trainer import Prepared, Trainer  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
    "small": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def random_llama(config: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight Llama built straight on `device` in `dtype` (no fp32 copy first)."""
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def build_model(shape: str, device: torch.device, dtype: torch.dtype, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[shape], vocab_size=vocab, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    model = random_llama(config, device, dtype)
    model.requires_grad_(False)
    return model.eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul throughput: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def random_batches(n_batches: int, micro: int, seq: int, vocab: int, seed: int, vary: bool = False) -> list[list[list[int]]]:
    """Each micro-batch's rows of token ids: all `seq` long, or (vary) of lengths uniform in [seq/4, seq]."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(seq // 4, seq + 1, (micro,), generator=gen).tolist() if vary else [seq] * micro
        out.append([torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths])
    return out


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and labels of a micro-batch padded to its longest row (HF's collators)."""
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def run_peft(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """What users do today: one PEFT job after another, plain training loop, each adapter
    saved when its job ends (as mlora's run saves each job's)."""
    from peft import LoraConfig, get_peft_model

    out = tempfile.TemporaryDirectory()
    start = time.perf_counter()
    completion, tokens, steady = [], 0, []
    for j in range(args.jobs):
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(ALL_TARGET_MODULES), task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        batches = random_batches(args.steps, args.micro, args.seq, args.vocab, seed=j, vary=args.vary)
        for i, rows in enumerate(batches):
            if i == args.warmup:
                sync(device)
                t_steady = time.perf_counter()
            ids, mask, labels = (t.to(device) for t in padded(rows))
            if args.vary:
                loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:  # no pads: no mask, so SDPA takes its causal path
                loss = peft_model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        counts = [sum(len(r) for r in rows) for rows in batches]
        steady.append(sum(counts[args.warmup :]) / (time.perf_counter() - t_steady))
        tokens += sum(counts)
        peft_model.save_pretrained(str(Path(out.name) / f"job{j}"))
        completion.append(time.perf_counter() - start)
        model = peft_model.unload()
        del peft_model, opt, params
    total = time.perf_counter() - start
    out.cleanup()
    return {"tokens_per_s": tokens / total, "steady_tokens_per_s": statistics.mean(steady), "completion_s": completion, "total_s": total}


def run_mlora(
    model: torch.nn.Module, args: argparse.Namespace, device: torch.device, backend: str, budget: int, graphs: bool,
    checkpointing: bool = False,
) -> dict:
    """mlora: all jobs fused into one batch per step, through the real Trainer."""
    stage = stage_from_model(model)
    jobs, specs, step_tokens = [], [], []
    for j in range(args.jobs):
        spec = JobSpec(
            name=f"job{j}", dataset="synthetic", lora_r=args.rank, lora_alpha=2 * args.rank,
            target_modules=ALL_TARGET_MODULES, micro_batch_size=args.micro, max_steps=args.steps,
            learning_rate=1e-4, cutoff_len=args.seq, seed=j,
        )
        rows = [r for batch in random_batches(args.steps, args.micro, args.seq, args.vocab, seed=j, vary=args.vary) for r in batch]
        examples = [Example(r, [-100] + r[1:]) for r in rows]
        step_tokens.append([sum(len(r) for r in rows[i : i + args.micro]) for i in range(0, len(rows), args.micro)])
        steps = plan_steps(len(examples), args.micro, 1, 1, args.steps, lambda e, n=len(examples): range(n))
        jobs.append(JobState(spec=spec, train=examples, eval=[], steps=steps))
        specs.append(spec)
    with tempfile.TemporaryDirectory() as out:
        run = RunSpec(
            source="bench_e2e",
            model=ModelSpec(path="<in memory>", dtype=args.dtype, device=str(device)),
            jobs=tuple(specs),
            run=RunLimits(
                output_dir=out, max_concurrent_jobs=args.jobs, max_tokens_per_batch=budget, backend=backend,
                cuda_graphs=graphs, pad_to_multiple_of=args.pad if graphs else 1, gradient_checkpointing=checkpointing,
            ),
        )
        trainer = Trainer(Prepared(run, jobs, stage, 0, Path(out), device), live=False)
        sync(device)
        start, start_wall = time.perf_counter(), time.time()
        result = trainer.run()
        sync(device)
        total = time.perf_counter() - start
        summary = json.loads((Path(out) / "run_summary.json").read_text())
        # steady: from the moment every job has logged step `warmup` to the moment every job
        # has logged its last step. A step is logged when the host issues its update, and
        # the trainer keeps the host at most two batches ahead of the GPU, so both ends
        # lead the GPU by about the same time (writing the adapters is left out).
        warm, last, rows_of = [], [], {}
        for s in specs:
            rows = rows_of[s.name] = [json.loads(line) for line in (Path(out) / s.name / "metrics.jsonl").read_text().splitlines()]
            warm.append(next(r["time"] for r in rows if r["step"] == args.warmup))
            last.append(next(r["time"] for r in rows if r["step"] == args.steps))
        end = max(last)
        # the last job's log time of every step, from the start: where a short run's time goes
        logged = [max(next(r["time"] for r in rows_of[s.name] if r["step"] == k) for s in specs) - start_wall
                  for k in range(1, args.steps + 1)]
    completion = [summary["jobs"][s.name]["finished_at"] - summary["jobs"][s.name]["queued_at"] for s in specs]
    tokens = sum(sum(t) for t in step_tokens)
    steady = sum(sum(t[args.warmup :]) for t in step_tokens) / (end - max(warm))
    del result
    return {"tokens_per_s": tokens / total, "steady_tokens_per_s": steady, "completion_s": completion, "total_s": total,
            "max_tokens_per_batch": budget, "step_logged_s": logged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="7b,1.1b")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backends", default="auto")
    parser.add_argument("--graphs", default="on", help="CUDA graphs of the fused step: on, off, or on,off (both rows)")
    parser.add_argument("--checkpointing", default="off",
                        help="run.gradient_checkpointing of the mlora rows: off, on, or off,on (both; on runs without graphs)")
    parser.add_argument("--vary", action="store_true", help="rows of random lengths in [seq/4, seq] instead of all seq long")
    parser.add_argument("--pad", type=int, default=64, help="run.pad_to_multiple_of of the graph rows (recurring shapes)")
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU: a smoke test of the script")
    parser.add_argument("--out", help="the JSON file (default bench/e2e/results.json; --small: out/bench_e2e_small.json)")
    args = parser.parse_args()
    if args.small:
        args.shapes, args.steps, args.warmup, args.seq, args.vocab, args.dtype = "small", 3, 1, 32, 512, "float32"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    peak = matmul_peak_tflops(device, dtype, 8192 if device.type == "cuda" else 512)
    rows = []
    for shape in args.shapes.split(","):
        model = build_model(shape, device, dtype, args.vocab)
        params = n_params(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        peft = run_peft(model, args, device)
        peft["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        peft["mfu"] = 4 * params * peft["tokens_per_s"] / (peak * 1e12)
        peft["steady_mfu"] = 4 * params * peft["steady_tokens_per_s"] / (peak * 1e12)
        rows.append({"shape": shape, "system": "peft, one job at a time", **peft})
        variants = [(b, g == "on" and c == "off", c == "on") for b in args.backends.split(",")
                    for c in args.checkpointing.split(",") for g in args.graphs.split(",")]
        for backend, graphs, checkpointing in dict.fromkeys(variants):
            budget = args.jobs * args.micro * args.seq
            while True:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    res = run_mlora(model, args, device, backend, budget, graphs, checkpointing)
                    break
                except torch.OutOfMemoryError:
                    if budget <= args.micro * args.seq:
                        raise
                    budget //= 2
                    print(f"[{shape}] out of memory: retrying with max_tokens_per_batch={budget}", flush=True)
            res["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            res["mfu"] = 4 * params * res["tokens_per_s"] / (peak * 1e12)
            res["speedup_vs_peft"] = res["tokens_per_s"] / peft["tokens_per_s"]
            res["steady_mfu"] = 4 * params * res["steady_tokens_per_s"] / (peak * 1e12)
            res["steady_speedup_vs_peft"] = res["steady_tokens_per_s"] / peft["steady_tokens_per_s"]
            label = (f"{backend}, graphs, pad {args.pad}" if args.vary else f"{backend}, graphs") if graphs else backend
            label += ", checkpointing" if checkpointing else ""
            rows.append({"shape": shape, "system": f"mlora, {args.jobs} jobs together ({label})", **res})
        del model
    header = (f"{'shape':6} {'system':46} {'tok/s':>9} {'x PEFT':>7} {'MFU':>6} {'steady':>9} {'x PEFT':>7} {'MFU':>6} "
              f"{'peak GiB':>9} {'avg JCT s':>9}  completion s")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"matmul peak {peak:.0f} TFLOP/s, {args.jobs} jobs x {args.steps} steps x {args.micro}x{args.seq} tokens, r={args.rank}")
    print(header)
    for r in rows:
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        x = f"{r.get('speedup_vs_peft', 1.0):.2f}"
        xs = f"{r.get('steady_speedup_vs_peft', 1.0):.2f}"
        jct = statistics.mean(r["completion_s"])
        comp = " ".join(f"{c:.1f}" for c in r["completion_s"])
        print(f"{r['shape']:6} {r['system']:46} {r['tokens_per_s']:9.0f} {x:>7} {100 * r['mfu']:5.1f}% "
              f"{r['steady_tokens_per_s']:9.0f} {xs:>7} {100 * r['steady_mfu']:5.1f}% {mem:>9} {jct:9.1f}  {comp}")
    for r in rows:
        if "step_logged_s" in r:
            t = r["step_logged_s"]
            print(f"{r['shape']:6} {r['system']:46} steps 1-4 logged at {' '.join(f'{x:.2f}' for x in t[:4])} s, "
                  f"last at {t[-1]:.2f} s, run over at {r['total_s']:.2f} s")
    out = args.out or ("out/bench_e2e_small.json" if args.small else "bench/e2e/results.json")  # GPU figures stay
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device), "torch": torch.__version__, "peak_tflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
