"""The bubble the simulator predicts for issue 6's multi-GPU runs, before any GPU runs them.

    python bench/pipeline/predict_bubble.py [--shapes 7b,13b] [--stages 2,4] [--steps 50,200]

Per model shape and stage count: the balanced split with whole blocks and with cuts
inside blocks (attention and MLP of one block on different stages), each stage's share
of the cost, and the predicted bubble (the same `predicted_bubble` a pipeline run
prints: plan_pipeline -> build_schedule -> simulate with per-token stage costs in the
split's proportions, backward twice the forward) for 8 jobs of one 4 x 512 micro-batch
a step, groups = P. Send latency and host work are left out (see bench/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlora.runtime.pipeline_plan import predicted_bubble  # noqa: E402
from mlora.schedule.partition import ModelShape, balanced_split  # noqa: E402
from mlora.schedule.pipeline import build_schedule  # noqa: E402
from mlora.schedule.planner import JobPlanSizes, plan_pipeline  # noqa: E402
from mlora.schedule.validate import validate_schedule  # noqa: E402

SHAPES = {
    "7b": ModelShape(n_layers=32, hidden=4096, intermediate=11008, n_heads=32, n_kv_heads=32, vocab=32000),
    "13b": ModelShape(n_layers=40, hidden=5120, intermediate=13824, n_heads=40, n_kv_heads=40, vocab=32000),
}


def bubble(stage_costs: tuple[float, ...], n_jobs: int, steps: int, rows: int = 4, seq: int = 512) -> float:
    jobs = [JobPlanSizes(job=f"job{j}", steps=((((rows, seq),),) * steps), tokens=(((rows * seq,),) * steps))
            for j in range(n_jobs)]
    n_stages = len(stage_costs)
    schedule = build_schedule(plan_pipeline(jobs, n_stages, n_jobs, n_jobs * rows * seq), n_stages)
    validate_schedule(schedule)
    return predicted_bubble([schedule], stage_costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="7b,13b")
    parser.add_argument("--stages", default="2,4")
    parser.add_argument("--steps", default="50,200")
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    print("| shape | P | cuts | stage costs (% of the model) | " + " | ".join(f"{s} steps" for s in steps) + " |")
    print("| --- | ---: | --- | --- | " + " | ".join("---:" for _ in steps) + " |")
    for name in args.shapes.split(","):
        for p in (int(s) for s in args.stages.split(",")):
            for halves in (False, True):
                split = balanced_split(SHAPES[name], p, halves)
                shares = " / ".join(f"{100 * c / sum(split.costs):.1f}" for c in split.costs)
                figures = " | ".join(f"{100 * bubble(split.costs, args.jobs, s):.1f} %" for s in steps)
                print(f"| {name} | {p} | {'inside blocks' if halves else 'whole blocks'} | {shares} | {figures} |",
                      flush=True)


if __name__ == "__main__":
    main()
