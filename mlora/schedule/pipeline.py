"""Building the mLoRA pipeline schedule: 1F1B with independent jobs interleaved and no flush.

Many LoRA jobs share one frozen base model, so a micro-batch of job A never waits for
job B's optimizer step: while A's step drains, B's micro-batches fill the pipeline.
The only ordering between micro-batches is per job: rows of a job's step s+1 may only
be forwarded on a stage once that stage has applied the job's step s.

The builder runs an event-driven list scheduler under a cost model and writes each
stage's actions down in simulated start order. The lists are then static data the
runtime executes; validate.py checks them and simulate.py times them.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Sequence

from mlora.schedule import actions as A
from mlora.schedule.actions import Action, ActionKind, Schedule
from mlora.schedule.microbatch import MicroBatch
from mlora.schedule.simulate import StageCosts
from mlora.schedule.validate import ScheduleError, check_micro_batches


def _limits(n_stages: int, max_in_flight: int | Sequence[int] | None) -> list[int]:
    if max_in_flight is None:
        limits = [n_stages - s for s in range(n_stages)]  # 1F1B: activation memory of P - s micro-batches
    elif isinstance(max_in_flight, int):
        limits = [max_in_flight] * n_stages
    else:
        limits = list(max_in_flight)
        if len(limits) != n_stages:
            raise ValueError(f"max_in_flight has {len(limits)} entries for {n_stages} stages")
    if any(n < 1 for n in limits):
        raise ValueError(f"max_in_flight must be >= 1 on every stage, got {limits}")
    return limits


def build_schedule(
    micro_batches: Sequence[MicroBatch],
    n_stages: int,
    *,
    max_in_flight: int | Sequence[int] | None = None,
    costs: StageCosts | None = None,
) -> Schedule:
    """Per-stage action lists for `micro_batches` (in planner order) over `n_stages` stages.

    Policy, per stage, whenever it is free: BACKWARD the oldest forwarded micro-batch if
    its gradient is in (the last stage: as soon as its forward is done); otherwise FORWARD
    the next micro-batch if fewer than `max_in_flight` (default P - s) are waiting for
    their backward. Stage 0 may take micro-batches out of planner order: the earliest one
    whose jobs' earlier micro-batches are all in and whose jobs' weights are current.
    Later stages forward in stage 0's order. After the backward of a job step's last
    micro-batch the stage runs that job's OPTIMIZER_STEP. An evaluation micro-batch is
    forwarded only: it keeps no activations, so `max_in_flight` does not hold it back.
    `costs` (default 1 forward, 2 backward per micro-batch) only steers the choices; any
    order emitted is valid.
    """
    if n_stages < 1:
        raise ValueError("n_stages must be >= 1")
    mbs = tuple(micro_batches)
    per_job = check_micro_batches(mbs)
    costs = costs or StageCosts()
    limits = _limits(n_stages, max_in_flight)
    p, lat = n_stages, costs.send_latency
    by_index = {m.index: m for m in mbs}

    # Per job: its micro-batches in order, and a cursor to the next one stage 0 may forward.
    job_mbs = {j: [idx for idx, _ in seq] for j, seq in per_job.items()}
    job_pos = {j: 0 for j in per_job}
    # Per stage and job: the step whose rows may be forwarded now, and since when.
    cur_step = [{j: seq[0][1].step for j, seq in per_job.items()} for _ in range(p)]
    weights_at = [{j: 0.0 for j in per_job} for _ in range(p)]

    free = [0.0] * p
    arrivals: list[deque[tuple[int, float]]] = [deque() for _ in range(p)]  # activations in, FIFO
    grads_at: list[dict[int, float]] = [{} for _ in range(p)]
    waiting_b: list[deque[int]] = [deque() for _ in range(p)]  # forwarded, not yet backwarded (F order)
    n_done = [0] * p  # micro-batches through the stage: backwarded, or (evaluations) forwarded
    out: list[list[Action]] = [[] for _ in range(p)]
    times: list[float] = [0.0]
    pending = sorted(by_index)  # not yet forwarded on stage 0, planner order

    def weights_ready(k: int, mb: MicroBatch, now: float) -> bool:
        return all(cur_step[k][s.job] == s.step and weights_at[k][s.job] <= now for s in mb.slices)

    def next_on_stage0(now: float, full: bool) -> int | None:
        heads = {job_mbs[j][job_pos[j]] for j in job_mbs if job_pos[j] < len(job_mbs[j])}
        for idx in sorted(heads):
            mb = by_index[idx]
            if full and not mb.is_eval:
                continue
            if all(job_mbs[s.job][job_pos[s.job]] == idx for s in mb.slices) and weights_ready(0, mb, now):
                return idx
        return None

    def start_backward(k: int, idx: int, now: float) -> None:
        mb = by_index[idx]
        waiting_b[k].popleft()
        n_done[k] += 1
        if k < p - 1:
            out[k].append(A.comm(ActionKind.RECV_GRAD, k, idx))
        out[k].append(A.backward(k, idx))
        end = now + costs.backward_cost(k, mb)
        if k > 0:
            out[k].append(A.comm(ActionKind.SEND_GRAD, k, idx))
            grads_at[k - 1][idx] = end + lat
            heapq.heappush(times, end + lat)
        for s in mb.slices:
            if s.last:
                out[k].append(A.optimizer_step(k, s.job, s.step))
                end += costs.optimizer
                cur_step[k][s.job] = s.step + 1
                weights_at[k][s.job] = end
        free[k] = end
        heapq.heappush(times, end)

    def start_forward(k: int, idx: int, now: float) -> None:
        mb = by_index[idx]
        if k > 0:
            out[k].append(A.comm(ActionKind.RECV_ACT, k, idx))
        out[k].append(A.forward(k, idx))
        end = now + costs.forward_cost(k, mb)
        if k < p - 1:
            out[k].append(A.comm(ActionKind.SEND_ACT, k, idx))
            arrivals[k + 1].append((idx, end + lat))
            heapq.heappush(times, end + lat)
        if mb.is_eval:
            n_done[k] += 1
        else:
            waiting_b[k].append(idx)
        free[k] = end
        heapq.heappush(times, end)

    def try_start(k: int, now: float) -> bool:
        if free[k] > now:
            return False
        if waiting_b[k]:
            head = waiting_b[k][0]
            if k == p - 1 or grads_at[k].get(head, float("inf")) <= now:
                start_backward(k, head, now)
                return True
        full = len(waiting_b[k]) >= limits[k]
        if k == 0:
            idx = next_on_stage0(now, full)
            if idx is None:
                return False
            pending.remove(idx)
            for s in by_index[idx].slices:
                job_pos[s.job] += 1
        else:
            if not arrivals[k] or arrivals[k][0][1] > now:
                return False
            head = by_index[arrivals[k][0][0]]
            if (full and not head.is_eval) or not weights_ready(k, head, now):
                return False
            idx = arrivals[k].popleft()[0]
        start_forward(k, idx, now)
        return True

    total = len(mbs)
    while any(n < total for n in n_done):
        if not times:
            raise ScheduleError(f"cannot schedule: no stage can make progress ({n_done} done of {total})")
        now = heapq.heappop(times)
        while times and times[0] <= now:
            heapq.heappop(times)
        progressed = True
        while progressed:
            progressed = False
            for k in reversed(range(p)):
                while try_start(k, now):
                    progressed = True
    return Schedule(tuple(tuple(acts) for acts in out), mbs)
