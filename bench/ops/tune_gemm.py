"""The fused GEMM alone, tiled against persistent launches, and the whole operator, one GPU.

At T = 8192, 4096→4096, r = 16, bf16, K jobs with uneven segments, each GEMM of the
fused operator (forward y = x·Wᵀ + expand, backward dx = dy·W + expand) is timed alone
from a CUDA graph (device time) next to cuBLAS's product without the LoRA part:

  tiled     one program per output tile (`persistent=False`)
  p-flat    one program per SM walking tiles; segment steps unrolled, so the tile and
            K loops flatten into one pipelined loop (the default `Persistent()`)
  p-tma     the same with a TMA store of each output tile
  p-loop    persistent, the segment loop kept (not flattened)

Every launch's output is checked against the tiled kernel's. Then the whole operator's
forward + backward (`forward_cat` + `backward_cat`, no autograd) is timed with the
persistent kernel on and off (MLORA_TRITON_PERSISTENT), against the base GEMMs (cuBLAS
x·Wᵀ and dy·W) and the operator without segments.

    PYTHONPATH=. python3 bench/ops/tune_gemm.py --jobs 1,4,16,64 --out bench/ops/tune_gemm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ops.bench_ops import uneven_segments  # noqa: E402
from bench.ops.tune_passes import graph_us, ints, rel  # noqa: E402
from mlora.ops.kernels import fused_gemm as fg  # noqa: E402
from mlora.ops.kernels import shrink as sh  # noqa: E402
from mlora.ops.kernels.plan import segment_plan  # noqa: E402

T, D, RANK = 8192, 4096, 16
ROUNDS = 5
LAUNCHES = {"tiled": False, "p-loop": fg.Persistent(max_segs=0), "p-flat": fg.Persistent(max_segs=8),
            "p-tma": fg.Persistent(out_tma=True, max_segs=0)}


def rounds_us(fns: dict, rounds: int) -> dict[str, float]:
    """Median over rounds of each function's graph time; the order rotates each round,
    so clock drift (the GPU's boost under a long GEMM load) falls on all alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(graph_us(fns[n]))
    return {n: statistics.median(t) for n, t in times.items()}


def gemm_rows(jobs: int, x, w, dy, dev) -> list[dict]:
    """Forward and dx GEMMs alone, every launch, for one K."""
    segs = uneven_segments(T, jobs, seed=jobs)
    ranks = (RANK,) * jobs
    plan = segment_plan(tuple(segs), (2.0,) * jobs, (0.0,) * jobs, (False,) * jobs, ranks, T, dev, sh.BLOCK_M)
    gen = torch.Generator(device=dev).manual_seed(jobs)
    h = torch.randn(T, plan.rank_pad, device=dev, dtype=x.dtype, generator=gen)
    g = torch.randn(T, plan.rank_pad, device=dev, dtype=torch.float32, generator=gen)
    b_cat = torch.randn(D, RANK * jobs, device=dev, dtype=x.dtype, generator=gen) * 0.05
    a_cat = torch.randn(RANK * jobs, D, device=dev, dtype=x.dtype, generator=gen) * 0.05
    rows = []
    for name, a, u, v, w_kn, cublas in (("forward", x, h, b_cat, False, lambda: x @ w.t()),
                                        ("dx", dy, g, a_cat, True, lambda: dy @ w)):
        row = dict(jobs=jobs, gemm=name, segs_per_tile=plan.max_per_tile(fg.fixed_config(2)[0]["BLOCK_M"]))
        fns = {"cublas": cublas}
        for launch, persistent in LAUNCHES.items():
            def run(persistent=persistent, a=a, u=u, v=v, w_kn=w_kn):
                return fg.fused_gemm(a, w, None, u, v, a, plan, w_kn=w_kn, dropout=False, precision="tf32",
                                     persistent=persistent)
            fns[launch] = run
        ref = fns["tiled"]()
        for launch in LAUNCHES:
            row[f"{launch} err"] = rel(fns[launch](), ref)
        row.update(rounds_us(fns, ROUNDS))
        rows.append(row)
        print(f"K={jobs:3d} {name:8s} segs/tile {row['segs_per_tile']}  cuBLAS {row['cublas']:7.1f}  "
              + "  ".join(f"{k} {row[k]:7.1f} ({row[k + ' err']:.0e})" for k in LAUNCHES), flush=True)
    return rows


def operator_rows(jobs_list: list[int], x, w, dy, dev) -> list[dict]:
    """forward_cat + backward_cat with the persistent kernel off and on, against the base."""
    from mlora.ops import triton_multi_lora as tm
    from mlora.ops.multi_lora import LoraCall

    def base_fn():
        return [x @ w.t(), dy @ w]

    rows = []
    for jobs in [0, *jobs_list]:
        segs = uneven_segments(T, jobs, seed=jobs) if jobs else []
        n = max(jobs, 1)
        gen = torch.Generator(device=dev).manual_seed(100 + jobs)
        a = [torch.randn(RANK, D, device=dev, dtype=x.dtype, generator=gen) * 0.02 for _ in range(n)]
        b = [torch.randn(D, RANK, device=dev, dtype=x.dtype, generator=gen) * 0.02 for _ in range(n)]
        ranks = (RANK,) * n
        a_cat, b_cat = tm.concat(a, b, x.dtype)
        call = LoraCall(tuple(segs), (2.0,) * n, (0.0,) * n, (False,) * len(segs))

        def run():
            y, hh = tm.forward_cat(x, w, None, a_cat, b_cat, ranks, None, call)
            dx, d_a, d_b = tm.backward_cat(dy, x, w, a_cat, b_cat, ranks, None, call, True, h=hh)
            return [y, dx, *d_a, *d_b]

        def flagged(flag: str):
            def go():
                os.environ["MLORA_TRITON_PERSISTENT"] = flag
                return run()
            return go

        fns = {"base": base_fn, "tiled": flagged("0"), "persistent": flagged("1")}
        outs = {label: fns[label]() for label in ("tiled", "persistent")}
        row = dict(jobs=jobs, **rounds_us(fns, ROUNDS))
        os.environ.pop("MLORA_TRITON_PERSISTENT")
        base = row["base"]
        row["err"] = max(rel(p, q) for p, q in zip(outs["persistent"], outs["tiled"]))
        rows.append(row)
        print(f"operator K={jobs:3d}: base {base:7.1f} us  tiled {row['tiled']:7.1f} ({row['tiled'] / base:.3f}x)  "
              f"persistent {row['persistent']:7.1f} ({row['persistent'] / base:.3f}x)  err {row['err']:.1e}",
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="1,4,16,64")
    p.add_argument("--out", default="")
    p.add_argument("--skip-gemm", action="store_true", help="whole-operator rows only")
    args = p.parse_args()
    dev = torch.device("cuda")
    bf = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, D, device=dev, dtype=bf, generator=gen)
    dy = torch.randn(T, D, device=dev, dtype=bf, generator=gen)
    w = torch.randn(D, D, device=dev, dtype=bf, generator=gen) * D**-0.5
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    jobs = ints(args.jobs)
    gemms = [] if args.skip_gemm else [r for k in jobs for r in gemm_rows(k, x, w, dy, dev)]
    ops = operator_rows(jobs, x, w, dy, dev)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                  gemm=gemms, operator=ops), indent=1))


if __name__ == "__main__":
    main()
