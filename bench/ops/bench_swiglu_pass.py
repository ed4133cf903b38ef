"""The SwiGLU's backward with the gate and up dy passes in one pass, against apart, one GPU.

At T = 8192 tokens of K jobs (uneven segments), an MLP `--width` wide (11008: 7B; 5632:
1.1B), r = 16, bf16, device time from CUDA graphs (median):

  apart    fused_block's SwiGLU backward (d_gate, d_up from d_act, gate, up), then the
           dy pass of gate and of up (dB and g, g's memset included)
  one pass kernels.swiglu_grads.swiglu_dy_pass at the shipped launch shape and at every
           swept (BLOCK_M, BLOCK_D, warps, stages)

Every config's outputs must agree with apart's (relative error < 1e-3: g's atomics add in
another order; `same` says whether d_gate and d_up are equal bit for bit). Prints a table; `--out` writes JSON.

    PYTHONPATH=. python3 bench/ops/bench_swiglu_pass.py --jobs 4 --width 11008,5632
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ops.bench_ops import uneven_segments  # noqa: E402
from bench.ops.tune_passes import T, graph_us, ints, rel  # noqa: E402
from mlora.ops import triton_multi_lora as tm  # noqa: E402
from mlora.ops.fused_block import swiglu_grads as swiglu_apart  # noqa: E402
from mlora.ops.kernels import seg_grads as sg  # noqa: E402
from mlora.ops.kernels import swiglu_grads  # noqa: E402
from mlora.ops.multi_lora import LoraCall  # noqa: E402


def case(jobs: int, width: int, rank: int, sweep: list[sg.PassConfig], device: str = "cuda", tokens: int = T) -> dict:
    dev, dt = torch.device(device), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(jobs * 7 + width)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dt)

    segments = uneven_segments(tokens, jobs, seed=jobs)
    call = LoraCall(tuple(segments), (2.0,) * jobs, (0.0,) * jobs, (False,) * len(segments))
    ranks = (rank,) * jobs
    x = torch.empty(tokens, 1, device=dev)  # the plan reads its rows and device only
    st = tm._state(x, ranks, call, None)
    plan = st.plan
    d_act, gate, up = rnd(tokens, width), rnd(tokens, width), rnd(tokens, width)
    h_all = rnd(tokens, 2 * plan.rank_pad, scale=0.5)
    h = (h_all[:, : plan.rank_pad], h_all[:, plan.rank_pad :])
    b_cats = (rnd(width, plan.rank_total, scale=0.1), rnd(width, plan.rank_total, scale=0.1))
    off_b, ends_b = tm._offsets(st, width)
    outs = {}

    def apart() -> None:
        g_all = torch.zeros(tokens, 2 * plan.rank_pad, dtype=torch.float32, device=dev)
        dys = swiglu_apart(d_act, gate, up)
        cfg = sg.dy_pass(2, plan.rank_pad)
        flats = []
        for m in range(2):
            flat = torch.empty(ends_b[-1], dtype=torch.float32, device=dev)
            sg.seg_grads(h[m], dys[m], flat, off_b, plan, tm._items(st, width, cfg), cfg, transposed=True,
                         masks=x, dropout=False, precision="tf32", g=g_all[:, m * plan.rank_pad : (m + 1) * plan.rank_pad],
                         b_cat=b_cats[m])
            flats.append(flat)
        outs["apart"] = (*dys, *flats, g_all)

    def one_pass(cfg: sg.PassConfig, name: str):
        def run() -> None:
            g_all = torch.zeros(tokens, 2 * plan.rank_pad, dtype=torch.float32, device=dev)
            flats = tuple(torch.empty(ends_b[-1], dtype=torch.float32, device=dev) for _ in range(2))
            g = (g_all[:, : plan.rank_pad], g_all[:, plan.rank_pad :])
            dys = swiglu_grads.swiglu_dy_pass(d_act, gate, up, h, g, b_cats, flats, off_b, plan,
                                              tm._items(st, width, cfg), cfg, "tf32")
            outs[name] = (*dys, *flats, g_all)
        return run

    rows = [dict(variant="apart", us=graph_us(apart))]
    ref = outs["apart"]
    shipped = swiglu_grads.pass_config(2, plan.rank_pad)
    for cfg in [shipped, *[c for c in sweep if c != shipped]]:
        name = f"{cfg.block_m}x{cfg.block_d}/w{cfg.warps}/s{cfg.stages}/p{cfg.per_sm}/{'d' if cfg.d_major else 'r'}"
        try:
            us = graph_us(one_pass(cfg, name))
        except Exception as exc:  # noqa: BLE001 - a config past the SM's resources: reported, not fatal
            rows.append(dict(variant=name, error=f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        got = outs[name]
        same = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        err = max(rel(a, b) for a, b in zip(got, ref))
        assert err < 1e-3, f"{name}: off by {err:.2e}"
        rows.append(dict(variant=name + (" (shipped)" if cfg == shipped else ""), us=us, err=err, same_dgate_dup=same))
    return dict(jobs=jobs, width=width, rank=rank, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", default="4")
    parser.add_argument("--width", default="11008,5632")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bm", default="32,64")
    parser.add_argument("--bd", default="128,256")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2")
    parser.add_argument("--per-sm", default="2,4,8", help="programs the item plan aims at, per SM")
    parser.add_argument("--d-major", default="1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sweep = [sg.PassConfig(bm, bd, w, s, per_sm, bool(dm)) for bm, bd, w, s, per_sm, dm in itertools.product(
        ints(args.bm), ints(args.bd), ints(args.warps), ints(args.stages), ints(args.per_sm), ints(args.d_major))]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, T = {T}, r = {args.rank}, bf16")
    results = []
    for jobs in ints(args.jobs):
        for width in ints(args.width):
            res = case(jobs, width, args.rank, sweep)
            results.append(res)
            apart = res["rows"][0]["us"]
            timed = sorted((r for r in res["rows"][1:] if "us" in r), key=lambda r: r["us"])
            print(f"K = {jobs}, width {width}: apart {apart:.1f} us")
            for r in [r for r in res["rows"][1:] if "(shipped)" in r["variant"]] + timed[:6]:
                print(f"  {r['variant']:28} {r['us']:7.1f} us  ({apart / r['us']:.2f}x)  err {r['err']:.1e}  "
                      f"same {r['same_dgate_dup']}")
            for r in res["rows"]:
                if "error" in r:
                    print(f"  {r['variant']:28} {r['error']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
