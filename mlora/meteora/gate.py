"""Top-k routing and the gate's auxiliary loss.

Every adapted linear has a bias-free gate G [K, d_in]. A token x picks the k adapters
with the largest logits x·Gᵀ and weighs them by a softmax over those k logits (divided
by a temperature). The gate learns from two signals: the LM loss, through the softmax
weights of the chosen adapters, and the auxiliary cross-entropy of all K logits against
the token's task index, which MeteoRA weighs by 50.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

IGNORE = -100
DEFAULT_COEF = 50.0  # MeteoRA's released training code


def route(x: Tensor, gate_weight: Tensor, top_k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """logits [T, K] (fp32), idx [T, k] int64, weights [T, k] (fp32) for x [T, d_in].

    The gate may be an fp32 master weight under a bf16 x: the product runs in x's dtype
    (no fp32 copy of x) and the logits are returned in fp32, where the softmax and the
    auxiliary loss are taken. Gradients reach x and the gate through the logits and
    the weights; the choice itself (idx) is not differentiable.
    """
    if x.dim() != 2 or gate_weight.dim() != 2 or x.shape[1] != gate_weight.shape[1]:
        raise ValueError(f"route takes x [T, d_in] and gate [K, d_in], got {tuple(x.shape)} and {tuple(gate_weight.shape)}")
    n_adapters = gate_weight.shape[0]
    if not 1 <= top_k <= n_adapters:
        raise ValueError(f"top_k={top_k} must be in 1..{n_adapters} (the number of adapters)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = torch.nn.functional.linear(x, gate_weight.to(x.dtype)).float()
    top, idx = logits.topk(top_k, dim=-1)
    weights = torch.softmax(top / temperature, dim=-1)
    return logits, idx, weights


def gate_loss(logits: Tensor, task: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of logits [T, K] against task [T] (-100: no target), and the count.

    Returned unnormalised so that a trainer can average over a job's whole step (all
    micro-batches, all linears) the way it averages the LM loss. The count is a tensor
    so that no device sync is forced.
    """
    if logits.shape[0] != task.shape[0]:
        raise ValueError(f"gate_loss: {logits.shape[0]} logits rows but {task.shape[0]} task labels")
    task = task.to(device=logits.device, dtype=torch.long)
    total = torch.nn.functional.cross_entropy(logits.float(), task, ignore_index=IGNORE, reduction="sum")
    return total, (task != IGNORE).sum()


def aux_loss(logits: Sequence[Tensor], task: Tensor, coef: float = DEFAULT_COEF) -> Tensor:
    """coef × the mean cross-entropy over every gate (list of [T, K]) and every labelled token."""
    if not logits:
        raise ValueError("aux_loss needs the gate logits of at least one linear")
    total = torch.zeros((), device=logits[0].device)
    count = torch.zeros((), device=logits[0].device, dtype=torch.long)
    for one in logits:
        s, c = gate_loss(one, task)
        total, count = total + s, count + c
    return coef * total / count.clamp(min=1)


def task_labels(tasks: Sequence[int] | Tensor, lengths: Sequence[int] | Tensor, seq_len: int) -> Tensor:
    """Per-token task labels [rows·seq_len] for right-padded rows: each row's task on its
    first `length` tokens (prompt and response alike, as MeteoRA trains), -100 on pads."""
    tasks_t = torch.as_tensor(tasks, dtype=torch.long)
    lengths_t = torch.as_tensor(lengths, dtype=torch.long)
    if tasks_t.shape != lengths_t.shape or tasks_t.dim() != 1:
        raise ValueError("task_labels takes one task and one length per row")
    if bool((lengths_t > seq_len).any()):
        raise ValueError(f"a row is longer than seq_len={seq_len}")
    real = torch.arange(seq_len)[None, :] < lengths_t[:, None]
    return torch.where(real, tasks_t[:, None], torch.full_like(real, IGNORE, dtype=torch.long)).reshape(-1)


def token_task_labels(rows: Sequence[Sequence[int]], seq_len: int) -> Tensor:
    """Per-token task labels [rows·seq_len] for right-padded rows given each real token's
    task (a row may hold several tasks in a row); -100 on pads and untagged tokens."""
    out = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    for r, tasks in enumerate(rows):
        if len(tasks) > seq_len:
            raise ValueError(f"a row of {len(tasks)} tokens is longer than seq_len={seq_len}")
        if tasks:
            row = torch.tensor(list(tasks), dtype=torch.long)
            out[r, : len(tasks)] = torch.where(row >= 0, row, torch.full_like(row, IGNORE))
    return out.reshape(-1)


def gate_step_terms(logits: Sequence[Tensor], task: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and summed top-1 hits of every gate over a micro-batch.

    For a trainer that averages over a job's whole step: both are divided by
    (gated linears × the step's labelled tokens), known on the host.
    """
    if not logits:
        raise ValueError("gate_step_terms needs the gate logits of at least one linear")
    task = task.to(device=logits[0].device, dtype=torch.long)
    keep = task != IGNORE
    ce = torch.zeros((), device=logits[0].device)
    hits = torch.zeros((), device=logits[0].device)
    for one in logits:
        ce = ce + torch.nn.functional.cross_entropy(one.float(), task, ignore_index=IGNORE, reduction="sum")
        hits = hits + ((one.detach().argmax(-1) == task) & keep).sum()
    return ce, hits
