"""Where the start of a short run goes: one mlora run (bench_e2e's) in a fresh process.

    python bench/e2e/ramp.py --shape 1.1b --steps 10                 # when each step was logged
    python bench/e2e/ramp.py --shape 7b --steps 4 --cprofile         # and the host's profile of it
    python bench/e2e/ramp.py --shape 1.1b --steps 10 --first-sight   # record shapes at first sight

Run it once before measuring so Triton's disk cache holds the kernels (a cold cache adds
seconds of compiling). A step is logged when the host has issued its update; the host
runs at most two batches ahead of the GPU. `--first-sight` records a batch shape the
first time it is seen instead of the second (the trainer waits for a second sighting
so one-off shapes are not recorded): the measured alternative, not what the trainer does.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlora.runtime.step_graphs as step_graphs  # noqa: E402
from bench.e2e.bench_e2e import build_model, run_mlora  # noqa: E402


class _SeenEverything(set):
    def __contains__(self, key: object) -> bool:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.1b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--first-sight", action="store_true")
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()
    if args.first_sight:
        init = step_graphs.StepGraphs.__init__

        def first_sight(self: step_graphs.StepGraphs, *a: object, **k: object) -> None:
            init(self, *a, **k)
            self.seen = _SeenEverything()

        step_graphs.StepGraphs.__init__ = first_sight  # type: ignore[method-assign]
    run = argparse.Namespace(jobs=4, steps=args.steps, warmup=1, micro=4, seq=512, rank=16, vocab=32000,
                             dtype="bfloat16", vary=False, pad=64)
    device = torch.device("cuda")
    model = build_model(args.shape, device, torch.bfloat16, run.vocab)
    x = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    (x @ x).sum().item()  # cuBLAS up, as after bench_e2e's PEFT run
    profile = cProfile.Profile()
    if args.cprofile:
        profile.enable()
    result = run_mlora(model, run, device, "auto", run.jobs * run.micro * run.seq, True)
    profile.disable()
    print(f"{args.shape} first_sight={args.first_sight}: steps logged at "
          f"{' '.join(f'{t:.2f}' for t in result['step_logged_s'])} s, run over at {result['total_s']:.2f} s, "
          f"peak reserved {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB")
    if args.cprofile:
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("cumulative").print_stats(50)
        stats.sort_stats("tottime").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
