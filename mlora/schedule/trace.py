"""Timeline events and their Chrome-trace (Perfetto) form, for simulated and measured runs alike.

The simulator and the runtime record the same `TraceEvent`, so one viewer and one bubble
measure serve both, and a measured run can be laid next to its prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from mlora.schedule.actions import Action, ActionKind
from mlora.schedule.microbatch import MicroBatch

# Kinds that occupy the device; everything else (sends, receive waits) counts as idle.
BUSY_KINDS = frozenset({ActionKind.FORWARD.value, ActionKind.BACKWARD.value, ActionKind.OPTIMIZER_STEP.value})


@dataclass(frozen=True)
class TraceEvent:
    """One interval on one stage. `kind` is an ActionKind code ("F", "B", "STEP", "RECV_F", ...)
    or any other label the runtime wants on the timeline (it then counts as idle)."""

    stage: int
    name: str
    kind: str
    start_s: float
    end_s: float
    mb: int | None = None
    jobs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.kind, ActionKind):
            object.__setattr__(self, "kind", self.kind.value)
        object.__setattr__(self, "jobs", tuple(self.jobs))
        if self.end_s < self.start_s:
            raise ValueError(f"event {self.name!r} on stage {self.stage} ends before it starts")

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def event_name(action: Action, micro_batch: MicroBatch | None = None) -> str:
    """`F mb3 [jobA,jobB]`, `F mb4 [jobA] eval`, `SEND_F mb3`, `STEP jobA@2`: what a reader
    wants on the timeline."""
    if action.kind is ActionKind.OPTIMIZER_STEP:
        return f"STEP {action.job}@{action.step}"
    jobs = f" [{','.join(micro_batch.jobs)}]" if micro_batch is not None and action.kind.is_compute else ""
    held_out = " eval" if micro_batch is not None and micro_batch.is_eval and action.kind.is_compute else ""
    return f"{action.kind.value} mb{action.mb}{jobs}{held_out}"


def action_event(action: Action, start_s: float, end_s: float, micro_batch: MicroBatch | None = None) -> TraceEvent:
    """The event for one executed action (the runtime calls this with wall-clock times)."""
    jobs: tuple[str, ...] = (action.job,) if action.job is not None else ()
    if micro_batch is not None:
        jobs = micro_batch.jobs
    return TraceEvent(action.stage, event_name(action, micro_batch), action.kind.value, start_s, end_s, action.mb, jobs)


def to_chrome_trace(
    events: Iterable[TraceEvent],
    *,
    n_stages: int | None = None,
    time_scale: float = 1.0,
    process_name: str = "mlora pipeline",
) -> dict:
    """Chrome trace / Perfetto JSON: one track (tid) per stage, one "X" event per interval.

    `time_scale` converts event times to seconds (1.0 for measured runs; for simulated
    cost units pick what one unit should look like). Open in ui.perfetto.dev or chrome://tracing.
    """
    evs = sorted(events, key=lambda e: (e.stage, e.start_s, e.end_s))
    if n_stages is None:
        n_stages = max((e.stage for e in evs), default=-1) + 1
    out: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": process_name}}]
    for k in range(n_stages):
        out.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": k, "args": {"name": f"stage {k}"}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": k, "args": {"sort_index": k}})
    for e in evs:
        args: dict = {"kind": e.kind, "jobs": list(e.jobs)}
        if e.mb is not None:
            args["mb"] = e.mb
        out.append(
            {
                "name": e.name,
                "cat": e.kind,
                "ph": "X",
                "pid": 0,
                "tid": e.stage,
                "ts": e.start_s * time_scale * 1e6,
                "dur": e.duration_s * time_scale * 1e6,
                "args": args,
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def _union_length(intervals: Sequence[tuple[float, float]]) -> float:
    total, cur_lo, cur_hi = 0.0, None, None
    for lo, hi in sorted(intervals):
        if cur_hi is None or lo > cur_hi:
            if cur_hi is not None:
                total += cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    if cur_hi is not None:
        total += cur_hi - cur_lo
    return total


def bubble_from_events(events: Iterable[TraceEvent], n_stages: int, *, per_stage_window: bool = False) -> float:
    """Fraction of stage-time not spent in F/B/STEP: Σ idle / Σ window over the stages.

    The window is the whole run (first start to last end over all stages), which makes
    it equal to `SimResult.bubble_fraction` on simulated events. With `per_stage_window`
    each stage is measured from its own first start to its own last end, which leaves
    out start-up skew between processes (and the pipeline's warm-up/drain wait).
    Overlapping busy intervals on one stage count once.
    """
    evs = list(events)
    if not evs:
        return 0.0
    lo, hi = min(e.start_s for e in evs), max(e.end_s for e in evs)
    idle = window = 0.0
    for k in range(n_stages):
        mine = [e for e in evs if e.stage == k]
        if per_stage_window:
            if not mine:
                continue
            w = max(e.end_s for e in mine) - min(e.start_s for e in mine)
        else:
            w = hi - lo
        busy = _union_length([(e.start_s, e.end_s) for e in mine if e.kind in BUSY_KINDS])
        window += w
        idle += w - busy
    return idle / window if window > 0 else 0.0
