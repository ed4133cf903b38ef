"""The fused GEMM alone and the whole operator, against cuBLAS and another version, one GPU.

At T = 8192, 4096→4096 (`--dims 4096x11008,...` for other weights), r = 16 (`--rank`), bf16,
K jobs with uneven segments, each GEMM of the fused operator (forward y = x·Wᵀ + expand,
backward dx = dy·W + expand) is timed alone from a CUDA graph (device time) next to
cuBLAS's product without the LoRA part; then
the whole operator's forward + backward (`forward_cat` + `backward_cat`, no autograd)
next to the two base GEMMs. `--against FILE` also times another version of
`mlora/ops/kernels/fused_gemm.py` (for example `git show REV:mlora/ops/kernels/fused_gemm.py
> /tmp/old_gemm.py`), in the same rounds, and checks both agree. Each round times every
variant once, in a rotated order, and the table gives medians over rounds, so the
GPU's clock drift under a long GEMM load falls on all variants alike. The operator's rows
also give the median and range of each round's own operator ÷ base (both timed in the
same round: steadier than the ratio of two medians under clock drift); `--breakdown` adds the
operator's kernels one by one at each K (where the time between K = 1 and 64 goes).

    PYTHONPATH=. python3 bench/ops/tune_gemm.py --jobs 1,4,16,64 --against /tmp/old_gemm.py --out tune.json
    PYTHONPATH=. python3 bench/ops/tune_gemm.py --skip-gemm --rounds 9 --breakdown --out operator.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ops.bench_ops import uneven_segments  # noqa: E402
from bench.ops.tune_passes import graph_us, ints, rel  # noqa: E402
from mlora.ops import triton_multi_lora as tm  # noqa: E402
from mlora.ops.kernels import fused_gemm as fg  # noqa: E402
from mlora.ops.kernels import shrink as sh  # noqa: E402
from mlora.ops.kernels.plan import rank_block, segment_plan  # noqa: E402
from mlora.ops.multi_lora import LoraCall  # noqa: E402

T = 8192


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fused_gemm_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def round_times(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Each function's graph time in each round, the order rotated each round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(graph_us(fns[n]))
    return times


def rounds_us(fns: dict, rounds: int) -> dict[str, float]:
    """Median over rounds of each function's graph time, the order rotated each round."""
    return {n: statistics.median(t) for n, t in round_times(fns, rounds).items()}


def ratio_spread(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) over rounds of times ÷ base, each round's pair timed in
    that round: the GPU's drift between rounds cancels, which it need not in the ratio of
    two medians (which may come from different rounds)."""
    ratios = sorted(t / b for t, b in zip(times, base))
    return statistics.median(ratios), ratios[0], ratios[-1]


def kernel_breakdown(fn, calls: int = 20) -> list[tuple[str, float]]:
    """(kernel, median µs) for each kernel one call of `fn` launches, in launch order,
    from torch.profiler over `calls` eager calls (device time of each kernel: the same
    kernels the graph replays, without the launch gaps). Memsets and copies count as
    kernels. Empty when the calls did not launch the same number of kernels each."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = sorted((ev for ev in prof.events()
                      if ev.device_type == torch.autograd.DeviceType.CUDA and not ev.is_user_annotation),
                     key=lambda ev: ev.time_range.start)
    if not kernels or len(kernels) % calls:
        return []
    per = len(kernels) // calls
    return [(kernels[i].name, statistics.median(kernels[c * per + i].time_range.elapsed_us() for c in range(calls)))
            for i in range(per)]


def print_breakdown(jobs: int, kernels: list[tuple[str, float]]) -> None:
    if not kernels:
        print(f"breakdown K={jobs}: calls launched different kernels; none printed", flush=True)
        return
    print(f"breakdown K={jobs}: {sum(us for _, us in kernels):.1f} us in {len(kernels)} kernels", flush=True)
    for name, us in kernels:
        print(f"  {us:8.1f}  {name[:90]}", flush=True)


def gemm_rows(jobs: int, x, w, dy, versions: dict[str, ModuleType], rounds: int, dropout: bool,
              rank: int = 16, sources: int = 1) -> list[dict]:
    """Forward and dx GEMMs alone, each version, for one K; with `dropout` also the dx
    GEMM of jobs that all have LoRA dropout (p = 0.1: its expand masked element-wise);
    with `sources` > 1 also the shared-input call's GEMMs as it runs them (as gate and
    up's, or q, k and v's: each member's rank stacked in one slot): the members' forward
    GEMMs one after another, and one dx summing their products, against cuBLAS's
    products (for dx added in its epilogue, addmm)."""
    dev = x.device
    d_in, d_out = x.shape[1], dy.shape[1]
    segs = uneven_segments(T, jobs, seed=jobs)
    ranks = (rank,) * jobs
    rows_per_tile = sh.block_m(rank)
    plan = segment_plan(tuple(segs), (2.0,) * jobs, (0.0,) * jobs, (False,) * jobs, ranks, T, dev, rows_per_tile)
    masked = segment_plan(tuple(segs), (2.0,) * jobs, (0.1,) * jobs, (True,) * len(segs), ranks, T, dev,
                          rows_per_tile)
    keep = (torch.rand(T, d_in, device=dev) > 0.1).to(torch.int8)
    gen = torch.Generator(device=dev).manual_seed(jobs)
    h = torch.randn(T, plan.rank_pad, device=dev, dtype=x.dtype, generator=gen)
    g = torch.randn(T, plan.rank_pad, device=dev, dtype=torch.float32, generator=gen)
    b_cat = torch.randn(d_out, rank * jobs, device=dev, dtype=x.dtype, generator=gen) * 0.05
    a_cat = torch.randn(rank * jobs, d_in, device=dev, dtype=x.dtype, generator=gen) * 0.05

    def one(a, w_, u, v, w_kn, p, masks=None, more=()):
        """A row's GEMM as a function of the module that runs it."""
        def call(module: ModuleType) -> torch.Tensor:
            extra = {"more": list(more)} if more else {}
            return module.fused_gemm(a, w_, None, u, v, a if masks is None else masks, p, w_kn=w_kn,
                                     dropout=masks is not None, precision="tf32", **extra)
        return call

    gemms = [("forward", one(x, w, h, b_cat, False, plan), lambda: x @ w.t()),
             ("dx", one(dy, w, g, a_cat, True, plan), lambda: dy @ w)]
    if dropout:
        gemms.append(("dx+mask", one(dy, w, g, a_cat, True, masked, keep), lambda: dy @ w))
    if sources > 1:
        ws = [w] + [torch.randn_like(w) for _ in range(sources - 1)]
        dys = [dy] + [torch.randn_like(dy) for _ in range(sources - 1)]
        stacked = segment_plan(tuple(segs), (2.0,) * jobs, (0.0,) * jobs, (False,) * jobs, (rank * sources,) * jobs,
                               T, dev, sh.block_m(rank * sources))
        p = rank_block(ranks)  # each member's columns of h_all: m·p.. (as `shared_input` stacks them)
        h_all = torch.randn(T, stacked.rank_pad, device=dev, dtype=x.dtype, generator=gen)
        g_all = torch.randn(T, stacked.rank_pad, device=dev, dtype=torch.float32, generator=gen)
        a_stack = torch.randn(rank * sources * jobs, d_in, device=dev, dtype=x.dtype, generator=gen) * 0.05
        b_cats = [b_cat] + [torch.randn_like(b_cat) for _ in range(sources - 1)]
        members_fwd = [one(x, w_m, h_all[:, m * p:(m + 1) * p], b_m, False, plan) for m, (w_m, b_m)
                       in enumerate(zip(ws, b_cats))]
        gemms.append((f"forward×{sources}", lambda module: [f(module) for f in members_fwd],
                      lambda: [x @ w_m.t() for w_m in ws]))

        def cublas_sum():
            out = dys[0] @ ws[0]
            for dy_m, w_m in zip(dys[1:], ws[1:]):
                out = torch.addmm(out, dy_m, w_m)
            return out

        gemms.append((f"dx×{sources}", one(dy, w, g_all, a_stack, True, stacked, more=list(zip(dys[1:], ws[1:]))),
                      cublas_sum))
    rows = []
    for name, call, cublas in gemms:
        fns = {"cublas": cublas, **{label: (lambda call=call, module=module: call(module))
                                    for label, module in versions.items()}}
        ref = side_by_side(fns["this"]())
        errs = {}
        for k in [k for k in versions if k != "this"]:
            try:
                errs[f"{k} err"] = rel(side_by_side(fns[k]()), ref)
            except Exception as exc:  # a config that does not compile or launch here: left out
                print(f"K={jobs:3d} {name:11s} {k}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                del fns[k]
        row = dict(jobs=jobs, gemm=name, **errs)
        row.update(rounds_us(fns, rounds))
        rows.append(row)
        print(f"K={jobs:3d} {name:11s} cuBLAS {row['cublas']:7.1f} us  "
              + "  ".join(f"{k} {row[k]:7.1f}" for k in versions if k in row)
              + "".join(f"  ({k} {row[k]:.0e})" for k in row if k.endswith(" err")), flush=True)
    return rows


def side_by_side(out):
    """A row's output as one tensor: the members' forward outputs (timed apart) concatenated."""
    return torch.cat(out, dim=1) if isinstance(out, list) else out


def shaped(cfg: str) -> ModuleType:
    """This version's fused GEMM launched with another (BLOCK_M, BLOCK_N, BLOCK_K, stages,
    warps): a stand-in module whose fused_gemm sets the shape list around each call."""
    shape = tuple(int(v) for v in cfg.split("x"))
    module = ModuleType(f"fused_gemm_{cfg}")

    def fused_gemm(*args, **kwargs):
        saved = fg.SHAPES
        fg.SHAPES = [shape]
        try:
            return fg.fused_gemm(*args, **kwargs)
        finally:
            fg.SHAPES = saved

    module.fused_gemm = fused_gemm
    return module


def base_module(base: str) -> ModuleType:
    """The operator's GEMMs one way (`triton_multi_lora.base_gemm`): "fused" (one Triton
    GEMM) or "split" (the LoRA part from the Triton kernel, the base product from cuBLAS)."""
    module = ModuleType(f"fused_gemm_{base}")

    def fused_gemm(a, weight, bias, u, v_cat, masks, plan, w_kn, dropout, precision, use_tma=None):
        if base == "split":
            return fg.split_gemm(a, weight, bias, u, v_cat, masks, plan, w_kn, dropout, precision)
        return fg.fused_gemm(a, weight, bias, u, v_cat, masks, plan, w_kn, dropout, precision, use_tma=use_tma)

    module.fused_gemm = fused_gemm
    return module


def persistent_module(mode: str) -> ModuleType:
    """This version's fused GEMM with MLORA_TRITON_PERSISTENT=mode around each call: 1 (one
    program per SM), 0 (a program per tile)."""
    module = ModuleType(f"fused_gemm_persistent_{mode}")

    def fused_gemm(*args, **kwargs):
        saved = os.environ.get("MLORA_TRITON_PERSISTENT")
        os.environ["MLORA_TRITON_PERSISTENT"] = mode
        try:
            return fg.fused_gemm(*args, **kwargs)
        finally:
            if saved is None:
                del os.environ["MLORA_TRITON_PERSISTENT"]
            else:
                os.environ["MLORA_TRITON_PERSISTENT"] = saved

    module.fused_gemm = fused_gemm
    return module


def variant(spec: str) -> ModuleType:
    """This version's fused GEMM with other launch options, `tma=0`: whether the main loop
    reads (and the tile is written) through TMA descriptors; or this operator under torch's
    deterministic algorithms, `det=1` (g = dy·B from partials summed in order; operator rows);
    or `base=fused` / `base=split`, the operator's GEMMs one way or the other (`base_module`);
    or `persistent=1` / `0`, how GEMMs that qualify launch (`persistent_module`)."""
    if spec.startswith("base="):
        return base_module(spec.split("=")[1])
    if spec.startswith("persistent="):
        return persistent_module(spec.split("=")[1])
    names = dict(tma="use_tma")
    items = dict(item.split("=") for item in spec.split("+"))
    module = ModuleType(f"fused_gemm_{spec}")
    module.deterministic = items.pop("det", "0") == "1"
    options = {names[k]: bool(int(v)) for k, v in items.items()}

    def fused_gemm(*args, **kwargs):
        return fg.fused_gemm(*args, **kwargs, **options)

    module.fused_gemm = fused_gemm
    return module


@contextlib.contextmanager
def gemm_module(module: ModuleType):
    """The operator calling another version's fused GEMM (tm looks it up as `tm.gemm`),
    under torch's deterministic algorithms if the variant says so (`variant`)."""
    saved = tm.gemm, torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    tm.gemm = module
    if getattr(module, "deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        # a stand-in module: the operator calls its fused_gemm for both GEMMs
        with tm.base_gemm_set(None if module is fg else "fused"):
            yield
    finally:
        tm.gemm = saved[0]
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


def operator_rows(jobs_list: list[int], x, w, dy, versions: dict[str, ModuleType], rounds: int,
                  dropout: bool = False, rank: int = 16, breakdown: bool = False) -> list[dict]:
    """forward_cat + backward_cat with each version's GEMM, against the base GEMMs; with
    `dropout` every job has LoRA dropout p = 0.1 (keep-masks on all its tokens); with
    `breakdown` this version's kernels one by one too."""
    dev = x.device
    d_in, d_out = x.shape[1], dy.shape[1]
    rows = []
    for jobs in [0, *jobs_list]:
        segs = uneven_segments(T, jobs, seed=jobs) if jobs else []
        n = max(jobs, 1)
        gen = torch.Generator(device=dev).manual_seed(100 + jobs)
        a = [torch.randn(rank, d_in, device=dev, dtype=x.dtype, generator=gen) * 0.02 for _ in range(n)]
        b = [torch.randn(d_out, rank, device=dev, dtype=x.dtype, generator=gen) * 0.02 for _ in range(n)]
        ranks = (rank,) * n
        a_cat, b_cat = tm.concat(a, b, x.dtype)
        p = 0.1 if dropout else 0.0
        call = LoraCall(tuple(segs), (2.0,) * n, (p,) * n, (dropout,) * len(segs))
        keep = [(torch.rand(s.end - s.start, d_in, device=dev, generator=gen) > p) for s in segs] if dropout else []
        masks = tm.stack_masks(keep, x, ranks, call) if dropout and segs else None

        def operator(module: ModuleType):
            def run():
                with gemm_module(module):
                    y, hh = tm.forward_cat(x, w, None, a_cat, b_cat, ranks, masks, call)
                    dx, d_a, d_b = tm.backward_cat(dy, x, w, [a_cat, b_cat], ranks, masks, call, True, h=hh)
                return [y, dx, *d_a, *d_b]
            return run

        fns = {"base": lambda: [x @ w.t(), dy @ w], **{k: operator(m) for k, m in versions.items()}}
        ref = fns["this"]()
        errs = {f"{k} err": max(rel(p, q) for p, q in zip(fns[k](), ref)) for k in versions if k != "this"}
        times = round_times(fns, rounds)
        row = dict(jobs=jobs, **errs, **{k: statistics.median(t) for k, t in times.items()},
                   rounds_us=times)
        spreads = {k: ratio_spread(times[k], times["base"]) for k in versions}
        row["ratio"] = {k: dict(zip(("median", "low", "high"), v)) for k, v in spreads.items()}
        if breakdown:
            row["kernels"] = kernel_breakdown(fns["this"])
        rows.append(row)
        base = row["base"]
        print(f"operator K={jobs:3d}: base {base:7.1f} us  "
              + "  ".join(f"{k} {row[k]:7.1f} ({row[k] / base:.3f}x; a round's own base "
                          f"{spreads[k][0]:.3f}x, {spreads[k][1]:.3f}-{spreads[k][2]:.3f})" for k in versions)
              + "".join(f"  ({k} {v:.0e})" for k, v in errs.items()), flush=True)
        if breakdown:
            print_breakdown(jobs, row["kernels"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="1,4,16,64")
    p.add_argument("--against", default="", help="other fused_gemm.py files (comma-separated) to time beside this one")
    p.add_argument("--configs", default="", help="this version's GEMM at other shapes too: BMxBNxBKxSTAGESxWARPS[xGROUP_M],...")
    p.add_argument("--dims", default="4096x4096", help="d_in x d_out of the weights, comma-separated: each its own rows")
    p.add_argument("--variants", default="", help="this version with other launch options: tma=0; det=1 (the operator under torch.use_deterministic_algorithms); base=fused or base=split (the operator's GEMMs one way or the other; this version runs MLORA_TRITON_BASE's, fused by default); persistent=1 or 0 (MLORA_TRITON_PERSISTENT around each GEMM)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sources", type=int, default=1, help="also the shared-input dx summing this many products (2: gate, up; 3: q, k, v)")
    p.add_argument("--out", default="")
    p.add_argument("--skip-gemm", action="store_true", help="whole-operator rows only")
    p.add_argument("--skip-operator", action="store_true", help="GEMM rows only")
    p.add_argument("--rank", type=int, default=16, help="every job's LoRA rank")
    p.add_argument("--dropout", action="store_true",
                   help="dx GEMM with every job's dropout mask too; operator with dropout")
    p.add_argument("--breakdown", action="store_true",
                   help="the operator's kernels one by one at each K (torch.profiler, eager calls)")
    args = p.parse_args()
    if args.rank % 8 and not args.skip_gemm:
        p.error("--rank: a multiple of 8, or --skip-gemm (the GEMM rows build unpadded adapters; the "
                "operator rows pad them as training does: see plan.padded_rank)")
    dev = torch.device("cuda")
    bf = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    versions = {"this": fg}
    for path in filter(None, args.against.split(",")):
        versions[Path(path).stem] = load_module(path)
    for cfg in filter(None, args.configs.split(",")):
        versions[cfg] = shaped(cfg)
    for spec in filter(None, args.variants.split(",")):
        versions[spec] = variant(spec)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    jobs = ints(args.jobs)
    gemms, ops = [], []
    for dims in args.dims.split(","):
        d_in, d_out = (int(v) for v in dims.split("x"))
        print(f"{d_in} -> {d_out}", flush=True)
        x = torch.randn(T, d_in, device=dev, dtype=bf, generator=gen)
        dy = torch.randn(T, d_out, device=dev, dtype=bf, generator=gen)
        w = torch.randn(d_out, d_in, device=dev, dtype=bf, generator=gen) * d_in**-0.5
        shape = dict(d_in=d_in, d_out=d_out)
        if not args.skip_gemm:
            gemms += [dict(shape, **r) for k in jobs
                      for r in gemm_rows(k, x, w, dy, versions, args.rounds, args.dropout, args.rank, args.sources)]
        if not args.skip_operator:
            ops += [dict(shape, **r) for r in operator_rows(jobs, x, w, dy, versions, args.rounds, args.dropout,
                                                            args.rank, args.breakdown)]
        del x, dy, w
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                  against=args.against, variants=args.variants, rank=args.rank,
                                                  configs=args.configs,
                                                  gemm=gemms, operator=ops), indent=1))


if __name__ == "__main__":
    main()
