"""Next-token cross-entropy over the LM head's logits in their own dtype (Triton).

The loss as PyTorch runs it in a bf16 step first copies the logits to fp32 (for a
batch of 8,192 target tokens and a 32,000-word vocabulary: 0.5 GB read, 1 GB written),
log-softmaxes that copy into another fp32 tensor, and backward writes an fp32 gradient
(zeros, then the scatter, then the log-softmax's backward) before casting it to bf16:
~1.2 + 2.0 ms of a 7B step and ~3 GB at its peak (bench/README.md). Here one kernel
reads each row of logits once, in fp32 registers, and keeps its log-sum-exp; backward,
one kernel writes softmax − one-hot, times the row's loss gradient, over the logits
(which nothing else reads after the loss: the LM head is frozen and keeps no copy).
The math is the same (fp32 statistics, one rounding of the gradient to the logits'
dtype), so it agrees with `nn.functional.cross_entropy` on fp32 logits to fp32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without Triton use PyTorch's loss
    triton = None

BLOCK_V = 4096  # vocabulary columns a program holds at once


if triton is not None:

    @triton.jit
    def _ce_fwd(LOGITS, TOKEN, LOSS, LSE, stride, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride
        cols = tl.arange(0, BLOCK)
        # per-lane running max and sum; the max starts finite so that a lane past the
        # vocabulary (-inf) adds exp(-inf) = 0 instead of exp(-inf - -inf) = nan
        m = tl.full([BLOCK], -1e30, tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, x)
            s = s * tl.exp(m - new_m) + tl.exp(x - new_m)
            m = new_m
        top = tl.max(m, axis=0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
        token = tl.load(TOKEN + row)
        target = tl.load(base + token, mask=token < V, other=0.0).to(tl.float32)  # ids come from the embedding
        tl.store(LOSS + row, lse - target)
        tl.store(LSE + row, lse)

    @triton.jit
    def _ce_bwd(LOGITS, TOKEN, LSE, DLOSS, stride, V, BLOCK: tl.constexpr):
        """In place: logits become d loss / d logits."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride
        cols = tl.arange(0, BLOCK)
        lse = tl.load(LSE + row)
        g = tl.load(DLOSS + row)
        token = tl.load(TOKEN + row)
        for start in range(0, V, BLOCK):
            at = start + cols
            x = tl.load(base + at, mask=at < V, other=0.0).to(tl.float32)
            d = tl.exp(x - lse) * g - tl.where(at == token, g, 0.0)
            tl.store(base + at, d.to(LOGITS.dtype.element_ty), mask=at < V)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, token: Tensor) -> Tensor:  # type: ignore[override]
        rows, vocab = logits.shape
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows:
            block = min(BLOCK_V, triton.next_power_of_2(vocab))
            _ce_fwd[(rows,)](logits, token, loss, lse, logits.stride(0), vocab, BLOCK=block, num_warps=8)
        ctx.save_for_backward(logits, token, lse)
        return loss

    @staticmethod
    def backward(ctx, d_loss: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, token, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        if rows:
            _ce_bwd[(rows,)](logits, token, lse, d_loss.float().contiguous(), logits.stride(0), vocab,
                             BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8)
        return logits, None


def usable(logits: Tensor) -> bool:
    """Compiled kernels only: CUDA logits of a 2-D batch, Triton installed."""
    return triton is not None and logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1


def cross_entropy_rows(logits: Tensor, token: Tensor) -> Tensor:
    """Per-row −log softmax(logits)[token], fp32; `logits` [N, V] is overwritten by its
    gradient in the backward pass, so pass logits nothing else will read."""
    if logits.dim() != 2 or token.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_rows takes logits [N, V] and N tokens, got {tuple(logits.shape)} "
                         f"and {tuple(token.shape)}")
    if logits.stride(-1) != 1:
        raise ValueError("cross_entropy_rows needs logits with contiguous rows")
    return _CrossEntropy.apply(logits, token)
