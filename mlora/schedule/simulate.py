"""Timing a schedule under a cost model: makespan, per-stage busy time, bubble, a timeline.

Used to compare schedules before running them (and, in trace.py's form, against
measured runs). Sends are asynchronous and free for the sender; a receive completes
`send_latency` after its send, and a stage waits there if the data is not yet in.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Sequence

from mlora.schedule.actions import ActionKind, Schedule
from mlora.schedule.microbatch import MicroBatch
from mlora.schedule.trace import BUSY_KINDS, TraceEvent, action_event
from mlora.schedule.validate import channel_of, execution_order


@dataclass(frozen=True)
class StageCosts:
    """Cost of each action, per stage (a tuple) or the same on every stage (a float).

    With `per_token` the forward/backward costs are per token of the micro-batch, else per
    micro-batch. The default (1 forward, 2 backward, per micro-batch) is the usual
    backward ≈ 2 × forward rule with equal stages.
    """

    forward: float | tuple[float, ...] = 1.0
    backward: float | tuple[float, ...] = 2.0
    per_token: bool = False
    send_latency: float = 0.0
    optimizer: float = 0.0

    def _at(self, value: float | tuple[float, ...], stage: int, what: str) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        if stage >= len(value):
            raise ValueError(f"StageCosts.{what} has {len(value)} entries, no cost for stage {stage}")
        return float(value[stage])

    def forward_cost(self, stage: int, mb: MicroBatch) -> float:
        return self._at(self.forward, stage, "forward") * (mb.tokens if self.per_token else 1)

    def backward_cost(self, stage: int, mb: MicroBatch) -> float:
        return self._at(self.backward, stage, "backward") * (mb.tokens if self.per_token else 1)

    @staticmethod
    def proportional(stage_weights: Sequence[float], *, backward_ratio: float = 2.0, per_token: bool = True) -> "StageCosts":
        """Costs from relative stage weights (e.g. `partition.Split.costs`), normalised to mean 1."""
        mean = sum(stage_weights) / len(stage_weights)
        fwd = tuple(w / mean for w in stage_weights)
        return StageCosts(fwd, tuple(backward_ratio * f for f in fwd), per_token=per_token)


@dataclass(frozen=True)
class SimResult:
    """Simulated timeline: one event per action (receives span their wait), times from 0."""

    n_stages: int
    events: tuple[TraceEvent, ...]
    busy: tuple[float, ...]
    makespan: float

    @property
    def idle(self) -> tuple[float, ...]:
        """Per stage, time in [0, makespan] not spent in F/B/STEP."""
        return tuple(self.makespan - b for b in self.busy)

    @property
    def bubble_fraction(self) -> float:
        """Idle stage-time over P × makespan."""
        total = self.n_stages * self.makespan
        return sum(self.idle) / total if total > 0 else 0.0


def gpipe_bubble(n_stages: int, n_micro: int) -> float:
    """GPipe / flush-per-step bubble fraction (P-1)/(m+P-1), the baseline mLoRA removes."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


def simulate(schedule: Schedule, costs: StageCosts | None = None) -> SimResult:
    """Run the action lists under `costs`: each stage in its own order, a receive waiting for its send.

    Actions are replayed in a deadlock-free global order (raising ScheduleError if there
    is none); each stage's clock advances by its own costs, so the order only decides who
    waits for whom, not the times.
    """
    costs = costs or StageCosts()
    p = schedule.n_stages
    by_index = {m.index: m for m in schedule.micro_batches}
    clock = [0.0] * p
    busy = [0.0] * p
    in_flight: dict[tuple[int, int, str], deque[float]] = defaultdict(deque)
    events: list[TraceEvent] = []
    for k, i in execution_order(schedule):
        a = schedule.stages[k][i]
        mb = by_index.get(a.mb) if a.mb is not None else None
        start = end = clock[k]
        if a.kind is ActionKind.FORWARD:
            end = start + costs.forward_cost(k, mb)  # type: ignore[arg-type]
        elif a.kind is ActionKind.BACKWARD:
            end = start + costs.backward_cost(k, mb)  # type: ignore[arg-type]
        elif a.kind is ActionKind.OPTIMIZER_STEP:
            end = start + costs.optimizer
        elif a.kind in (ActionKind.SEND_ACT, ActionKind.SEND_GRAD):
            in_flight[channel_of(a)].append(start + costs.send_latency)
        else:
            end = max(start, in_flight[channel_of(a)].popleft())
        clock[k] = end
        if a.kind.value in BUSY_KINDS:
            busy[k] += end - start
        events.append(action_event(a, start, end, mb))
    return SimResult(p, tuple(events), tuple(busy), max(clock, default=0.0))


def render_ascii(sim: SimResult, *, cols_per_unit: int = 3, label: str = "mb") -> str:
    """A per-stage timeline, one text row per stage.

    Each compute action is drawn `cols_per_unit` columns per cost unit: forwards as
    `F<label>` padded with spaces, backwards as `B<label>` padded with `=`, optimizer
    steps (when they cost time) as `S`; idle columns are `.`. `label="job"` labels
    with job names instead of micro-batch indices.
    """
    width = max(1, round(sim.makespan * cols_per_unit))
    rows = []
    for k in range(sim.n_stages):
        line = ["."] * width
        for e in sim.events:
            if e.stage != k or e.kind not in BUSY_KINDS:
                continue
            lo, hi = round(e.start_s * cols_per_unit), round(e.end_s * cols_per_unit)
            if hi <= lo:
                continue
            if e.kind == ActionKind.OPTIMIZER_STEP.value:
                text, fill = "S", "S"
            else:
                tag = ",".join(e.jobs) if label == "job" else str(e.mb)
                text, fill = e.kind + tag, (" " if e.kind == ActionKind.FORWARD.value else "=")
            cell = (text + fill * (hi - lo))[: hi - lo]
            line[lo:hi] = list(cell)
        rows.append(f"stage {k} |" + "".join(line) + "|")
    axis = [" "] * width
    step = 10
    for t in range(0, int(sim.makespan) + 1, step):
        col = t * cols_per_unit
        for j, ch in enumerate(str(t)):
            if col + j < width:
                axis[col + j] = ch
    rows.append(f"{'t':<9}" + "".join(axis).rstrip())
    busy = " ".join(f"{b:g}" for b in sim.busy)
    rows.append(f"makespan {sim.makespan:g}, busy per stage [{busy}], bubble {sim.bubble_fraction:.1%}")
    return "\n".join(rows)
