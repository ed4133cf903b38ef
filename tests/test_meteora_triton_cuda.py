"""The MeteoRA Triton kernels compiled on a real GPU, against the loop reference.

Runs the checks in a fresh process: another test module turns on Triton's interpreter
for the whole pytest process, and compiled kernels must be tested without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CASES = [
    # tokens, d_in, d_out, ranks, top_k, dtype
    (37, 45, 29, (3, 8, 5, 8, 1), 2, torch.float32),
    (19, 17, 23, (24, 2, 70, 16), 3, torch.float32),
    (1031, 512, 384, (8,) * 28, 2, torch.float32),
    (1031, 512, 384, (8,) * 28, 2, torch.bfloat16),
    (4099, 1024, 1024, (16,) * 6, 1, torch.bfloat16),
]


def check(tokens: int, d_in: int, d_out: int, ranks: tuple[int, ...], top_k: int, dtype: torch.dtype) -> None:
    from mlora.meteora.op import meteora_delta, reference_delta

    gen = torch.Generator().manual_seed(tokens)
    x0 = torch.randn(tokens, d_in, generator=gen)
    a0 = [torch.randn(r, d_in, generator=gen) / d_in**0.5 for r in ranks]
    b0 = [torch.randn(d_out, r, generator=gen) / r**0.5 for r in ranks]
    top, idx = torch.randn(tokens, len(ranks), generator=gen).topk(top_k, dim=-1)
    w0 = torch.softmax(top, dim=-1)
    dy0 = torch.randn(tokens, d_out, generator=gen)
    scales = [0.5 + 0.1 * i for i in range(len(ranks))]

    def run(backend: str, dt: torch.dtype) -> list[torch.Tensor]:
        x = x0.cuda().to(dt).requires_grad_()
        w = w0.cuda().requires_grad_()
        a = [t.cuda().requires_grad_() for t in a0]  # fp32 masters, cast inside
        b = [t.cuda().requires_grad_() for t in b0]
        fn = reference_delta if backend == "autograd" else meteora_delta
        y = fn(x, a, b, scales, idx.cuda(), w) if backend == "autograd" else fn(x, a, b, scales, idx.cuda(), w, backend=backend)
        y.backward(dy0.cuda().to(dt))
        ab = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (*a, *b)]
        return [t.detach().float().cpu() for t in (y, x.grad, w.grad, *ab)]

    want = run("autograd", torch.float32)
    got = run("triton", dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for i, (g, r) in enumerate(zip(got, want)):
        err = float((g - r).abs().max()) / max(1e-6, float(r.abs().max()))
        assert err < tol, f"case {tokens}x{d_in}->{d_out} {dtype}: tensor {i} relative error {err:.2e} > {tol}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_match_reference():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


if __name__ == "__main__":
    for case in CASES:
        check(*case)
        print("ok", case[:3], case[4], case[5])
