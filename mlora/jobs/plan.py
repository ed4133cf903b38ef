"""A job's whole sequence of optimizer steps, fixed before training starts.

Which examples each micro-batch holds depends only on the job (its data, seed, batch
sizes), never on the other jobs: that is what lets a job train with others exactly as
it would alone, and what makes resuming a matter of remembering a step number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: its epoch and the example indices of each micro-batch."""

    epoch: int
    micro_batches: tuple[tuple[int, ...], ...]


def plan_steps(
    n_train: int,
    micro_batch_size: int,
    grad_accum: int,
    num_epochs: int,
    max_steps: int | None,
    epoch_order: Callable[[int], Sequence[int]],
    lengths: Sequence[int] | None = None,
) -> list[StepPlan]:
    """Cut each epoch's order into micro-batches and those into steps.

    An epoch's last micro-batch may be short and its last step may hold fewer than
    `grad_accum` micro-batches (as in HF Trainer). With `max_steps`, epochs repeat
    until that many steps exist, and the list is cut there.

    With `lengths` (tokens per example), a step's examples are ordered by length
    before they are cut into its micro-batches, so rows of like length share a
    micro-batch and little is padded. The step's examples, hence its gradient (a
    mean over all of them), do not change.
    """
    if n_train < 1:
        raise ValueError("a job needs at least one training example")
    steps: list[StepPlan] = []
    epoch = 0
    while True:
        if max_steps is None and epoch >= num_epochs:
            break
        order = list(epoch_order(epoch))
        micro = [tuple(order[i : i + micro_batch_size]) for i in range(0, len(order), micro_batch_size)]
        for i in range(0, len(micro), grad_accum):
            group = micro[i : i + grad_accum]
            if lengths is not None and len(group) > 1:
                group = _by_length(group, lengths)
            steps.append(StepPlan(epoch, tuple(group)))
            if max_steps is not None and len(steps) >= max_steps:
                return steps
        epoch += 1
    return steps


def _by_length(micro: list[tuple[int, ...]], lengths: Sequence[int]) -> list[tuple[int, ...]]:
    """The same examples and micro-batch sizes, rows ordered by length (stable)."""
    flat = sorted((i for mb in micro for i in mb), key=lambda i: lengths[i])
    out, start = [], 0
    for mb in micro:
        out.append(tuple(flat[start : start + len(mb)]))
        start += len(mb)
    return out
