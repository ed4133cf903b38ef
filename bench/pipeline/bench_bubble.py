"""Measured pipeline bubble of a 2-stage gloo run on the CPU, from the run's own trace.

    python bench/pipeline/bench_bubble.py [--stages 2] [--jobs 4] [--steps 30]

Writes a small random Llama (hidden 256, 8 blocks) and 4 jobs' data to a temporary
folder, runs `torchrun --nproc-per-node STAGES -m mlora train`, and prints the bubble
fraction measured from OUTPUT/trace.json beside GPipe's with a flush every step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mlora.demo.tasks import generate  # noqa: E402
from mlora.model.tiny import write_tiny_model  # noqa: E402
from mlora.schedule.simulate import gpipe_bubble  # noqa: E402
from mlora.schedule.trace import TraceEvent, bubble_from_events  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "model", "llama", hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4,
                                 intermediate_size=688)
        tasks = ["reverse", "upper", "add", "sort"]
        jobs = []
        for j in range(args.jobs):
            task = tasks[j % len(tasks)]
            data = root / f"{task}{j}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in generate(task, 200, seed=j)))
            jobs.append({"name": f"{task}{j}", "dataset": str(data), "lora_r": [8, 16, 4, 12][j % 4]})
        run = {
            "model": {"path": str(model), "device": "cpu"},
            "defaults": {"template": "plain", "cutoff_len": 48, "micro_batch_size": 8, "max_steps": args.steps,
                         "target_modules": "all", "learning_rate": 1e-3},
            "jobs": jobs,
            "run": {"output_dir": str(root / "out")},
        }
        (root / "run.yaml").write_text(yaml.safe_dump(run))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.stages}", f"--master-port={port}",
               "-m", "mlora", "train", str(root / "run.yaml"), "--plain"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(proc.stdout[-2000:] + proc.stderr[-2000:])
        trace = json.loads((root / "out" / "trace.json").read_text())
        events = [
            TraceEvent(e["tid"], e["name"], e["args"]["kind"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
            for e in trace["traceEvents"] if e.get("ph") == "X"
        ]
        whole = bubble_from_events(events, args.stages)
        own = bubble_from_events(events, args.stages, per_stage_window=True)
        n_mb = sum(1 for e in events if e.kind == "F" and e.stage == 0)
        print(f"{args.stages} stages over gloo (CPU, one process per stage), {args.jobs} jobs, {args.steps} steps each, "
              f"{n_mb} micro-batches")
        print(f"measured bubble: {100 * whole:.1f}% of stage time over the run window "
              f"({100 * own:.1f}% within each stage's own first-to-last action)")
        predicted = json.loads((root / "out" / "run_summary.json").read_text())["run"]["predicted_bubble_fraction"]
        print(f"predicted before the run (the schedule simulated, per-token stage costs): {100 * predicted:.1f}%")
        print(f"GPipe with a flush every step (m = 1 micro-batch per job step): {100 * gpipe_bubble(args.stages, 1):.1f}%")


if __name__ == "__main__":
    main()
