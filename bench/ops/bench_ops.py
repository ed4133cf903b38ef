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

Eager rows go through multi_lora_linear and autograd, so they include the host's
launch and autograd costs (2K + 1 gradients); median ms from triton.testing.do_bench.
Device rows replay a CUDA graph of the operator's own forward + backward calls (no
autograd), i.e. device time alone: base, fused, fused-overlap (dA pass on a side
stream beside the dx GEMM), fused-0. Peak memory is over the
inputs; relative error is against the loop, the largest over y, dx, all dA, all dB.

    PYTHONPATH=. python3 bench/ops/bench_ops.py --out bench/ops/results.json
    python bench/ops/bench_ops.py --small        # CPU smoke test of the script (no Triton rows)
"""

from __future__ import annotations

import argparse
import datetime
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
DEVICE_ROWS = ["base", "fused", "fused-overlap", "fused-0"]
CHECKED = ("bmm", "dense", "fused")  # eager rows compared with the loop (device rows: all fused ones)
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

    return {"base": base, "peft": peft, "loop": op("loop", segments), "bmm": bmm, "dense": op("torch", segments),
            "fused": op("triton", segments), "fused-0": op("triton", [])}


def device_variants(x, w, dy, a, b, segments: list[Segment], scale: float) -> dict[str, Callable[[], Outputs]]:
    """The fused operator's own forward + backward calls, without autograd, for graph capture."""
    from mlora.ops import triton_multi_lora as tm
    from mlora.ops.multi_lora import LoraCall

    a_d, b_d = [t.detach() for t in a], [t.detach() for t in b]
    jobs = len(a)
    ranks = tuple(t.shape[0] for t in a_d)
    a_cat, b_cat = tm.concat(a_d, b_d, x.dtype)  # as the autograd path hands them over, once per call

    def fused(segs: list[Segment], overlap: bool | None = None) -> Callable[[], Outputs]:
        call = LoraCall(tuple(segs), (scale,) * jobs, (0.0,) * jobs, (False,) * len(segs))

        def run() -> Outputs:
            saved = tm.OVERLAP_GRAD_A
            tm.OVERLAP_GRAD_A = saved if overlap is None else overlap
            try:
                y, h = tm.forward_cat(x, w, None, a_cat, b_cat, ranks, None, call)
                dx, d_a, d_b = tm.backward_cat(dy, x, w, [a_cat, b_cat], ranks, None, call, True, h=h)
            finally:
                tm.OVERLAP_GRAD_A = saved
            return [y, dx, *d_a, *d_b]

        return run

    return {"base": lambda: [x @ w.t(), dy @ w], "fused": fused(segments), "fused-overlap": fused(segments, True),
            "fused-0": fused([])}


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
    parser.add_argument("--out", help="the JSON file (default bench/ops/results.json; --small: out/bench_ops_small.json)")
    parser.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES))
    parser.add_argument("--jobs", default=",".join(map(str, JOBS)))
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--small", action="store_true", help="CPU smoke test: 256 tokens, 64→96, K = 1, 4")
    parser.add_argument("--profile", action="store_true", help="per-kernel times of the fused op (4096², K=16)")
    parser.add_argument("--rows", default=",".join(ROWS), help="eager rows to time (base and loop always run)")
    parser.add_argument("--device-rows", default=",".join(DEVICE_ROWS), help="rows timed from a CUDA graph")
    parser.add_argument("--host-profile", action="store_true", help="cProfile of the fused op's host side (4096², K=1, 64)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.small:
        args.tokens, args.shapes, args.jobs = 256, "64x96", "1,4"
    wanted = {"base", "loop", *args.rows.split(",")}
    rows = [r for r in ROWS if r in wanted and (device == "cuda" or not r.startswith("fused"))]
    dev_rows = [r for r in DEVICE_ROWS if r in args.device_rows.split(",")] if device == "cuda" else []
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                tokens=args.tokens, rank=RANK, dtype=str(dtype).removeprefix("torch."), date=datetime.date.today().isoformat())
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
                    row[f"{name}_mib"] = peak_extra_mib(fns[name], device)
                except torch.OutOfMemoryError:
                    row[f"{name}_ms"] = row[f"{name}_mib"] = None
                    torch.cuda.empty_cache()
                if name == "peft":
                    peft = (row["peft_ms"], row["peft_mib"])
            dev_fns = device_variants(x, w, dy, a, b, segments, scale=2.0) if dev_rows else {}
            for name in dev_rows:
                out = dev_fns[name]()
                if name != "base" and name != "fused-0":
                    row[f"dev_{name}_err"] = rel_err(out, ref)
                del out
                row[f"dev_{name}_ms"] = graph_ms(dev_fns[name])
            if row.get("fused_ms") is not None and row.get("base_ms"):
                row["fused_over_base"] = row["fused_ms"] / row["base_ms"]
            if row.get("dev_fused_ms") and row.get("dev_base_ms"):
                row["dev_fused_over_base"] = row["dev_fused_ms"] / row["dev_base_ms"]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "lengths"}), flush=True)
            if args.profile and dev_fns and (d_in, d_out) == (4096, 4096):
                print(f"kernels of one fused forward + backward, 4096², K = {jobs}:", flush=True)
                profile(dev_fns["fused"])
            if args.host_profile and (d_in, d_out, jobs) in ((4096, 4096, 1), (4096, 4096, 64)):
                host_profile(fns["fused" if device == "cuda" else "dense"])
            del x, w, dy, a, b, fns, dev_fns, ref
            if device == "cuda":
                torch.cuda.empty_cache()
    out = args.out or ("out/bench_ops_small.json" if args.small else "bench/ops/results.json")  # GPU figures stay
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print_table(results, rows, dev_rows)


def profile(fn: Callable[[], Outputs]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        if ev.device_time_total > 0:
            print(f"  {ev.key[:48]:48} {ev.count / 10:4.1f} calls {ev.device_time_total / 10:9.1f} us per fwd+bwd",
                  flush=True)
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


def print_table(results: list[dict], rows: list[str], dev_rows: list[str]) -> None:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    mem_rows = [r for r in ("loop", "bmm", "dense", "fused") if r in rows]
    err_rows = [r for r in CHECKED if r in rows]
    print(f"forward + backward, median ms. Eager (autograd): {', '.join(rows)}. Device (CUDA graph, no autograd): "
          f"{', '.join(dev_rows)}. MiB: peak above the inputs ({'/'.join(mem_rows)}); rel err vs loop "
          f"({'/'.join(err_rows)})")
    head = ["d_in→d_out", "K", *rows, *(f"dev {n}" for n in dev_rows), "fused/base", "dev fused/base", "MiB", "rel err"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        cells = [f"{r['d_in']}→{r['d_out']}", str(r["jobs"])]
        cells += [num(r.get(f"{n}_ms"), ".3f") for n in rows]
        cells += [num(r.get(f"dev_{n}_ms"), ".3f") for n in dev_rows]
        cells += [num(r.get("fused_over_base"), ".3f"), num(r.get("dev_fused_over_base"), ".3f")]
        cells.append(" / ".join(num(r.get(f"{n}_mib"), ".0f") for n in mem_rows))
        cells.append(" / ".join(num(r.get(f"{n}_err"), ".1e") for n in err_rows))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
