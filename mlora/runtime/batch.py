"""Turning the chosen micro-batches into one right-padded tensor batch with its layout."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from mlora.jobs import PendingMicro
from mlora.meteora.gate import token_task_labels
from mlora.model.lora_linear import BatchLayout, JobRows
from mlora.model.loss import IGNORE, Targets


@dataclass
class FusedBatch:
    """Rows grouped by job, right-padded to the longest row."""

    input_ids: Tensor  # [B, L]
    targets: Targets  # where the loss is taken, and on which token
    loss_weights: Tensor  # [n micro-batches]: 1 / target tokens of the job's step
    layout: BatchLayout
    micros: list[PendingMicro]
    tokens: list[int]  # real (unpadded) input tokens per micro-batch
    task_labels: list[Tensor | None]  # MeteoRA micro-batches: each token's adapter index (-100 on pads)


def dropout_seed(seed: int, step: int, micro: int) -> int:
    """A seed per (job, step, micro-batch): the same alone, fused or after a resume."""
    return zlib.crc32(f"{seed}:{step}:{micro}".encode())


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple` (run.pad_to_multiple_of)."""
    return -(-length // multiple) * multiple


def make_layout(
    micros: Sequence[PendingMicro],
    lengths: Sequence[Sequence[int]],
    seeds: Sequence[int],
    training: bool = True,
    pad_to_multiple_of: int = 1,
) -> BatchLayout:
    """The row layout of a fused batch from row lengths alone (no tensors needed).

    Rounding the padded length up to a multiple makes batch shapes recur, so CUDA
    graphs (mlora/runtime/step_graphs.py) can replay them; right padding changes no
    real token's result.
    """
    seq_len = padded_length(max(max(ls) for ls in lengths), pad_to_multiple_of)
    jobs: list[JobRows] = []
    row = 0
    for m, ls, seed in zip(micros, lengths, seeds):
        jobs.append(JobRows(m.job, row, row + len(ls), max(ls), dropout_seed(seed, m.step, m.micro)))
        row += len(ls)
    return BatchLayout(rows=row, seq_len=seq_len, jobs=tuple(jobs), training=training)


def collate(
    micros: Sequence[PendingMicro],
    examples: Sequence[Sequence[Any]],
    seeds: Sequence[int],
    pad_id: int,
    device: torch.device,
    training: bool = True,
    loss_weights: Sequence[float] | None = None,
    with_tasks: Sequence[bool] | None = None,
    pad_to_multiple_of: int = 1,
) -> FusedBatch:
    """examples[k] are micro-batch k's Example objects (input_ids, labels).

    `with_tasks[k]` asks for micro-batch k's per-token task labels (a MeteoRA job's
    gate targets), laid out like the job's rows of the fused batch.

    Everything the step needs on the device is built here and copied from pinned
    memory without blocking: a copy from pageable memory would wait for the GPU.
    """
    lengths = [[len(e.input_ids) for e in exs] for exs in examples]
    layout = make_layout(micros, lengths, seeds, training, pad_to_multiple_of)
    ids = torch.full((layout.rows, layout.seq_len), pad_id, dtype=torch.long)
    labels = torch.full((layout.rows, layout.seq_len), IGNORE, dtype=torch.long)
    row_slot = torch.empty(layout.rows, dtype=torch.long)
    row = 0
    for k, exs in enumerate(examples):
        for e in exs:
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
            row_slot[row] = k
            row += 1
    targets = Targets.from_labels(labels, row_slot, len(micros))
    weights = torch.tensor(list(loss_weights) if loss_weights is not None else [1.0] * len(micros), dtype=torch.float32)
    tasks: list[Tensor | None] = []
    for k, exs in enumerate(examples):
        if with_tasks is not None and with_tasks[k]:
            tasks.append(token_task_labels([e.tasks() for e in exs], layout.seq_len))
        else:
            tasks.append(None)
    if device.type == "cuda":
        ids, targets, weights = ids.pin_memory(), targets.pin_memory(), weights.pin_memory()
        tasks = [t.pin_memory() if t is not None else None for t in tasks]
    return FusedBatch(
        input_ids=ids.to(device, non_blocking=True),
        targets=targets.to(device, non_blocking=True),
        loss_weights=weights.to(device, non_blocking=True),
        layout=layout,
        micros=list(micros),
        tokens=[sum(ls) for ls in lengths],
        task_labels=[t.to(device, non_blocking=True) if t is not None else None for t in tasks],
    )
