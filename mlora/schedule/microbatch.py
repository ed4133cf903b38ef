"""What a pipeline schedule moves around: micro-batches made of several jobs' rows.

These types carry only sizes and bookkeeping, never tensors, so that the planner, the
schedule builder, the validator and the simulator can all be pure functions over them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobSlice:
    """One job's rows inside a micro-batch.

    `step`/`micro`/`last` say where the rows sit in the job's gradient accumulation:
    the job's optimizer step `step` is complete once the slice with `last=True` has been
    backwarded, and only then may rows of `step + 1` use that job's weights.

    An `eval` slice holds held-out rows, forwarded only (no backward), on the weights
    after `step` optimizer steps: piece `micro` of that evaluation, `last` its final piece.
    """

    job: str
    step: int
    micro: int
    last: bool
    rows: int
    tokens: int
    eval: bool = False

    def __post_init__(self) -> None:
        if not self.job:
            raise ValueError("JobSlice.job must be a non-empty name")
        if self.step < 0 or self.micro < 0:
            raise ValueError(f"JobSlice {self.job}: step and micro must be >= 0, got {self.step}, {self.micro}")
        if self.rows < 0 or self.tokens < 0:
            raise ValueError(f"JobSlice {self.job}: rows and tokens must be >= 0, got {self.rows}, {self.tokens}")


@dataclass(frozen=True)
class MicroBatch:
    """The unit that travels through the pipeline stages: one forward and one backward each
    (an evaluation micro-batch: one forward only).

    A job appears at most once: two steps of the same job in one micro-batch would make
    the second step's rows run on weights the first step has not yet updated. Evaluation
    slices and training slices never share a micro-batch: one runs without autograd and
    dropout, the other with both.
    """

    index: int
    slices: tuple[JobSlice, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.slices, tuple):
            object.__setattr__(self, "slices", tuple(self.slices))
        if not self.slices:
            raise ValueError(f"MicroBatch {self.index} has no slices")
        names = [s.job for s in self.slices]
        if len(set(names)) != len(names):
            raise ValueError(f"MicroBatch {self.index} holds a job more than once: {names}")
        if len({s.eval for s in self.slices}) > 1:
            raise ValueError(f"MicroBatch {self.index} mixes evaluation and training slices")

    @property
    def is_eval(self) -> bool:
        """Held-out rows: forwarded on every stage, never backwarded."""
        return self.slices[0].eval

    @property
    def tokens(self) -> int:
        """Total tokens over all slices (what compute cost scales with)."""
        return sum(s.tokens for s in self.slices)

    @property
    def rows(self) -> int:
        """Total rows over all slices."""
        return sum(s.rows for s in self.slices)

    @property
    def jobs(self) -> tuple[str, ...]:
        """Job names in slice order."""
        return tuple(s.job for s in self.slices)

    def slice_of(self, job: str) -> JobSlice | None:
        """This micro-batch's slice of `job`, or None if the job has no rows here."""
        for s in self.slices:
            if s.job == job:
                return s
        return None


def round_robin_micro_batches(
    jobs: dict[str, tuple[int, int]], *, rows: int = 1, tokens: int = 128
) -> tuple[MicroBatch, ...]:
    """One job per micro-batch, jobs taken in turn: `jobs` maps name → (steps, grad_accum).

    The simplest planner there is, for tests, docs and schedule comparisons; real
    grouping (several jobs per micro-batch, token budgets) is the planner's job.
    """
    queues = {
        job: [JobSlice(job, step, micro, micro == accum - 1, rows, tokens) for step in range(steps) for micro in range(accum)]
        for job, (steps, accum) in jobs.items()
    }
    out: list[MicroBatch] = []
    while any(queues.values()):
        for q in queues.values():
            if q:
                out.append(MicroBatch(len(out), (q.pop(0),)))
    return tuple(out)
