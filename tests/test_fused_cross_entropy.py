"""The fused cross-entropy against PyTorch's on fp32 logits, loss and logits' gradient.

On the CPU the kernels run under Triton's interpreter at small odd vocabularies (one
longer than a program's block, so rows take several passes). With
MLORA_TRITON_COMPILED=1 on a CUDA machine they run compiled at a real vocabulary, plus
the per-job loss of `job_loss_sums` against PyTorch's path.
"""

from __future__ import annotations

import os

COMPILED = os.environ.get("MLORA_TRITON_COMPILED") == "1"
if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mlora.ops.fused_cross_entropy import BLOCK_V, cross_entropy_rows  # noqa: E402

from conftest import rel  # noqa: E402

DEVICE = torch.device("cuda" if COMPILED else "cpu")
SHAPES = [(4096, 32000), (333, 151936)] if COMPILED else [(7, 37), (3, BLOCK_V + 123)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if COMPILED else [torch.float32, torch.bfloat16]
if COMPILED and not torch.cuda.is_available():
    pytest.skip("MLORA_TRITON_COMPILED=1 needs a CUDA device", allow_module_level=True)



@pytest.mark.parametrize("rows, vocab", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_pytorch(rows, vocab, dtype):
    gen = torch.Generator().manual_seed(rows + vocab)
    logits0 = (torch.randn(rows, vocab, generator=gen) * 4).to(DEVICE, dtype)
    token = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    token[0] = vocab - 1  # the last column, in the last (partial) block
    d_loss = torch.rand(rows, generator=gen).to(DEVICE) + 0.5
    ref_in = logits0.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(ref_in.float(), token, reduction="none")
    want.backward(d_loss)
    leaf = logits0.clone().requires_grad_()
    logits = leaf * 1  # the function overwrites its input with the gradient: not a leaf
    got = cross_entropy_rows(logits, token)
    assert got.dtype == torch.float32 and got.shape == (rows,)
    assert rel(got, want) < 1e-5
    got.backward(d_loss)
    assert leaf.grad.dtype == dtype
    assert rel(leaf.grad, ref_in.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_no_rows_and_bad_shapes():
    empty = torch.zeros(0, 37, device=DEVICE, requires_grad=True)
    loss = cross_entropy_rows(empty * 1, torch.zeros(0, dtype=torch.long, device=DEVICE))
    loss.sum().backward()
    assert loss.shape == (0,) and empty.grad.shape == (0, 37)
    with pytest.raises(ValueError, match=r"logits \[N, V\] and N tokens"):
        cross_entropy_rows(torch.zeros(3, 5, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous rows"):
        cross_entropy_rows(torch.zeros(5, 3, device=DEVICE).t(), torch.zeros(3, dtype=torch.long, device=DEVICE))


@pytest.mark.skipif(not COMPILED, reason="job_loss_sums takes the fused loss only on CUDA")
def test_job_loss_sums_equals_pytorchs_loss():
    from mlora.model.loss import Targets, job_loss_sums

    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(256, 32000, bias=False).to(DEVICE, torch.bfloat16).requires_grad_(False)
    hidden0 = torch.randn(6, 64, 256, generator=gen).to(DEVICE, torch.bfloat16)
    labels = torch.randint(0, 32000, (6, 64), generator=gen)
    labels[:, :20] = -100
    targets = Targets.from_labels(labels, torch.tensor([0, 0, 1, 1, 1, 2]), 3).to(DEVICE)
    hidden = hidden0.clone().requires_grad_()
    got = job_loss_sums(head, hidden, targets)
    got.sum().backward()
    ref = hidden0.clone().requires_grad_()
    picked = ref.reshape(-1, 256).index_select(0, targets.index)
    losses = torch.nn.functional.cross_entropy(head(picked).float(), targets.token, reduction="none")
    want = torch.zeros(3, device=DEVICE).index_add_(0, targets.slot, losses)
    want.sum().backward()
    assert rel(got, want) < 1e-4
    assert rel(hidden.grad, ref.grad) < 1e-2
