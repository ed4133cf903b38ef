"""Launch-config sweep of the fused operator's memory-bound passes, one GPU.

At T = 8192, 4096→4096 (`--width` for other widths), r = 16 (`--rank`), bf16, K jobs with
uneven segments, each pass that streams a whole T × 4096 tensor is timed alone from a CUDA graph (device time):

  shrink   h = x·Aᵀ per segment          (reads x)
  dy pass  dB = s·dyᵀ·h and g = dy·B      (reads dy; g by atomics; with its g memset)
  dyp      the dy pass with g as partials per column tile, then their sum (`--passes dyp`)
  x pass   dA = s·gᵀ·x                    (reads x)
  g        g = dy·B per segment, the shrink kernel on B (reads dy; `--passes g`)
  db       the dy pass without g (dB alone; `--passes db`): db + g against dy

for every (BLOCK_M, BLOCK_D or BLOCK_K, warps, stages) and, for the two reductions,
the number of programs the item plan aims at (a multiple of the SM count). Rates are
the streamed tensor's bytes over the time, next to the copy rate of the same tensor
(a column sum, which only reads it, and a clone). The shipped shapes (`seg_grads.x_pass`
/ `dy_pass`, the shrink's module constants) run first: every swept config's outputs are
checked against theirs, and the x pass and the shrink are also timed with dropout
masks. Prints, per K and pass, the shipped shape's time and the six fastest.

    PYTHONPATH=. python3 bench/ops/tune_passes.py --jobs 1,16,64 --out tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import astuple
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ops.bench_ops import uneven_segments  # noqa: E402
from mlora.ops.kernels import seg_grads as sg  # noqa: E402
from mlora.ops.kernels import shrink as sh  # noqa: E402
from mlora.ops.kernels.plan import item_plan, segment_plan  # noqa: E402
from mlora.ops.triton_multi_lora import PARTIAL_BUDGET_BYTES, _offset_table  # noqa: E402

T = 8192


def graph_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return 1000 * do_bench_cudagraph(fn, rep=10, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def ints(csv: str) -> list[int]:
    return [int(v) for v in csv.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="1,64")
    p.add_argument("--out", default="")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop sweeping after this long")
    p.add_argument("--passes", default="shrink,x,dy")
    p.add_argument("--bm", default="32,64,128", help="reduction BLOCK_M values")
    p.add_argument("--bd", default="128,256", help="reduction BLOCK_D values")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4", help="reduction stage counts")
    p.add_argument("--mult", default="2,4,8,16", help="reduction programs aimed at, per SM")
    p.add_argument("--d-major", default="0,1", help="reductions accumulating [BLOCK_D, R] (1) or [R, BLOCK_D] (0)")
    p.add_argument("--rank", type=int, default=16, help="every job's LoRA rank")
    p.add_argument("--width", type=int, default=4096, help="columns of the streamed x and dy (11008: a 7B MLP's)")
    p.add_argument("--shrink-bm", default="16,32,64", help="shrink BLOCK_M values")
    p.add_argument("--shrink-bk", default="64,128,256", help="shrink BLOCK_K values")
    p.add_argument("--shrink-stages", default="3,4,5")
    args = p.parse_args()
    if args.rank % 8:
        p.error("--rank: a multiple of 8 (the adapters are built unpadded here; see plan.padded_rank)")
    t_start = time.perf_counter()
    D = args.width
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    bf = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, D, device=dev, dtype=bf, generator=gen)
    dy = torch.randn(T, D, device=dev, dtype=bf, generator=gen)
    mib = T * D * 2
    copy = {"sum": graph_us(lambda: x.sum(0)), "clone": graph_us(lambda: x.clone())}
    print(f"{torch.cuda.get_device_name()}, {sms} SMs. column sum of x {copy['sum']:.1f} us "
          f"({mib / copy['sum'] / 1e3:.0f} GB/s read); clone {copy['clone']:.1f} us "
          f"({2 * mib / copy['clone'] / 1e3:.0f} GB/s read+write)", flush=True)
    rows: list[dict] = []
    for jobs in ints(args.jobs):
        segs = tuple(uneven_segments(T, jobs, seed=jobs))
        rank = args.rank
        ranks = (rank,) * jobs
        a_cat = torch.randn(rank * jobs, D, device=dev, dtype=bf, generator=gen) * D**-0.5
        b_cat = torch.randn(D, rank * jobs, device=dev, dtype=bf, generator=gen) * rank**-0.5
        scales, drop = (2.0,) * jobs, (0.0,) * jobs
        off, ends = _offset_table(ranks, D, dev)

        def shrink_fn(bm, bk, warps, stages, dropout=False, of_b=False):
            """h = x·Aᵀ, or (of_b) g = dy·B in fp32 as `shrink.shrink_b` launches it."""
            plan = segment_plan(segs, scales, (0.1,) * jobs if dropout else drop, (dropout,) * jobs, ranks, T, dev, bm)
            h = torch.empty(T, rank, device=dev, dtype=torch.float32 if of_b else bf)
            src, v = (dy, b_cat) if of_b else (x, a_cat)

            def run():
                sh.shrink_kernel[(plan.n_shrink_tiles,)](
                    src, h, v, keep_masks, plan.seg_slot, plan.seg_start, plan.seg_end, plan.shrink_seg,
                    plan.shrink_row,
                    plan.seg_mask_row, plan.seg_rank, plan.slot_off, plan.slot_keep, D, v.shape[1],
                    R=rank, BLOCK_M=bm, BLOCK_K=bk, DROPOUT=dropout, PRECISION="tf32", ALIGNED=True, A_T=of_b,
                    num_warps=warps, num_stages=stages)
                return h
            return run

        def seg_fn(kind, bm, bd, warps, stages, mult, dropout=False, d_major=False):
            cfg = sg.PassConfig(block_m=bm, block_d=bd, warps=warps, stages=stages, per_sm=mult, d_major=d_major)
            drop_p = (0.1,) * jobs if dropout else drop
            plan = segment_plan(segs, scales, drop_p, (dropout,) * jobs, ranks, T, dev, sh.block_m(rank))
            items = item_plan(segs, D, rank, dev, bm, bd, mult * sms, PARTIAL_BUDGET_BYTES)
            out = torch.empty(ends[-1], dtype=torch.float32, device=dev)
            g = torch.zeros(T, rank, dtype=torch.float32, device=dev)
            g_parts = torch.empty(triton.cdiv(D, bd), T, rank, dtype=torch.float32, device=dev)

            def run():
                if kind == "db":  # dB alone: g left to a shrink of dy by B (the "g" pass)
                    sg.seg_grads(h_ref, dy, out, off, plan, items, cfg, transposed=True, masks=x, dropout=False,
                                 precision="tf32")
                    return (out,)
                if kind == "dyp":  # g as each column tile's partial, summed in order
                    sg.seg_grads(h_ref, dy, out, off, plan, items, cfg, transposed=True, masks=x, dropout=False,
                                 precision="tf32", g=g_parts, b_cat=b_cat)
                    return out, sg.reduce_g(g_parts)
                if kind == "dy":  # g by atomics
                    g.zero_()
                    sg.seg_grads(h_ref, dy, out, off, plan, items, cfg, transposed=True, masks=x, dropout=False,
                                 precision="tf32", g=g, b_cat=b_cat)
                    return out, g
                sg.seg_grads(g_ref, x, out, off, plan, items, cfg, transposed=False, masks=keep_masks,
                             dropout=dropout, precision="tf32")
                return (out,)
            return run, items.n_items * triton.cdiv(D, bd)

        keep_masks = (torch.rand(T, D, device=dev, generator=gen) >= 0.1).view(torch.int8)
        # shipped configs first: their outputs are the reference of the sweep
        ship_shrink = dict(zip(("bm", "bk", "warps", "stages"), astuple(sh.launch_config(rank, 2))))
        h_ref = shrink_fn(**ship_shrink)().clone()
        g_ref = torch.randn(T, rank, device=dev, dtype=torch.float32, generator=gen)
        shipped = {kind: dict(bm=c.block_m, bd=c.block_d, warps=c.warps, stages=c.stages, mult=c.per_sm,
                              d_major=c.d_major)
                   for kind, c in (("x", sg.x_pass(2, rank)), ("dy", sg.dy_pass(2, rank, width=D, segments=jobs)))}
        da_ref = seg_fn("x", **shipped["x"])[0]()[0].clone()
        db_ref, gg_ref = (t.clone() for t in seg_fn("dy", **shipped["dy"])[0]())
        x_drop = seg_fn("x", **shipped["x"], dropout=True)[0]
        shrink_drop = shrink_fn(**ship_shrink, dropout=True)
        g_shrink = shrink_fn(**ship_shrink, of_b=True)
        db_alone = seg_fn("db", **shipped["dy"])[0]
        with_atomics = graph_us(seg_fn("dy", **shipped["dy"])[0])
        parts = seg_fn("dyp", **shipped["dy"])[0]
        with_parts = graph_us(parts)
        print(f"K={jobs} dy pass (shipped config): with g by atomics {with_atomics:.1f} us, "
              f"from partials {with_parts:.1f} us (g err {rel(parts()[1], gg_ref):.0e}); "
              f"dB alone {graph_us(db_alone):.1f} us + g by a shrink of dy {graph_us(g_shrink):.1f} us "
              f"(g err {rel(g_shrink(), gg_ref):.0e}, dB err {rel(db_alone()[0], db_ref):.0e})", flush=True)
        print(f"K={jobs} x pass (shipped config): {graph_us(seg_fn('x', **shipped['x'])[0]):.1f} us; "
              f"with dropout (shipped configs): x pass {graph_us(x_drop):.1f} us, "
              f"shrink {graph_us(shrink_drop):.1f} us", flush=True)

        sweeps = []
        for kind in ("shrink", "g"):
            if kind not in args.passes.split(","):
                continue
            for bm, bk, warps, stages in itertools.product(*(ints(v) for v in (args.shrink_bm, args.shrink_bk,
                                                                               args.warps, args.shrink_stages))):
                sweeps.append((kind, dict(bm=bm, bk=bk, warps=warps, stages=stages)))
        for kind in ("x", "dy", "dyp", "db"):
            if kind not in args.passes.split(","):
                continue
            for bm, bd, warps, stages, d_major in itertools.product(*(ints(v) for v in (
                    args.bm, args.bd, args.warps, args.stages, args.d_major))):
                for mult in ints(args.mult):
                    sweeps.append((kind, dict(bm=bm, bd=bd, warps=warps, stages=stages, mult=mult,
                                              d_major=bool(d_major))))
        for kind, cfg in sweeps:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"budget reached: stopped before {kind} {cfg}", flush=True)
                break
            try:
                if kind in ("shrink", "g"):
                    fn, progs = shrink_fn(**cfg, of_b=kind == "g"), None
                    err = rel(fn(), gg_ref if kind == "g" else h_ref)
                else:
                    fn, progs = seg_fn(kind, **cfg)
                    outs = fn()
                    err = rel(outs[0], da_ref if kind == "x" else db_ref)
                    if kind in ("dy", "dyp"):
                        err = max(err, rel(outs[1], gg_ref))
                us = graph_us(fn)
            except Exception as exc:  # a config over the shared-memory limit: skip it
                print(f"K={jobs} {kind} {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                continue
            row = dict(jobs=jobs, kind=kind, **cfg, programs=progs, us=us, gbs=mib / us / 1e3, err=err)
            rows.append(row)
        for kind in ("shrink", "g", "x", "dy", "dyp", "db"):
            got = sorted((r for r in rows if r["jobs"] == jobs and r["kind"] == kind), key=lambda r: r["us"])
            if not got:
                continue
            ship = (ship_shrink
                    if kind in ("shrink", "g") else shipped["dy" if kind in ("db", "dyp") else kind])
            mine = [r for r in got if all(r.get(k) == v for k, v in ship.items())]
            print(f"K={jobs} {kind}: shipped {mine[0]['us'] if mine else float('nan'):.1f} us; best:", flush=True)
            for r in got[:6]:
                print("   ", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            print(f"   max err over the sweep {max(r['err'] for r in got):.1e}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_us=copy, rows=rows),
                                             indent=1))


if __name__ == "__main__":
    main()
