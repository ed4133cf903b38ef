"""The multi-LoRA operator alone, one GPU: forward + backward of one adapted linear.

T = 8192 bf16 tokens split unevenly (seeded) over K jobs, r = 16, shapes 4096→4096,
4096→14336, 14336→4096. Rows, each timed forward + backward (dx, and dA/dB where
there are adapters; the frozen W gets no gradient):

  base     x·Wᵀ and dy·W alone (cuBLAS): the floor the LoRA work should hide in
  peft     one LoRA over all T tokens as HF PEFT computes it (autograd)
  loop     mLoRA's per-job Python loop (the reference operator)
  bmm      MeteoRA's bmm-torch: gather each token's A and B, two batched products
  dense    mlora's dense PyTorch operator (backend "torch", the CPU path)
  fused    mlora's Triton operator (this repository's kernels)
  fused-0  the fused operator with no segments: its GEMM alone, against cuBLAS
  (--ablate) fused-serial: dA pass not overlapped with the dx GEMM
  (--rows …,fused-ptr) fused-ptr: GEMM main loop through pointers instead of TMA

Median ms (triton.testing.do_bench: eager, host launch costs included), the same
replayed from a CUDA graph for base and the fused rows (device time alone), peak memory
over the inputs, and the relative error against the loop (the largest over y, dx, all
dA, all dB).

    PYTHONPATH=. python3 bench/ops/bench_ops.py --out bench/ops/results.json
    python bench/ops/bench_ops.py --small        # CPU smoke test of the script (no Triton rows)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlora.ops import Segment, multi_lora_linear  # noqa: E402

TOKENS = 8192
RANK = 16
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
JOBS = [1, 4, 16, 64]
ROWS = ["base", "peft", "loop", "bmm", "dense", "fused", "fused-0"]
CHECKED = ("bmm", "dense", "fused", "fused-serial", "fused-ptr")  # rows compared with the loop
GRAPHED = ("base", "fused", "fused-0", "fused-serial")  # rows also timed as a CUDA graph (dense copies
# host data to the device inside its forward, which a graph cannot capture)
Outputs = list[torch.Tensor]


def uneven_segments(tokens: int, jobs: int, seed: int) -> list[Segment]:
    """K contiguous jobs, lengths from K − 1 seeded random cut points (all ≥ 1)."""
    cuts = sorted(random.Random(seed).sample(range(1, tokens), jobs - 1))
    bounds = [0, *cuts, tokens]
    return [Segment(i, bounds[i], bounds[i + 1]) for i in range(jobs)]


def make_inputs(tokens: int, d_in: int, d_out: int, jobs: int, seed: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, dtype=dtype, generator=gen)
    x = torch.randn(tokens, d_in, **kw)
    w = torch.randn(d_out, d_in, **kw) * d_in**-0.5
    dy = torch.randn(tokens, d_out, **kw)
    a = [(torch.randn(RANK, d_in, **kw) * d_in**-0.5).requires_grad_() for _ in range(jobs)]
    b = [(torch.randn(d_out, RANK, **kw) * RANK**-0.5).requires_grad_() for _ in range(jobs)]
    return x, w, dy, a, b


def variants(x, w, dy, a, b, segments: list[Segment], scale: float) -> dict[str, Callable[[], Outputs]]:
    """Each row as a function returning [y, dx, *dA, *dB] (base and peft: what they have)."""
    jobs = len(a)
    xg = x.detach().requires_grad_()

    def base() -> Outputs:
        return [x @ w.t(), dy @ w]

    def peft() -> Outputs:
        y = torch.nn.functional.linear(xg, w) + (xg @ a[0].t()) @ b[0].t() * scale
        return [y, *torch.autograd.grad(y, [xg, a[0], b[0]], dy)]

    def op(backend: str, segs: list[Segment]) -> Callable[[], Outputs]:
        def run() -> Outputs:
            y = multi_lora_linear(xg, w, None, a, b, [scale] * jobs, segs, backend=backend)
            return [y, *torch.autograd.grad(y, [xg, *a, *b], dy)]

        return run

    slot = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in segments:
        slot[s.start : s.end] = s.slot

    def bmm() -> Outputs:
        a_all, b_all = torch.stack(a), torch.stack(b)  # [K, r, d_in], [K, d_out, r]
        a_tok, b_tok = a_all[slot], b_all[slot]  # per token: [T, r, d_in], [T, d_out, r]
        h = torch.bmm(a_tok, xg.unsqueeze(-1))  # [T, r, 1]
        y = torch.nn.functional.linear(xg, w) + scale * torch.bmm(b_tok, h).squeeze(-1)
        return [y, *torch.autograd.grad(y, [xg, *a, *b], dy)]

    def ablated(setting: str) -> Callable[[], Outputs]:
        import os

        from mlora.ops import triton_multi_lora

        fused = op("triton", segments)

        def run() -> Outputs:
            saved = triton_multi_lora.OVERLAP_GRAD_A, os.environ.get("MLORA_TRITON_TMA")
            if setting == "serial":
                triton_multi_lora.OVERLAP_GRAD_A = False
            else:
                os.environ["MLORA_TRITON_TMA"] = "0"
            try:
                return fused()
            finally:
                triton_multi_lora.OVERLAP_GRAD_A = saved[0]
                if saved[1] is None:
                    os.environ.pop("MLORA_TRITON_TMA", None)
                else:
                    os.environ["MLORA_TRITON_TMA"] = saved[1]

        return run

    return {"base": base, "peft": peft, "loop": op("loop", segments), "bmm": bmm, "dense": op("torch", segments),
            "fused": op("triton", segments), "fused-0": op("triton", []),
            "fused-serial": ablated("serial"), "fused-ptr": ablated("ptr")}


def rel_err(out: Outputs, ref: Outputs) -> float:
    """Largest of ‖out − ref‖ / ‖ref‖ over y, dx, every dA (concatenated) and every dB."""
    n = (len(ref) - 2) // 2
    errs = []
    for lo, hi in ((0, 1), (1, 2), (2, 2 + n), (2 + n, 2 + 2 * n)):
        o = torch.cat([t.float().flatten() for t in out[lo:hi]])
        r = torch.cat([t.float().flatten() for t in ref[lo:hi]])
        errs.append(((o - r).norm() / r.norm()).item())
    return max(errs)


def median_ms(fn: Callable[[], Outputs], device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=200, return_mode="median")
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def graph_ms(fn: Callable[[], Outputs]) -> float | None:
    """Median ms of fn replayed from a CUDA graph: its device time without host launch costs."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=200, return_mode="median")
    except Exception as exc:  # a row that cannot be captured: say so, keep the eager number
        print(f"graph capture failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def peak_extra_mib(fn: Callable[[], Outputs], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/ops/results.json")
    parser.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES))
    parser.add_argument("--jobs", default=",".join(map(str, JOBS)))
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--small", action="store_true", help="CPU smoke test: 256 tokens, 64→96, K = 1, 4")
    parser.add_argument("--profile", action="store_true", help="per-kernel times of the fused op (4096², K=16)")
    parser.add_argument("--ablate", action="store_true", help="also time fused-serial")
    parser.add_argument("--rows", default=",".join(ROWS), help="which rows to time (base and loop always run)")
    parser.add_argument("--graph-rows", default=",".join(GRAPHED), help="rows also timed from a CUDA graph")
    parser.add_argument("--host-profile", action="store_true", help="cProfile of the fused op's host side (4096², K=1, 64)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.small:
        args.tokens, args.shapes, args.jobs = 256, "64x96", "1,4"
    wanted = {"base", "loop", *args.rows.split(",")} | ({"fused-serial"} if args.ablate else set())
    rows = [r for r in (*ROWS, "fused-serial", "fused-ptr") if r in wanted and (device == "cuda" or not r.startswith("fused"))]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                tokens=args.tokens, rank=RANK, dtype=str(dtype).removeprefix("torch."), date="2026-11-24")
    if device == "cuda":
        import triton

        meta["triton"] = triton.__version__
    print(meta, flush=True)
    results = []
    for d_in, d_out in shapes:
        peft = None
        for jobs in (int(k) for k in args.jobs.split(",")):
            x, w, dy, a, b = make_inputs(args.tokens, d_in, d_out, jobs, jobs, device, dtype)
            segments = uneven_segments(args.tokens, jobs, seed=jobs)
            fns = variants(x, w, dy, a, b, segments, scale=2.0)
            ref = fns["loop"]()
            row: dict = dict(d_in=d_in, d_out=d_out, jobs=jobs, lengths=[s.end - s.start for s in segments])
            for name in rows:
                if name == "peft" and peft is not None:  # one LoRA over all tokens: the same at every K
                    row["peft_ms"], row["peft_mib"] = peft
                    continue
                try:
                    out = fns[name]()  # compiles / autotunes before timing
                    if name in CHECKED:
                        row[f"{name}_err"] = rel_err(out, ref)
                    del out
                    row[f"{name}_ms"] = median_ms(fns[name], device)
                    if device == "cuda" and name in GRAPHED and name in args.graph_rows.split(","):
                        row[f"{name}_graph_ms"] = graph_ms(fns[name])
                    row[f"{name}_mib"] = peak_extra_mib(fns[name], device)
                except torch.OutOfMemoryError:
                    row[f"{name}_ms"] = row[f"{name}_mib"] = None
                    torch.cuda.empty_cache()
                if name == "peft":
                    peft = (row["peft_ms"], row["peft_mib"])
            if row.get("fused_ms") is not None and row.get("base_ms"):
                row["fused_over_base"] = row["fused_ms"] / row["base_ms"]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "lengths"}), flush=True)
            if args.profile and device == "cuda" and (d_in, d_out, jobs) == (4096, 4096, 16):
                profile(fns["fused"])
            if args.host_profile and (d_in, d_out, jobs) in ((4096, 4096, 1), (4096, 4096, 64)):
                host_profile(fns["fused" if device == "cuda" else "dense"])
            del x, w, dy, a, b, fns, ref
            if device == "cuda":
                torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print_table(results, rows)


def profile(fn: Callable[[], Outputs]) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    compiled_report()


def host_profile(fn: Callable[[], Outputs]) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        fn()
    prof.disable()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def compiled_report() -> None:
    """Registers, spills and shared memory of every compiled kernel, and the tuned GEMM configs."""
    from mlora.ops.kernels import fused_gemm, seg_grads, shrink

    for name, fn in (("fused_gemm", fused_gemm.fused_gemm_kernel), ("shrink", shrink.shrink_kernel),
                     ("seg_grad", seg_grads.seg_grad_kernel)):
        for cache in fn.device_caches.values():
            for kernel in cache[0].values():
                md = kernel.metadata
                print(f"{name}: regs {kernel.n_regs} spills {kernel.n_spills} warps {md.num_warps} "
                      f"stages {md.num_stages} shared {md.shared}", flush=True)
    if fused_gemm._tuned is not None:
        for key, cfg in fused_gemm._tuned.cache.items():
            print("tuned", key, cfg, flush=True)


def print_table(results: list[dict], rows: list[str]) -> None:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    mem_rows = [r for r in ("loop", "bmm", "dense", "fused") if r in rows]
    err_rows = [r for r in CHECKED if r in rows]
    print(f"forward + backward, median ms; MiB: peak above the inputs ({'/'.join(mem_rows)}); "
          f"rel err vs loop ({'/'.join(err_rows)})")
    graphed = [n for n in GRAPHED if n in rows and any(r.get(f"{n}_graph_ms") for r in results)]
    print("| d_in→d_out | K | " + " | ".join(rows) + "".join(f" | {n} (graph)" for n in graphed)
          + " | fused/base | fused/base (graph) | MiB | rel err |")
    print("|" + "---|" * (len(rows) + len(graphed) + 6))
    for r in results:
        cells = [num(r.get(f"{n}_ms"), ".3f") for n in rows] + [num(r.get(f"{n}_graph_ms"), ".3f") for n in graphed]
        ratio_g = (r["fused_graph_ms"] / r["base_graph_ms"]
                   if r.get("fused_graph_ms") and r.get("base_graph_ms") else None)
        mem = " / ".join(num(r.get(f"{n}_mib"), ".0f") for n in mem_rows)
        err = " / ".join(num(r.get(f"{n}_err"), ".1e") for n in err_rows)
        print(f"| {r['d_in']}→{r['d_out']} | {r['jobs']} | " + " | ".join(cells)
              + f" | {num(r.get('fused_over_base'), '.3f')} | {num(ratio_g, '.3f')} | {mem} | {err} |")


if __name__ == "__main__":
    main()
