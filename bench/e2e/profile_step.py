"""Profile mlora's fused training step on one GPU: where the time of a step goes.

    python bench/e2e/profile_step.py --shape 1.1b --backend torch

Prints the step time (median of timed steps) and the torch.profiler table of the top
CUDA kernels and CPU ops, so that a slow step can be traced to its cause.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.e2e.bench_e2e import SHAPES, Example, build_model  # noqa: E402
from mlora.config import JobSpec  # noqa: E402
from mlora.config.schema import ALL_TARGET_MODULES  # noqa: E402
from mlora.jobs import JobOptimizer, PendingMicro  # noqa: E402
from mlora.model.loss import job_loss_sums  # noqa: E402
from mlora.model.stage import stage_from_model  # noqa: E402
from mlora.runtime.batch import collate  # noqa: E402
from mlora.runtime.step_graphs import StepGraphs  # noqa: E402
from mlora.runtime.trainer import make_adapter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--summary", action="store_true", help="only the step time and GPU busy time")
    parser.add_argument("--no-fused-ops", action="store_true", help="the base's RMSNorm/SwiGLU as Hugging Face runs them")
    parser.add_argument("--hf-rotary", action="store_true",
                        help="with fused ops, the attention's rotary as Hugging Face runs it (not mlora.ops.fused_rope)")
    parser.add_argument("--graphs", action="store_true", help="replay the step as a CUDA graph, as the trainer does")
    parser.add_argument("--timeline", type=int, default=0, metavar="N",
                        help="also profile N steps issued back to back, as the trainer runs them, and report the GPU's "
                             "idle time between kernels (where a step's time goes beyond its kernels)")
    parser.add_argument("--by-grid", action="store_true",
                        help="also the kernels by call site (kernel, grid, block), largest first (which call of a kernel is slow)")
    parser.add_argument("--by-shape", action="store_true",
                        help="also the aten ops that ran kernels, by input shape (which op a small kernel belongs to)")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build_model(args.shape, device, torch.bfloat16, 32000)
    stage = stage_from_model(model, fused_ops=not args.no_fused_ops)
    stage.routing.backend = args.backend
    if args.hf_rotary:
        for layer in stage.layers:
            vars(layer.self_attn).pop("forward", None)  # back to the class's own forward
    opts = []
    micros, examples = [], []
    for j in range(args.jobs):
        spec = JobSpec(name=f"job{j}", dataset="-", lora_r=16, lora_alpha=32, target_modules=ALL_TARGET_MODULES, seed=j)
        adapter = make_adapter(spec, stage, device)
        stage.routing.adapters[spec.name] = adapter
        opts.append(JobOptimizer(spec, adapter, 100))
        ids = torch.randint(3, 32000, (args.micro, args.seq))
        micros.append(PendingMicro(spec.name, 0, 0, True, tuple(range(args.micro))))
        examples.append([Example(r.tolist(), [-100] + r.tolist()[1:]) for r in ids])
    inv = [1.0 / (args.micro * (args.seq - 1))] * args.jobs

    graphs = StepGraphs(stage) if args.graphs else None
    adapters = [stage.routing.adapters[m.job] for m in micros]

    def step() -> None:
        batch = collate(micros, examples, list(range(args.jobs)), 0, device, loss_weights=inv)
        if graphs is None or graphs.step(batch, adapters) is None:  # graphs: eager, capture, then replays
            hidden = stage(batch.input_ids, batch.layout)
            (job_loss_sums(stage.lm_head, hidden, batch.targets, stage.fused_loss) * batch.loss_weights).sum().backward()
        for opt in opts:
            opt.step(opt.grad_sq_norm().sqrt())

    warm = []
    for _ in range(2):  # with --graphs: the first sighting runs eagerly, the second is warmed up and recorded
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        warm.append(time.perf_counter() - t)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ms = 1000 * statistics.median(times)
    tokens = args.jobs * args.micro * args.seq
    print(f"{args.shape} backend={args.backend} fused_ops={not args.no_fused_ops} hf_rotary={args.hf_rotary} graphs={args.graphs}: step {ms:.1f} ms, {tokens / ms * 1000:.0f} tokens/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"  first two steps {1000 * warm[0]:.0f} ms and {1000 * warm[1]:.0f} ms (the first compiles kernels when no cache has them)")
    if len(times) >= 20:  # a long run shows whether the step time holds (the GPU's clock under sustained load)
        tenth = len(times) // 10
        print(f"  first {tenth} steps median {1000 * statistics.median(times[:tenth]):.1f} ms, "
              f"last {tenth} {1000 * statistics.median(times[-tenth:]):.1f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                record_shapes=args.by_shape) as prof:
        step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    cpu = torch.autograd.DeviceType.CPU  # kernels are counted under the ops that launched them, as the table's total
    busy_ms = sum(e.self_device_time_total for e in averages if e.device_type == cpu) / 1000
    print(f"{args.shape} backend={args.backend}: GPU kernels {busy_ms:.1f} ms of the profiled step "
          f"({100 * busy_ms / ms:.0f}% of the timed median step)")
    if not args.summary:
        print(averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        print(averages.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
    if args.by_grid:
        print_by_grid(prof)
    if args.timeline:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(args.timeline):
                step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        print_idle(prof, args.timeline, wall)
    if args.by_shape:
        ops = [e for e in prof.key_averages(group_by_input_shape=True)
               if e.device_type == cpu and e.self_device_time_total > 0 and e.key.startswith("aten::")]
        for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:30]:
            print(f"{e.key:34} {e.count:5d} {e.self_device_time_total / 1000:8.2f} ms  {str(e.input_shapes)[:100]}")


def gpu_events(prof: torch.profiler.profile) -> list[dict]:
    """The profile's kernels, copies and memsets as its Chrome trace lists them (each
    kernel with its grid and block)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    return [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e]


def print_by_grid(prof: torch.profiler.profile) -> None:
    """Kernel time of the profiled step by (kernel, grid, block), copies and memsets by size,
    largest first: one layer's calls of one kernel differ by their grids, so each row is one
    of its call sites."""
    rows: dict[tuple, list[float]] = {}
    by_cat: dict[str, float] = {}
    for e in sorted(gpu_events(prof), key=lambda e: e["ts"]):
        args = e.get("args", {})
        if e["cat"] == "kernel":
            key = (e["name"][:40], str(args.get("grid")), str(args.get("block")))
        else:  # copies and memsets by size
            key = (e["name"][:40], f"{args.get('bytes', '?')} bytes", "")
        rows.setdefault(key, []).append(e["dur"])
        by_cat[e["cat"]] = by_cat.get(e["cat"], 0.0) + e["dur"]
    total = sum(sum(v) for v in rows.values())
    print("  by kind: " + ", ".join(f"{cat} {t / 1000:.2f} ms" for cat, t in by_cat.items()))
    print(f"kernels by launch grid, copies and memsets by size ({total / 1000:.1f} ms in all): calls, total ms, "
          "median us, kernel, grid, block")
    for (name, grid, block), durs in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
        if sum(durs) >= 0.001 * total:
            print(f"  {len(durs):5d} {sum(durs) / 1000:8.2f} {statistics.median(durs):9.1f}  {name:40s} {grid} {block}")


def print_idle(prof: torch.profiler.profile, steps: int, wall: float) -> None:
    """The GPU's busy and idle time over steps issued back to back, and the largest gaps
    with the kernels on either side (a CUDA graph's replays show here as one timeline)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in gpu_events(prof))
    if not spans:
        print("timeline: the profiler recorded no kernels")
        return
    busy, end, last, gaps = 0.0, spans[0][0], spans[0][2], []
    for s, e, name in spans:
        if s > end:
            gaps.append((s - end, last, name))
        busy += max(0.0, e - max(s, end))
        if e > end:
            end, last = e, name
    span = end - spans[0][0]
    idle = span - busy
    print(f"timeline, {steps} steps back to back: wall {1000 * wall / steps:.1f} ms a step, GPU span "
          f"{span / 1000 / steps:.1f} ms, busy {busy / 1000 / steps:.1f} ms, idle {idle / 1000 / steps:.1f} ms a step "
          f"({len(gaps)} gaps, {len(spans)} kernels)")
    bins = collections.Counter()
    for g, _, _ in gaps:
        bins[next(b for b in (2, 5, 20, 100, 1000, float("inf")) if g < b)] += g
    print("  idle by gap length (us): " + ", ".join(f"<{b}: {t / 1000 / steps:.2f} ms" for b, t in sorted(bins.items())))
    by_pair = collections.Counter()
    for g, a, b in gaps:
        by_pair[(a[:50], b[:50])] += g
    print("  idle by the kernels around it (ms a step):")
    for (a, b), t in by_pair.most_common(15):
        print(f"    {t / 1000 / steps:7.2f}  {a}  ->  {b}")
    print("  largest gaps (us):")
    for g, a, b in sorted(gaps, reverse=True)[:10]:
        print(f"    {g:9.1f}  {a[:50]}  ->  {b[:50]}")


if __name__ == "__main__":
    main()
