"""MeteoRA mixture delta: forward + backward (gate gradients included), three ways.

- loop:  MeteoRA's training path, a Python loop over the K adapters (autograd)
- bmm:   MeteoRA's bmm-torch path, gather every (token, choice)'s A and B, two bmm
- dense: mlora's all-adapters GEMMs, masked per token (`backend: auto` while Σr ≪ d)
- fused: mlora's sorted-pair Triton kernels (mlora.meteora.op.meteora_delta)

Each step routes x through a gate [K, d] (top-k, softmax), applies the delta and
backpropagates a random upstream gradient into x and the gate (and A/B with
--train-loras). Reports the median step time and the peak memory above what the
inputs hold, as a table and JSON.

    GPU:  python -m bench.meteora.bench_meteora --json out/bench_meteora.json
    CPU smoke test:  TRITON_INTERPRET=1 python -m bench.meteora.bench_meteora --small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch

from mlora.meteora.gate import route
from mlora.meteora.op import bmm_delta, meteora_delta, reference_delta

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fused(x, a, b, scales, idx, weights):
    return meteora_delta(x, a, b, scales, idx, weights, backend="triton")


def dense(x, a, b, scales, idx, weights):
    return meteora_delta(x, a, b, scales, idx, weights, backend="dense")


METHODS: dict[str, Callable] = {"loop": reference_delta, "bmm": bmm_delta, "dense": dense, "fused": fused}


def make_inputs(tokens: int, d: int, n_adapters: int, rank: int, dtype: torch.dtype, device: torch.device, train_loras: bool, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(tokens, d, generator=gen)).to(device, dtype).requires_grad_()
    a = [(torch.randn(rank, d, generator=gen) / d**0.5).to(device, dtype).requires_grad_(train_loras) for _ in range(n_adapters)]
    b = [(torch.randn(d, rank, generator=gen) / rank**0.5).to(device, dtype).requires_grad_(train_loras) for _ in range(n_adapters)]
    gate = (torch.randn(n_adapters, d, generator=gen) * 0.02).to(device).requires_grad_()
    dy = torch.randn(tokens, d, generator=gen).to(device, dtype)
    scales = [2.0] * n_adapters
    return x, a, b, gate, dy, scales


def step(method: Callable, inputs, top_k: int) -> torch.Tensor:
    x, a, b, gate, dy, scales = inputs
    _, idx, weights = route(x, gate, top_k)
    y = method(x, a, b, scales, idx, weights)
    y.backward(dy)
    return y.detach()


def clear_grads(inputs) -> None:
    x, a, b, gate, _, _ = inputs
    for t in (x, gate, *a, *b):
        t.grad = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, inputs, top_k: int, device: torch.device, warmup: int, iters: int) -> dict:
    method = METHODS[name]
    for _ in range(warmup):
        step(method, inputs, top_k)
        clear_grads(inputs)
    sync(device)
    times = []
    peak = None
    for i in range(iters):
        if device.type == "cuda" and i == 0:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        step(method, inputs, top_k)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        if device.type == "cuda" and i == 0:
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20  # grads included: they stay
        clear_grads(inputs)
    return {"method": name, "median_ms": statistics.median(times), "min_ms": min(times),
            "peak_extra_mib": peak, "iters": iters}


def check_agreement(inputs, top_k: int, names: list[str]) -> dict[str, float]:
    """Max |difference| to the loop of each method's output and x/gate gradients."""
    x, a, b, gate, _, _ = inputs
    ref = None
    out = {}
    for name in names:
        y = step(METHODS[name], inputs, top_k)
        got = [y.float(), x.grad.float(), gate.grad.float()]
        clear_grads(inputs)
        if ref is None:
            ref = got
            continue
        out[name] = max(float((g - r).abs().max()) / max(1e-12, float(r.abs().max())) for g, r in zip(got, ref))
    return out


def profile(name: str, inputs, top_k: int, rows: int = 8) -> None:
    """Top CUDA kernels of 3 steps of one method (where its device time goes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    method = METHODS[name]
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(method, inputs, top_k)
            clear_grads(inputs)
        torch.cuda.synchronize()
    print(f"--- {name}: top kernels over 3 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--adapters", type=int, default=28)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--train-loras", action="store_true", help="A and B get gradients too")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--methods", default="loop,bmm,dense,fused")
    ap.add_argument("--small", action="store_true", help="CPU smoke-test sizes: T=96, d=80, K=5, 1 iteration")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true", help="CUDA: also print each method's top kernels")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.small:
        args.tokens, args.d, args.adapters, args.warmup, args.iters = 96, 80, 5, 1, 1
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    names = [m for m in args.methods.split(",") if m]
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if "fused" in names and device.type != "cuda" and not interpret:
        print("fused: skipped (needs CUDA, or TRITON_INTERPRET=1 on CPU)")
        names.remove("fused")
    inputs = make_inputs(args.tokens, args.d, args.adapters, args.rank, dtype, device, args.train_loras)
    config = {"tokens": args.tokens, "d": args.d, "adapters": args.adapters, "top_k": args.top_k, "rank": args.rank,
              "dtype": str(dtype).removeprefix("torch."), "train_loras": args.train_loras, "device":
              torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    agreement = check_agreement(inputs, args.top_k, names)
    rows = [measure(n, inputs, args.top_k, device, args.warmup, args.iters) for n in names]
    loop_ms = next((r["median_ms"] for r in rows if r["method"] == "loop"), None)
    print(f"MeteoRA delta fwd+bwd: T={args.tokens} d={args.d} K={args.adapters} k={args.top_k} r={args.rank} "
          f"{config['dtype']} on {config['device']}{' (A/B trained)' if args.train_loras else ''}")
    print(f"{'method':8s} {'median ms':>10s} {'vs loop':>8s} {'peak extra MiB':>15s} {'max rel diff':>13s}")
    for r in rows:
        speed = f"{loop_ms / r['median_ms']:.2f}x" if loop_ms else "-"
        peak = f"{r['peak_extra_mib']:.0f}" if r["peak_extra_mib"] is not None else "n/a"
        diff = agreement.get(r["method"])
        print(f"{r['method']:8s} {r['median_ms']:10.2f} {speed:>8s} {peak:>15s} {'' if diff is None else f'{diff:.1e}':>13s}")
    if args.profile and device.type == "cuda":
        for name in names:
            profile(name, inputs, args.top_k)
    result = {"config": config, "results": rows, "max_rel_diff_vs_loop": agreement}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
