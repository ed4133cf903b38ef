"""Kernel durations of the GEMM with its last wave cut, by launch, from the profiler."""
import sys, statistics
import torch
sys.path.insert(0, "tests"); sys.path.insert(0, ".")
from bench.ops.bench_ops import uneven_segments
from mlora.ops import triton_multi_lora as tm
from mlora.ops.kernels import fused_gemm as fg
from mlora.ops.kernels import shrink as sh
from mlora.ops.kernels.plan import segment_plan

dev = torch.device("cuda")
for T, K in ((8192, 4096), (768, 4096), (8192, 11008)):
    n = 4096
    segs = uneven_segments(T, 4, seed=4)
    plan = segment_plan(tuple(segs), (2.0,) * 4, (0.0,) * 4, (False,) * 4, (16,) * 4, T, dev, sh.block_m(16))
    x = torch.randn(T, K, device=dev).bfloat16()
    w = (torch.randn(n, K, device=dev) * K**-0.5).bfloat16()
    h = torch.randn(T, plan.rank_pad, device=dev).bfloat16()
    b_cat = (torch.randn(n, 64, device=dev) * 0.05).bfloat16()
    for progs in (0, 132):
        f = lambda: fg.fused_gemm(x, w, None, h, b_cat, x, plan, False, False, "tf32", split_programs=progs)
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                f()
            torch.cuda.synchronize()
        ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by = {}
        for e in ev:
            by.setdefault(e.name, []).append(e.device_time)
        tiles = (T // 128) * (n // 256)
        print(f"T={T} K={K} tiles={tiles} split={fg.tail_split(tiles, 132, K // 64) if progs else None}: "
              + ", ".join(f"{k} x{len(v)} median {statistics.median(v):.1f} us" for k, v in by.items()), flush=True)
