"""A small single-job MeteoRA trainer over a plain transformers model (CPU demos, tests).

The fused multi-job trainer drives MeteoRA jobs through MultiLoraLinear; this one runs
one MeteoRA adapter alone through forward hooks, with the same loss: the LM loss (mean
over the batch's target tokens) plus coef × the mean cross-entropy of every gate's
logits against each real token's task index.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mlora.data.templates import render
from mlora.data.tokenize import IGNORE, Example, tokenize_pieces
from mlora.meteora.adapter import MeteoraAdapter
from mlora.meteora.gate import DEFAULT_COEF, aux_loss, task_labels
from mlora.meteora.generate import attach


@dataclass(frozen=True)
class StepLog:
    step: int
    lm_loss: float
    gate_loss: float  # the mean cross-entropy, before coef
    route_acc: float  # fraction of labelled tokens whose top-1 adapter is their task's, over all linears


def examples(tokenizer: Any, records: Sequence[dict], template: str = "plain", cutoff_len: int = 64) -> list[Example]:
    """Tokenised records (with their task index), as the trainer's data module makes them."""
    out = []
    for record in records:
        ex = tokenize_pieces(tokenizer, render(record, template), cutoff_len, task=int(record.get("task", -1)))
        if ex is not None:
            out.append(ex)
    return out


def collate(batch: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded input ids, shifted-by-the-model labels, and per-token task labels [rows·L]."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in batch])
    labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in batch])
    tasks = task_labels([e.task for e in batch], [len(e.input_ids) for e in batch], width)
    return ids, labels, tasks


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over labelled positions."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def routing_accuracy(logits: Sequence[Tensor], tasks: Tensor) -> float:
    keep = tasks != IGNORE
    hits = sum(int((one.argmax(-1)[keep] == tasks[keep]).sum()) for one in logits)
    return hits / max(1, int(keep.sum()) * len(logits))


def train_gates(
    model: nn.Module,
    tokenizer: Any,
    adapter: MeteoraAdapter,
    data: Sequence[Example],
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    coef: float = DEFAULT_COEF,
    seed: int = 0,
    log_every: int = 10,
) -> list[StepLog]:
    """AdamW on adapter.parameters() for `steps` steps over shuffled epochs of `data`."""
    params = adapter.parameters()
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    logs: list[StepLog] = []
    handles = attach(model, adapter)
    adapter.record_gate_logits = True
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for step in range(1, steps + 1):
            if len(order) < batch_size:
                fresh = list(range(len(data)))
                rng.shuffle(fresh)
                order += fresh
            batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
            ids, labels, tasks = collate(batch, pad)
            out = model(input_ids=ids)
            gates = adapter.take_gate_logits()
            lm = lm_loss(out.logits, labels)
            aux = aux_loss(gates, tasks, coef)
            optim.zero_grad(set_to_none=True)
            (lm + aux).backward()
            optim.step()
            if step % log_every == 0 or step == steps:
                logs.append(StepLog(step, lm.item(), aux.item() / coef, routing_accuracy([g.detach() for g in gates], tasks)))
    finally:
        for h in handles:
            h.remove()
        adapter.take_gate_logits()
    return logs
