"""Torch's SDPA backends at the e2e benchmark's attention shapes, one GPU.

The 7B shape (16 rows × 512 tokens, 32 heads of 128) and the 1.1B shape (32 query heads of
64, 4 KV heads), bf16, causal: forward and forward + backward median ms (CUDA events,
30 runs after 5 warm-ups) for the backend torch picks and for each backend forced, with
the relative error of the output and dq against torch's pick. It answers whether the
trainer's attention (Hugging Face's "sdpa", torch's choice) leaves time on the table.

    PYTHONPATH=. python3 bench/e2e/sdpa_backends.py
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"7b": (16, 32, 32, 512, 128), "1.1b": (16, 32, 4, 512, 64)}  # rows, heads, KV heads, tokens, head dim
LAYERS = {"7b": 32, "1.1b": 22}


def median_ms(fn: Callable[[], object], runs: int = 30) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    print(f"{'shape':5s} {'backend':22s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'× layers ms':>12s} {'err out':>8s} {'err dq':>8s}")
    for name, (rows, heads, kv, tokens, dim) in SHAPES.items():
        q, k, v = (torch.randn(rows, h, tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for h in (heads, kv, kv))
        grad = torch.randn(rows, heads, tokens, dim, device="cuda", dtype=torch.bfloat16)
        ref = None
        for backend in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            label = "torch's pick" if backend is None else backend.name.lower()

            def forward() -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != heads)

            def both() -> None:
                forward().backward(grad)

            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    out = forward()
                    out.backward(grad)
                    dq = q.grad.clone()
                    q.grad = k.grad = v.grad = None
                    fwd, fwd_bwd = median_ms(forward), median_ms(both)
                    q.grad = k.grad = v.grad = None
            except RuntimeError as exc:
                print(f"{name:5s} {label:22s} not available: {str(exc)[:80]}")
                continue
            ref = ref or (out.detach(), dq)
            print(f"{name:5s} {label:22s} {fwd:8.3f} {fwd_bwd:11.3f} {fwd_bwd * LAYERS[name]:12.2f} "
                  f"{rel(out, ref[0]):8.1e} {rel(dq, ref[1]):8.1e}")


if __name__ == "__main__":
    main()
