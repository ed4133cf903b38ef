"""The MLP's SwiGLU in the GEMM epilogue against its own kernels, one GPU.

At a Llama MLP's shapes (T = 8192 tokens, 4 jobs with uneven segments, r = 16, bf16;
`--shapes 7b,1.1b`), each pair is timed from a CUDA graph (device time, median over
rounds in rotated order) and checked to agree:

  forward   the up GEMM, then `fused_block`'s SwiGLU kernel (reads gate and up, writes h)
            against the up GEMM writing h beside up (`epilogue="swiglu"`, gate read there)
  backward  the down projection's dx GEMM (writes dh), then the SwiGLU's backward kernel
            (reads dh, gate, up; writes d_gate, d_up) against the dx GEMM writing d_gate
            and d_up itself (`epilogue="swiglu_bwd"`)

and the GEMMs alone, so the table shows what each epilogue costs the GEMM and what the
kernel it replaces cost.

    PYTHONPATH=. python3 bench/ops/bench_swiglu_epilogue.py --out swiglu_epilogue.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ops.bench_ops import uneven_segments  # noqa: E402
from bench.ops.tune_passes import graph_us  # noqa: E402
from mlora.ops import fused_block  # noqa: E402
from mlora.ops.kernels import fused_gemm as fg  # noqa: E402
from mlora.ops.kernels import shrink as sh  # noqa: E402
from mlora.ops.kernels.plan import segment_plan  # noqa: E402

T = 8192
SHAPES = {"7b": (4096, 11008), "1.1b": (2048, 5632)}


def shape_rows(name: str, jobs: int, rank: int, rounds: int) -> list[dict]:
    hidden, inter = SHAPES[name]
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(1)

    def randn(*shape: int, scale: float = 1.0, dtype: torch.dtype = dt) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dtype)

    segs = uneven_segments(T, jobs, seed=jobs)
    plan = segment_plan(tuple(segs), (2.0,) * jobs, (0.0,) * jobs, (False,) * jobs, (rank,) * jobs, T, dev,
                        sh.block_m(rank))
    x = randn(T, hidden)
    w_up = randn(inter, hidden, scale=hidden ** -0.5)
    gate = randn(T, inter, scale=2.0)
    h_up = randn(T, rank * jobs)
    b_up = randn(inter, rank * jobs, scale=0.05)
    dy = randn(T, hidden)
    w_down = randn(hidden, inter, scale=inter ** -0.5)  # [d_out, d_in]: dx = dy·W reads it as [K, N]
    g = randn(T, rank * jobs, dtype=torch.float32)
    a_down = randn(rank * jobs, inter, scale=0.05)
    up = randn(T, inter)
    h_out, d_up = torch.empty_like(gate), torch.empty_like(gate)

    def up_gemm() -> torch.Tensor:
        return fg.fused_gemm(x, w_up, None, h_up, b_up, x, plan, w_kn=False, dropout=False, precision="tf32")

    def forward_apart() -> tuple[torch.Tensor, torch.Tensor]:
        u = up_gemm()
        return u, fused_block.swiglu(gate, u)

    def forward_fused() -> tuple[torch.Tensor, torch.Tensor]:
        u = fg.fused_gemm(x, w_up, None, h_up, b_up, x, plan, w_kn=False, dropout=False, precision="tf32",
                          epilogue="swiglu", aux=(gate, h_out))
        return u, h_out

    def dx_gemm() -> torch.Tensor:
        return fg.fused_gemm(dy, w_down, None, g, a_down, x, plan, w_kn=True, dropout=False, precision="tf32")

    def backward_apart() -> tuple[torch.Tensor, torch.Tensor]:
        dh = dx_gemm()
        return fused_block._SwiGLU.backward(_Ctx(gate, up), dh)

    def backward_fused() -> tuple[torch.Tensor, torch.Tensor]:
        dg = fg.fused_gemm(dy, w_down, None, g, a_down, x, plan, w_kn=True, dropout=False, precision="tf32",
                           epilogue="swiglu_bwd", aux=(gate, up, d_up))
        return dg, d_up

    def swiglu_fwd() -> torch.Tensor:
        return fused_block.swiglu(gate, up)

    def swiglu_bwd() -> tuple[torch.Tensor, torch.Tensor]:
        return fused_block._SwiGLU.backward(_Ctx(gate, up), dy_inter)

    dy_inter = randn(T, inter)
    with torch.no_grad():
        mismatch = {}
        for label, apart, fused in (("forward", forward_apart, forward_fused),
                                    ("backward", backward_apart, backward_fused)):
            want = [t.clone() for t in apart()]
            got = fused()
            mismatch[label] = max((a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                                  for a, b in zip(got, want))
            same = sum((a == b).float().mean().item() for a, b in zip(got, want)) / len(want)
            mismatch[label + "_same_fraction"] = same
        fns = {"up GEMM": up_gemm, "up GEMM + swiglu": forward_apart, "up GEMM, swiglu epilogue": forward_fused,
               "swiglu fwd kernel": swiglu_fwd, "dx GEMM": dx_gemm, "dx GEMM + swiglu bwd": backward_apart,
               "dx GEMM, swiglu_bwd epilogue": backward_fused, "swiglu bwd kernel": swiglu_bwd}
        times: dict[str, list[float]] = {n: [] for n in fns}
        names = list(fns)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n].append(graph_us(fns[n]))
    rows = [dict(shape=name, jobs=jobs, rank=rank, variant=n, us=statistics.median(t)) for n, t in times.items()]
    for row in rows:
        print(f"{name:5} {row['variant']:30} {row['us']:9.1f} us", flush=True)
    print(f"{name:5} agreement (max |diff| / max |ref|, fraction equal): {mismatch}", flush=True)
    return rows + [dict(shape=name, agreement=mismatch)]


class _Ctx:
    """What `_SwiGLU.backward` reads from its autograd context."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor) -> None:
        self.saved_tensors = (gate, up)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="7b,1.1b")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = []
    for name in args.shapes.split(","):
        rows += shape_rows(name, args.jobs, args.rank, args.rounds)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
