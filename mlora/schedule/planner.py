"""Which jobs' next micro-batches go together into one fused batch (one process).

Pure: it sees only each job's pending micro-batch size, never tensors. Jobs are taken
in rotating order so that, when the token budget cannot hold all of them, no job waits
more than a turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mlora.schedule.microbatch import JobSlice, MicroBatch


@dataclass(frozen=True)
class Candidate:
    """A job's pending micro-batch: how many rows, and its longest row."""

    job: str
    rows: int
    max_len: int


def plan_fused_batch(candidates: Sequence[Candidate], max_tokens: int, turn: int = 0) -> list[int]:
    """Indices of the candidates to fuse: rows × padded length stays within max_tokens.

    Starts at candidate `turn % n`; the first one is always taken, even if it alone
    exceeds the budget (a micro-batch is never split: that would change the job).
    """
    n = len(candidates)
    if n == 0:
        return []
    chosen: list[int] = []
    rows, length = 0, 0
    for k in range(n):
        i = (turn + k) % n
        c = candidates[i]
        new_rows, new_len = rows + c.rows, max(length, c.max_len)
        if chosen and new_rows * new_len > max_tokens:
            continue
        chosen.append(i)
        rows, length = new_rows, new_len
    return sorted(chosen)


@dataclass(frozen=True)
class JobPlanSizes:
    """What the pipeline planner needs of a job: per step, per micro-batch (rows, max_len)."""

    job: str
    steps: tuple[tuple[tuple[int, int], ...], ...]
    tokens: tuple[tuple[int, ...], ...]  # real tokens of each micro-batch, same shape
    first_step: int = 0  # the job's step number of steps[0] (after a resume)


def plan_pipeline(
    jobs: Sequence[JobPlanSizes], n_groups: int, max_concurrent: int, max_tokens: int, first_index: int = 0
) -> list[MicroBatch]:
    """The whole run as pipeline micro-batches, each holding the next micro-batch of
    every running job of one group.

    Jobs run in `n_groups` groups (concurrency slot modulo n_groups) so that several
    micro-batches of *different* jobs are in flight at once: a job's next step cannot
    enter the pipeline before its current step's optimizer update, but another group's
    can. Queued jobs take the slot of a finished one, as in the single-process trainer.
    A group's micro-batch is split when its padded size would pass `max_tokens`.
    Micro-batches are numbered from `first_index` (a later phase of the same run).
    """
    if n_groups < 1 or max_concurrent < 1:
        raise ValueError("n_groups and max_concurrent must be at least 1")
    queue = list(jobs)
    slots: list[tuple[JobPlanSizes, list[int]] | None] = [None] * max_concurrent  # (job, [step, micro])
    out: list[MicroBatch] = []

    def refill() -> None:
        for s in range(max_concurrent):
            if slots[s] is None and queue:
                slots[s] = (queue.pop(0), [0, 0])

    refill()
    while any(slots):
        for g in range(n_groups):
            pending: list[JobSlice] = []
            rows = length = 0
            for s in range(g, max_concurrent, n_groups):
                entry = slots[s]
                if entry is None:
                    continue
                job, pos = entry
                step, micro = pos
                n_rows, max_len = job.steps[step][micro]
                last = micro == len(job.steps[step]) - 1
                piece = JobSlice(job.job, job.first_step + step, micro, last, n_rows, job.tokens[step][micro])
                if pending and (rows + n_rows) * max(length, max_len) > max_tokens:
                    out.append(MicroBatch(first_index + len(out), tuple(pending)))
                    pending, rows, length = [], 0, 0
                pending.append(piece)
                rows, length = rows + n_rows, max(length, max_len)
                if last:
                    pos[0], pos[1] = step + 1, 0
                else:
                    pos[1] = micro + 1
                if pos[0] == len(job.steps):
                    slots[s] = None
            if pending:
                out.append(MicroBatch(first_index + len(out), tuple(pending)))
        refill()
    return out
