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
    """What the pipeline planner needs of a job: per step, per micro-batch (rows, max_len).

    A job with held-out rows is evaluated after each step count in `eval_after` (counted
    from the run's start, as `first_step` is): its `eval_chunks` (rows, max_len), forward
    only, between that step's optimizer update and the next step's rows; `first_step`
    in `eval_after` evaluates the weights it starts from (a resumed job).
    """

    job: str
    steps: tuple[tuple[tuple[int, int], ...], ...]
    tokens: tuple[tuple[int, ...], ...]  # real tokens of each micro-batch, same shape
    first_step: int = 0  # the job's step number of steps[0] (after a resume)
    eval_chunks: tuple[tuple[int, int], ...] = ()
    eval_tokens: tuple[int, ...] = ()  # real tokens of each eval chunk
    eval_after: frozenset[int] = frozenset()


@dataclass
class _Slot:
    """A running job's place: the next step and micro-batch, and an evaluation due before them."""

    job: JobPlanSizes
    step: int = 0
    micro: int = 0
    eval_at: int | None = None

    @property
    def done(self) -> bool:
        return self.step == len(self.job.steps) and self.eval_at is None

    def eval_pieces(self) -> list[tuple[JobSlice, int, int]]:
        """The due evaluation's chunks, in order (and no evaluation due after this)."""
        at, job = self.eval_at, self.job
        assert at is not None
        self.eval_at = None
        n = len(job.eval_chunks)
        return [(JobSlice(job.job, at, i, i == n - 1, rows, job.eval_tokens[i], eval=True), rows, max_len)
                for i, (rows, max_len) in enumerate(job.eval_chunks)]

    def train_piece(self) -> tuple[JobSlice, int, int]:
        """The next training micro-batch's slice; moves on, noting an evaluation due after it."""
        job, step, micro = self.job, self.step, self.micro
        n_rows, max_len = job.steps[step][micro]
        last = micro == len(job.steps[step]) - 1
        piece = (JobSlice(job.job, job.first_step + step, micro, last, n_rows, job.tokens[step][micro]), n_rows, max_len)
        self.step, self.micro = (step + 1, 0) if last else (step, micro + 1)
        if last and job.first_step + self.step in job.eval_after and job.eval_chunks:
            self.eval_at = job.first_step + self.step
        return piece


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
    when it would pad short rows to far longer ones (`_cut_group`). An evaluation due
    in a job's turn goes first, whole, as evaluation micro-batches (chunk i of every
    job of the group evaluating now, cut the same way), then the job's next rows.
    Micro-batches are numbered from `first_index` (a later phase of the same run).
    """
    if n_groups < 1 or max_concurrent < 1:
        raise ValueError("n_groups and max_concurrent must be at least 1")
    queue = list(jobs)
    slots: list[_Slot | None] = [None] * max_concurrent
    out: list[MicroBatch] = []

    def refill() -> None:
        for s in range(max_concurrent):
            if slots[s] is None and queue:
                job = queue.pop(0)  # evaluated first when due at its first step (a resumed job)
                first_eval = job.first_step if job.first_step in job.eval_after and job.eval_chunks else None
                slots[s] = _Slot(job, eval_at=first_eval)

    def emit(pieces: list[tuple[JobSlice, int, int]]) -> None:
        for cut in _cut_group(pieces, max_tokens):
            out.append(MicroBatch(first_index + len(out), tuple(cut)))

    refill()
    while any(slots):
        for g in range(n_groups):
            evals: list[list[tuple[JobSlice, int, int]]] = []
            pieces: list[tuple[JobSlice, int, int]] = []  # (slice, rows, longest row)
            for s in range(g, max_concurrent, n_groups):
                slot = slots[s]
                if slot is None:
                    continue
                if slot.eval_at is not None:
                    evals.append(slot.eval_pieces())
                if slot.step < len(slot.job.steps):
                    pieces.append(slot.train_piece())
                if slot.done:
                    slots[s] = None
            for i in range(max((len(e) for e in evals), default=0)):
                emit([e[i] for e in evals if i < len(e)])
            emit(pieces)
        refill()
    return out
