"""The multi-LoRA operator on one GPU: forward + backward time and extra memory.

    PYTHONPATH=. python3 bench/ops/bench_ops.py --out bench/ops/results.json
    python bench/ops/bench_ops.py --small          # CPU smoke test of the script

T = 8192 tokens split unevenly (seeded) among K jobs, r = 16, bf16, for 4096→4096,
4096→14336 and 14336→4096. Rows: (a) the frozen base GEMM alone (x·Wᵀ forward, dy·W
backward), (b) one LoRA in plain PyTorch over all tokens (what PEFT runs), (c) a Python
loop over jobs (what mLoRA runs; mlora's `loop` oracle), (d) per-token gather + bmm
(MeteoRA's bmm-torch), (e) mlora's operator per backend available (`torch`: dense
GEMMs; `triton` when its kernels import). Median ms of forward + backward (CUDA events),
peak memory above the inputs, and the relative error of (e) against (c).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlora.ops import Segment, multi_lora_linear  # noqa: E402


def uneven_segments(tokens: int, jobs: int, seed: int) -> list[Segment]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(jobs, generator=gen) + 0.25
    lengths = (weights / weights.sum() * tokens).floor().long()
    lengths[-1] += tokens - int(lengths.sum())
    out, start = [], 0
    for slot, n in enumerate(lengths.tolist()):
        out.append(Segment(slot, start, start + n))
        start += n
    return out


def timed(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        import time

        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra(fn: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--jobs", default="1,4,16,64")
    parser.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default="bench/ops/results.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.small:
        args.tokens, args.shapes, args.jobs, args.reps = 256, "64x96", "1,4", 3
    backends = ["torch"]
    if device.type == "cuda":
        try:
            from mlora.ops import triton_multi_lora  # noqa: F401

            backends.append("triton")
        except ImportError:
            pass
    rows = []
    T, r = args.tokens, args.rank
    for shape in args.shapes.split(","):
        d_in, d_out = (int(v) for v in shape.split("x"))
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(T, d_in, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        w = torch.randn(d_out, d_in, device=device, dtype=dtype, generator=gen) / d_in**0.5
        dy = torch.randn(T, d_out, device=device, dtype=dtype, generator=gen)

        def run(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def step() -> None:
                x.grad = None
                fn().backward(dy)
            return step

        base = run(lambda: torch.nn.functional.linear(x, w))
        rows.append({"shape": shape, "K": 0, "row": "(a) base GEMM alone", "ms": timed(base, device, args.reps),
                     "extra_mib": peak_extra(base, device), "rel_err": None})
        for K in (int(k) for k in args.jobs.split(",")):
            segs = uneven_segments(T, K, seed=K)
            a_list = [(torch.randn(r, d_in, device=device, generator=gen) / d_in**0.5).requires_grad_(True) for _ in range(K)]
            b_list = [(torch.randn(d_out, r, device=device, generator=gen) * 0.1).requires_grad_(True) for _ in range(K)]
            scales = [2.0] * K
            slot_of_token = torch.cat([torch.full((s.end - s.start,), s.slot, device=device) for s in segs])

            def peft_one() -> torch.Tensor:
                a, b = a_list[0].to(dtype), b_list[0].to(dtype)
                return torch.nn.functional.linear(x, w) + 2.0 * ((x @ a.t()) @ b.t())

            def gather_bmm() -> torch.Tensor:
                a_tok = torch.stack([a.to(dtype) for a in a_list])[slot_of_token]  # [T, r, d_in]
                b_tok = torch.stack([b.to(dtype) for b in b_list])[slot_of_token]  # [T, d_out, r]
                h = torch.bmm(a_tok, x.unsqueeze(-1))  # [T, r, 1]
                return torch.nn.functional.linear(x, w) + 2.0 * torch.bmm(b_tok, h).squeeze(-1)

            def mlora(backend: str) -> Callable[[], torch.Tensor]:
                return lambda: multi_lora_linear(x, w, None, a_list, b_list, scales, segs, backend=backend)

            if K == 1:
                fn = run(peft_one)
                rows.append({"shape": shape, "K": K, "row": "(b) one LoRA, plain PyTorch", "ms": timed(fn, device, args.reps),
                             "extra_mib": peak_extra(fn, device), "rel_err": None})
            loop = run(mlora("loop"))
            rows.append({"shape": shape, "K": K, "row": "(c) loop over jobs", "ms": timed(loop, device, args.reps),
                         "extra_mib": peak_extra(loop, device), "rel_err": None})
            try:
                fn = run(gather_bmm)
                rows.append({"shape": shape, "K": K, "row": "(d) gather + bmm", "ms": timed(fn, device, 5),
                             "extra_mib": peak_extra(fn, device), "rel_err": None})
            except torch.OutOfMemoryError:
                rows.append({"shape": shape, "K": K, "row": "(d) gather + bmm", "ms": None, "extra_mib": None, "rel_err": "OOM"})
            ref_y = mlora("loop")().float()
            for backend in backends:
                fn = run(mlora(backend))
                y = mlora(backend)().float()
                err = ((y - ref_y).norm() / ref_y.norm()).item()
                rows.append({"shape": shape, "K": K, "row": f"(e) mlora ({backend})", "ms": timed(fn, device, args.reps),
                             "extra_mib": peak_extra(fn, device), "rel_err": err})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, T={T}, r={r}, {dtype}, forward+backward median ms")
    print(f"{'shape':12} {'K':>3} {'row':28} {'ms':>8} {'x base':>7} {'extra MiB':>10} {'rel err':>9}")
    base_ms = {}
    for row in rows:
        if row["K"] == 0:
            base_ms[row["shape"]] = row["ms"]
        ms = f"{row['ms']:.3f}" if row["ms"] is not None else "-"
        ratio = f"{row['ms'] / base_ms[row['shape']]:.2f}" if row["ms"] is not None else "-"
        mem = f"{row['extra_mib']:.0f}" if row["extra_mib"] is not None else "-"
        err = row["rel_err"] if isinstance(row["rel_err"], str) else (f"{row['rel_err']:.1e}" if row["rel_err"] is not None else "")
        print(f"{row['shape']:12} {row['K']:>3} {row['row']:28} {ms:>8} {ratio:>7} {mem:>10} {err:>9}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
