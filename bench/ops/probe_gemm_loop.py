"""How fast can a plain Triton GEMM (no LoRA) run at the 7B layer's shapes, against cuBLAS, one GPU.

The fused operator's GEMM is ~3-7 % behind cuBLAS's product. This probe asks whether
the gap is the fused epilogue's or Triton's main loop's: it times plain bf16 GEMMs
y = x·Wᵀ (TMA descriptors, 128 × 256 × 64 tiles, row tiles in groups of 16 — the
operator's shape) as

  tiled        one program per output tile (the operator's launch)
  persist      one program per SM walking the tiles, K loop nested
  persist-flat the same, tile and K loops flattened by Triton (`tl.range(flatten=True)`),
               so the next tile's loads can be issued during this tile's epilogue
  +sub         the output tile stored as two 128 × 128 halves (less shared memory)
  extra-k      persist-flat+sub plus y += U·Vᵀ (U [T, 64], V [d_out, 64]) as one more step
               of the same loop through its own descriptors: the LoRA expand the way the
               operator could fold it (`extra_k_kernel`; `--variants extra-k-s3`)

with 3 or 4 stages, next to cuBLAS (`x @ W.t()`) and the operator's own forward GEMM
(`mlora`: 4 jobs, r = 16, the LoRA expand inside; launched as `fused_gemm` launches it
now, one program per SM since 2026-12-04), at T = 8192 rows. Device time from CUDA
graphs, median over rounds in rotated order; every probe variant's output is checked
against cuBLAS's (extra-k's against x·Wᵀ + U·Vᵀ).

    PYTHONPATH=. python3 bench/ops/probe_gemm_loop.py --rounds 5 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ops.tune_passes import graph_us, rel  # noqa: E402
from mlora.ops.kernels.fused_gemm import _tile_coords  # noqa: E402  (the operator's grouped tile order)

T = 8192
BM, BN, BK, GROUP_M = 128, 256, 64, 16


@triton.jit
def _store(c_desc, acc, m0, n0, BN: tl.constexpr, SUBTILE: tl.constexpr):
    dtype = c_desc.dtype
    if SUBTILE:
        halves = tl.permute(tl.reshape(acc, (acc.shape[0], 2, BN // 2)), (0, 2, 1))
        lo, hi = tl.split(halves)
        c_desc.store([m0, n0], lo.to(dtype))
        c_desc.store([m0, n0 + BN // 2], hi.to(dtype))
    else:
        c_desc.store([m0, n0], acc.to(dtype))


@triton.jit
def tiled_kernel(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, SUBTILE: tl.constexpr):
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    m0, n0 = pid_m * BM, pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        acc = tl.dot(a_desc.load([m0, k]), b_desc.load([n0, k]).T, acc)
    _store(c_desc, acc, m0, n0, BN, SUBTILE)


@triton.jit
def persistent_kernel(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP_M: tl.constexpr, SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, NUM_SMS: tl.constexpr):
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, grid_m, grid_n, GROUP_M)
        m0, n0 = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            acc = tl.dot(a_desc.load([m0, ki * BK]), b_desc.load([n0, ki * BK]).T, acc)
        _store(c_desc, acc, m0, n0, BN, SUBTILE)


@triton.jit
def extra_k_kernel(a_desc, b_desc, u_desc, v_desc, c_desc, M, N, K, KU, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr):
    """persistent_kernel flattened, output in halves, plus y += U·Vᵀ as KU / BK more steps
    of the same loop, read through their own descriptors: the LoRA expand as the
    operator would fold it if the shrink wrote u = s·h zero outside its slot's columns
    ([T, Σr], U here) against B_cat (V)."""
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    steps = k_tiles + tl.cdiv(KU, BK)
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, grid_m, grid_n, GROUP_M)
        m0, n0 = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(steps):
            if ki < k_tiles:
                a = a_desc.load([m0, ki * BK])
                b = b_desc.load([n0, ki * BK])
            else:
                a = u_desc.load([m0, (ki - k_tiles) * BK])
                b = v_desc.load([n0, (ki - k_tiles) * BK])
            acc = tl.dot(a, b.T, acc)
        _store(c_desc, acc, m0, n0, BN, True)


def extra_k(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, stages: int, rank_total: int = 64):
    """extra_k_kernel's launch with U [T, rank_total] and V [d_out, rank_total] (random,
    small); returns the launch and its reference x·Wᵀ + U·Vᵀ."""
    u = torch.randn(x.shape[0], rank_total, device=x.device, dtype=x.dtype) * 0.1
    v = torch.randn(w.shape[0], rank_total, device=x.device, dtype=x.dtype) * 0.1
    descs = [TensorDescriptor.from_tensor(t, block) for t, block in
             ((x, [BM, BK]), (w, [BN, BK]), (u, [BM, BK]), (v, [BN, BK]), (out, [BM, BN // 2]))]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    M, K = x.shape
    N = w.shape[0]
    grid = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    fn = lambda: extra_k_kernel[grid](*descs, M, N, K, rank_total, BM, BN, BK, GROUP_M, sms,  # noqa: E731
                                      num_warps=8, num_stages=stages)
    return fn, x @ w.t() + u @ v.t()


def shipped(x: torch.Tensor, w: torch.Tensor, jobs: int = 4, rank: int = 16):
    """The operator's forward GEMM (`fused_gemm`) for `jobs` uneven segments at `rank`."""
    from bench.ops.bench_ops import uneven_segments
    from mlora.ops.kernels import fused_gemm as fg
    from mlora.ops.kernels import shrink as sh
    from mlora.ops.kernels.plan import segment_plan

    dev = x.device
    plan = segment_plan(tuple(uneven_segments(T, jobs, seed=jobs)), (2.0,) * jobs, (0.0,) * jobs, (False,) * jobs,
                        (rank,) * jobs, T, dev, sh.block_m(rank))
    h = torch.randn(T, plan.rank_pad, device=dev, dtype=x.dtype)
    b_cat = torch.randn(w.shape[0], rank * jobs, device=dev, dtype=x.dtype) * 0.05
    return lambda: fg.fused_gemm(x, w, None, h, b_cat, x, plan, w_kn=False, dropout=False, precision="tf32")


def variant(name: str, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor):
    """A launch of `name` ("tiled-s3", "persist-flat+sub-s4", ...) writing x·Wᵀ into out."""
    stages = int(name.rsplit("-s", 1)[1])
    sub = "+sub" in name
    a = TensorDescriptor.from_tensor(x, [BM, BK])
    b = TensorDescriptor.from_tensor(w, [BN, BK])
    c = TensorDescriptor.from_tensor(out, [BM, BN // 2 if sub else BN])
    M, K = x.shape
    N = w.shape[0]
    if name.startswith("tiled"):
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
        return lambda: tiled_kernel[grid](a, b, c, M, N, K, BM, BN, BK, GROUP_M, sub, num_warps=8,
                                          num_stages=stages)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    flat = "flat" in name
    grid = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    return lambda: persistent_kernel[grid](a, b, c, M, N, K, BM, BN, BK, GROUP_M, sub, flat, sms, num_warps=8,
                                           num_stages=stages)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="4096x4096,4096x11008,11008x4096", help="d_in x d_out pairs")
    p.add_argument("--variants", default="tiled-s3,tiled+sub-s3,persist-s3,persist+sub-s3,persist-flat-s3,"
                                         "persist-flat+sub-s3,persist-flat+sub-s4")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    dev = torch.device("cuda")
    results = []
    for dims in args.dims.split(","):
        d_in, d_out = (int(v) for v in dims.split("x"))
        gen = torch.Generator(device=dev).manual_seed(d_in + d_out)
        x = torch.randn(T, d_in, device=dev, dtype=torch.bfloat16, generator=gen)
        w = torch.randn(d_out, d_in, device=dev, dtype=torch.bfloat16, generator=gen) * d_in ** -0.5
        ref = x @ w.t()
        fns = {"cublas": lambda: x @ w.t(), "mlora": shipped(x, w)}
        for name in args.variants.split(","):
            out = torch.empty(T, d_out, device=dev, dtype=torch.bfloat16)
            try:
                if name.startswith("extra-k"):
                    fn, want = extra_k(x, w, out, int(name.rsplit("-s", 1)[1]))
                else:
                    fn, want = variant(name, x, w, out), ref
                fn()
                torch.cuda.synchronize()
            except Exception as exc:  # a shape that does not compile is a row, not the end of the run
                print(f"{dims} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                continue
            err = rel(out, want)
            if err > 1e-2:
                print(f"{dims} {name}: relative error {err:.2e}, left out", flush=True)
                continue
            fns[name] = fn
        times: dict[str, list[float]] = {n: [] for n in fns}
        names = list(fns)
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n].append(graph_us(fns[n]))
        med = {n: statistics.median(t) for n, t in times.items()}
        flops = 2 * T * d_in * d_out
        print(f"\n{dims} (T = {T}), median of {args.rounds} rounds:")
        print(f"{'variant':<24} {'us':>8} {'TFLOP/s':>8} {'÷ cuBLAS':>9}")
        for n in names:
            print(f"{n:<24} {med[n]:8.1f} {flops / med[n] / 1e6:8.1f} {med[n] / med['cublas']:9.3f}")
            results.append({"dims": dims, "variant": n, "us": med[n], "rounds_us": times[n]})
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "T": T, "tile": [BM, BN, BK, GROUP_M], "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
