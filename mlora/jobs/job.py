"""A job as the driver sees it: its data, its fixed plan of steps, and its progress.

The driver (rank 0 under pipelining) owns this; the stages own the adapter slices and
optimizers (JobOptimizer). Progress is counted in optimizer steps and micro-batches of
the job's own plan, so it means the same alone, fused with others, or pipelined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from mlora.config import JobSpec
from mlora.jobs.plan import StepPlan


@dataclass(frozen=True)
class PendingMicro:
    """The next micro-batch a job wants to run."""

    job: str
    step: int
    micro: int
    last: bool  # completes the step
    examples: tuple[int, ...]


def target_count(labels: Sequence[int]) -> int:
    """Tokens that are predicted with a loss: labels[1:] that are not -100."""
    return sum(1 for t in labels[1:] if t != -100)


@dataclass
class JobState:
    """Driver-side job: spec, examples, plan and progress counters."""

    spec: JobSpec
    train: list[Any]  # data.Example: input_ids, labels
    eval: list[Any]
    steps: list[StepPlan]
    step: int = 0  # optimizer steps completed
    micro: int = 0  # micro-batches done within the current step
    status: str = "queued"  # queued, running, writing (its adapter going to disk), finished
    tokens: int = 0  # input tokens processed (cumulative)
    loss_sum: float = 0.0  # loss summed over the current step's micro-batches
    gate_sums: dict[str, Any] = field(default_factory=dict)  # MeteoRA: gate loss / routing hits of the step
    gate_count: int = 0  # MeteoRA: gated linears in the whole model
    losses: list[float] = field(default_factory=list)
    resume_slice: dict[str, Any] | None = None  # checkpointed optimizer state to load at start
    data_note: str = ""  # what cutoff_len dropped or cut from its data ("" when nothing)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def max_steps(self) -> int:
        return len(self.steps)

    @property
    def done(self) -> bool:
        return self.step >= len(self.steps)

    def pending(self) -> PendingMicro:
        plan = self.steps[self.step]
        return PendingMicro(
            job=self.name,
            step=self.step,
            micro=self.micro,
            last=self.micro == len(plan.micro_batches) - 1,
            examples=plan.micro_batches[self.micro],
        )

    def evaluates_after(self, steps_done: int) -> bool:
        """Whether the job is evaluated once `steps_done` optimizer steps are done: every
        `eval_steps` steps and after the last, when it holds examples out."""
        every = self.spec.eval_steps
        return bool(self.eval) and ((every is not None and steps_done % every == 0) or steps_done == len(self.steps))

    def eval_batches(self) -> list[list[Any]]:
        """The held-out examples in evaluation batches of `micro_batch_size`, in order."""
        size = self.spec.micro_batch_size
        return [self.eval[start : start + size] for start in range(0, len(self.eval), size)]

    def eval_targets(self) -> int:
        """Target tokens over all held-out examples: the evaluation loss's denominator."""
        return sum(target_count(e.labels) for e in self.eval)

    def step_targets(self, step: int) -> int:
        """Target tokens in the whole of step `step`: the loss denominator of every micro-batch."""
        return sum(target_count(self.train[i].labels) for mb in self.steps[step].micro_batches for i in mb)

    def step_tokens(self, step: int) -> int:
        """Real input tokens in the whole of step `step`: a MeteoRA gate loss's denominator."""
        return sum(len(self.train[i].input_ids) for mb in self.steps[step].micro_batches for i in mb)

    def micro_done(self, tokens: int) -> bool:
        """Record a finished micro-batch; True when it completed the step."""
        self.tokens += tokens
        self.micro += 1
        if self.micro == len(self.steps[self.step].micro_batches):
            self.micro = 0
            self.step += 1
            return True
        return False
