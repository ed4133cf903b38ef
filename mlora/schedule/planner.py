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


def split_by_length(candidates: Sequence[Candidate], chosen: Sequence[int], slack: float = 0.25) -> list[list[int]]:
    """Cut a fused batch into passes of like-length rows when one pass would pad too much.

    One pass pads every row to the longest of all jobs: a job of 40-token rows fused
    with one of 500-token rows would compute 12× its own tokens. Candidates are taken
    shortest first; the next one joins the current pass while the pass's padded size
    stays within (1 + slack) × the sum of each micro-batch's own padded size. Several
    passes cost launches, so jobs of like lengths stay in one.
    """
    order = sorted(chosen, key=lambda i: (candidates[i].max_len, i))
    passes: list[list[int]] = []
    rows = length = own = 0
    for i in order:
        c = candidates[i]
        if passes and (rows + c.rows) * max(length, c.max_len) <= (1 + slack) * (own + c.rows * c.max_len):
            passes[-1].append(i)
            rows, length, own = rows + c.rows, max(length, c.max_len), own + c.rows * c.max_len
        else:
            passes.append([i])
            rows, length, own = c.rows, c.max_len, c.rows * c.max_len
    return [sorted(p) for p in passes]


def _cut_group(pieces: list[tuple[JobSlice, int, int]], max_tokens: int, slack: float = 0.25) -> list[list[JobSlice]]:
    """A group's slices as pipeline micro-batches: shortest rows first, a new micro-batch
    when the padded size would pass the budget or pad more than `slack` (split_by_length)."""
    out: list[list[JobSlice]] = []
    rows = length = own = 0
    for piece, n_rows, max_len in sorted(pieces, key=lambda p: p[2]):
        new_rows, new_len, new_own = rows + n_rows, max(length, max_len), own + n_rows * max_len
        if out and new_rows * new_len <= max_tokens and new_rows * new_len <= (1 + slack) * new_own:
            out[-1].append(piece)
            rows, length, own = new_rows, new_len, new_own
        else:
            out.append([piece])
            rows, length, own = n_rows, max_len, n_rows * max_len
    return out


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
    A group's micro-batch is split when its padded size would pass `max_tokens` or
    when it would pad short rows to far longer ones (`_cut_group`).
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
            pieces: list[tuple[JobSlice, int, int]] = []  # (slice, rows, longest row)
            for s in range(g, max_concurrent, n_groups):
                entry = slots[s]
                if entry is None:
                    continue
                job, pos = entry
                step, micro = pos
                n_rows, max_len = job.steps[step][micro]
                last = micro == len(job.steps[step]) - 1
                pieces.append((JobSlice(job.job, job.first_step + step, micro, last, n_rows, job.tokens[step][micro]), n_rows, max_len))
                if last:
                    pos[0], pos[1] = step + 1, 0
                else:
                    pos[1] = micro + 1
                if pos[0] == len(job.steps):
                    slots[s] = None
            for cut in _cut_group(pieces, max_tokens):
                out.append(MicroBatch(first_index + len(out), tuple(cut)))
        refill()
    return out
