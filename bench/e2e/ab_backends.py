"""Graphed fused steps, dense against Triton, on one machine in alternating rounds.

    PYTHONPATH=. python3 bench/e2e/ab_backends.py --shapes 1.1b,7b --rounds 4 --steps 8

Whole-run benchmarks compare arms run one after the other, and their steady-state
figures moved by ±3 % between runs on the same machine; that hides a 2-6 % difference.
Here one model and one set of 4 jobs (4 × 512 tokens each, r = 16 on all 7
projections, bf16) keep one CUDA graph per arm, and the arms take turns, so drift of
clocks or host affects them alike. Each round times `--steps` replays (collate and the
four optimizer steps included, synchronised each step) and reports the median.
Arms (`--arms`): the dense path, the Triton path tuned (MLORA_TRITON_AUTOTUNE=1) and untuned,
the Triton path with its GEMMs split (`triton-split`: the LoRA part
from the Triton kernel, the base product added by cuBLAS; MLORA_TRITON_BASE), and the Triton
path with the residual adds and the loss as Hugging Face and PyTorch run them
(`triton-adds`: no `fused_residual`, no `fused_cross_entropy`), and the Triton path launched
as before 2026-12-03's seventh session (`triton-g8`: the GEMM's row tiles in groups of 8,
the dy pass at 2 stages, both reductions accumulating [R, BLOCK_D]; `triton-rd`: the
last only; `earlier_launches`), and the Triton path with q, k, v and gate, up called one by
one (`triton-unshared`: MLORA_SHARED_INPUT=0, no shared-input call), and the Triton path with
the dy pass as before 2026-12-04's third session (`triton-unpaired`: g added one element an
atomic, MLORA_PAIRED_RED=0, and its launch at 8 warps, two programs per SM), and the Triton
path with every GEMM launched a program per tile (`triton-tiled`: MLORA_TRITON_PERSISTENT=0,
no `fused_gemm_persistent_kernel`). Any arm may name the GEMM's tile after an `@`
(`triton@128x128x64x3x8x16`: BLOCK_M x BLOCK_N x BLOCK_K x stages x warps x GROUP_M, as
`bench/ops/tune_gemm.py --configs` takes them).
`--dropout P` gives every job LoRA dropout P (keep-masks drawn inside the recorded step);
`--rank R` gives every job rank R (alpha 2R) instead of 16; `--rank 4,12,20,36` gives job i
the i-th rank (cycled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.e2e.bench_e2e import SHAPES, Example, build_model  # noqa: E402
from mlora.config import JobSpec  # noqa: E402
from mlora.config.schema import ALL_TARGET_MODULES  # noqa: E402
from mlora.jobs import JobOptimizer, PendingMicro  # noqa: E402
from mlora.model.loss import job_loss_sums  # noqa: E402
from mlora.model.stage import StageModel, stage_from_model  # noqa: E402
from mlora.ops.kernels import fused_gemm, seg_grads  # noqa: E402
from mlora.runtime.batch import collate  # noqa: E402
from mlora.runtime.step_graphs import StepGraphs  # noqa: E402
from mlora.runtime.trainer import make_adapter  # noqa: E402

# backend, autotune, MLORA_TRITON_BASE (split: the LoRA part from Triton, the base product from
# cuBLAS), and whether the residual adds are fused into the norms and the loss reads bf16 logits
ARMS = {"dense": ("torch", "0", "fused", True), "triton-tuned": ("triton", "1", "fused", True),
        "triton": ("triton", "0", "fused", True), "triton-split": ("triton", "0", "split", True),
        "triton-adds": ("triton", "0", "fused", False), "triton-g8": ("triton", "0", "fused", True),
        "triton-rd": ("triton", "0", "fused", True), "triton-unshared": ("triton", "0", "fused", True),
        "triton-unpaired": ("triton", "0", "fused", True), "triton-tiled": ("triton", "0", "fused", True)}


def base_arm(arm: str) -> str:
    """The arm's name without its GEMM tile (`triton@128x128x64x3x8x16` -> `triton`)."""
    return arm.split("@")[0]


@contextlib.contextmanager
def gemm_tile(arm: str):
    """The GEMM launched at the tile the arm names after `@`, if any (until capture)."""
    if "@" not in arm:
        yield
        return
    shapes = fused_gemm.SHAPES
    fused_gemm.SHAPES = [tuple(int(v) for v in arm.split("@")[1].split("x"))]
    try:
        yield
    finally:
        fused_gemm.SHAPES = shapes


@contextlib.contextmanager
def earlier_launches(arm: str):
    """Launch shapes as they were before the seventh session of 2026-12-03: for `triton-g8`
    the GEMM's row tiles in groups of 8, the dy pass at 2 stages, and both reductions
    accumulating [R, BLOCK_D]; for `triton-rd` only the last of these. A graph keeps the
    launches it recorded, so this only matters until capture."""
    if arm not in ("triton-g8", "triton-rd", "triton-unpaired"):
        yield
        return
    shapes, dy_pass, x_pass = fused_gemm.SHAPES, seg_grads.dy_pass, seg_grads.x_pass
    if arm == "triton-unpaired":  # the dy pass's launch before g's atomics went in pairs
        seg_grads.dy_pass = lambda *args, **kw: dataclasses.replace(dy_pass(*args, **kw), warps=8, per_sm=2)
        try:
            yield
        finally:
            seg_grads.dy_pass = dy_pass
        return
    if arm == "triton-g8":
        fused_gemm.SHAPES = [shape[:5] + (8,) for shape in shapes]

    def before(element_size: int, rank_pad: int, paired: bool = False, **kw: int) -> seg_grads.PassConfig:
        cfg = dataclasses.replace(dy_pass(element_size, rank_pad, paired, **kw), d_major=False)
        if arm == "triton-g8" and cfg.block_d == 256:
            cfg = dataclasses.replace(cfg, stages=2, per_sm=2)
        return cfg

    seg_grads.dy_pass = before
    seg_grads.x_pass = lambda *args: dataclasses.replace(x_pass(*args), d_major=False)
    try:
        yield
    finally:
        fused_gemm.SHAPES, seg_grads.dy_pass, seg_grads.x_pass = shapes, dy_pass, x_pass


def measure(stage: StageModel, jobs: int, micro: int, seq: int, rounds: int, steps: int,
            dropout: float = 0.0, arms: tuple[str, ...] = tuple(ARMS),
            ranks: tuple[int, ...] = (16,)) -> dict[str, list[float]]:
    """Median graphed step ms of each of `arms`, per round (job j of rank ranks[j % len(ranks)],
    every job with LoRA dropout `dropout`)."""
    device = torch.device("cuda")
    opts, micros, examples = [], [], []
    for j in range(jobs):
        rank = ranks[j % len(ranks)]
        spec = JobSpec(name=f"job{j}", dataset="-", lora_r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                       target_modules=ALL_TARGET_MODULES, seed=j)
        adapter = make_adapter(spec, stage, device)
        stage.routing.adapters[spec.name] = adapter
        opts.append(JobOptimizer(spec, adapter, 10_000))
        ids = torch.randint(3, 32000, (micro, seq))
        micros.append(PendingMicro(spec.name, 0, 0, True, tuple(range(micro))))
        examples.append([Example(r.tolist(), [-100] + r.tolist()[1:]) for r in ids])
    weights = [1.0 / (micro * (seq - 1))] * jobs
    adapters = [stage.routing.adapters[m.job] for m in micros]
    graphs = {arm: StepGraphs(stage) for arm in arms}

    def step(arm: str) -> None:
        stage.routing.backend, os.environ["MLORA_TRITON_AUTOTUNE"], os.environ["MLORA_TRITON_BASE"], fused = \
            ARMS[base_arm(arm)]
        stage.fused_residual = stage.fused_loss = fused
        os.environ["MLORA_SHARED_INPUT"] = "0" if base_arm(arm) == "triton-unshared" else "1"
        os.environ["MLORA_PAIRED_RED"] = "0" if base_arm(arm) == "triton-unpaired" else "1"
        os.environ["MLORA_TRITON_PERSISTENT"] = "0" if base_arm(arm) == "triton-tiled" else "1"
        seg_grads.paired_red.cache_clear()
        batch = collate(micros, examples, list(range(jobs)), 0, device, loss_weights=weights)
        with earlier_launches(base_arm(arm)), gemm_tile(arm):
            if graphs[arm].step(batch, adapters) is None:  # first sighting eager, then warm-up + capture
                hidden = stage(batch.input_ids, batch.layout)
                (job_loss_sums(stage.lm_head, hidden, batch.targets, stage.fused_loss)
                 * batch.loss_weights).sum().backward()
        for opt in opts:
            opt.step(opt.grad_sq_norm().sqrt())

    for arm in arms:
        start = time.perf_counter()
        for _ in range(3):
            step(arm)
        torch.cuda.synchronize()
        print(f"  {arm}: first step, warm-up and capture {time.perf_counter() - start:.1f} s", flush=True)
        assert graphs[arm].captures == 1, f"{arm} was not recorded"
    out: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                step(arm)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            out[arm].append(1000 * statistics.median(times))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1.1b,7b")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=0.0, help="every job's lora_dropout")
    parser.add_argument("--rank", default="16", help="every job's LoRA rank, or one per job (comma-separated, cycled)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"some of {', '.join(ARMS)}")
    args = parser.parse_args()
    arms = tuple(args.arms.split(","))
    ranks = tuple(int(r) for r in args.rank.split(","))
    if unknown := [a for a in arms if base_arm(a) not in ARMS]:
        raise SystemExit(f"unknown arm(s) {unknown}: use {', '.join(ARMS)}")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}: use {', '.join(sorted(SHAPES))}")
        stage = stage_from_model(build_model(shape, torch.device("cuda"), torch.bfloat16, 32000), fused_ops=True)
        print(f"{shape}, ranks {args.rank}, dropout {args.dropout}")
        rows = measure(stage, args.jobs, args.micro, args.seq, args.rounds, args.steps, args.dropout, arms, ranks)
        for arm, ms in rows.items():
            print(f"{shape} {arm:13s} graphed step ms per round: {' '.join(f'{m:.1f}' for m in ms)}  "
                  f"median {statistics.median(ms):.1f}", flush=True)
        del stage
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
