"""Checks that a schedule is safe to hand to the runtime, with messages that point at the action.

A schedule is static data executed by P processes with blocking receives and
non-blocking sends, so a wrong one either hangs (deadlock), silently mixes up tensors
(a receive that takes another micro-batch's activation), or trains on stale LoRA
weights. All three are caught here, before any process starts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from mlora.schedule.actions import Action, ActionKind, PEER_OFFSET, Schedule
from mlora.schedule.microbatch import JobSlice, MicroBatch


class ScheduleError(ValueError):
    """A schedule (or its micro-batch list) that must not be executed."""


def _where(stage: int, i: int, a: Action) -> str:
    return f"stage {stage}, action {i} ({a})"


def check_micro_batches(micro_batches: Sequence[MicroBatch]) -> dict[str, list[tuple[int, JobSlice]]]:
    """Each job's (micro-batch index, slice) list in planner order, after checking that order.

    Indices must increase; within a job, slices must follow its gradient accumulation:
    the next slice is the same step's next micro (`micro + 1`) or, after a `last` slice,
    the next step's micro 0. A job may start mid-step and end mid-step (a window of a
    longer run); only steps whose `last` slice is present get an optimizer step.
    An evaluation (eval slices 0..last of step s) sits between step s - 1's last slice
    and step s's first, whole: its rows see exactly the weights after s steps.
    """
    per_job: dict[str, list[tuple[int, JobSlice]]] = {}
    prev_index: int | None = None
    for m in micro_batches:
        if prev_index is not None and m.index <= prev_index:
            raise ScheduleError(f"micro-batch indices must increase in planner order: {m.index} follows {prev_index}")
        prev_index = m.index
        for s in m.slices:
            seq = per_job.setdefault(s.job, [])
            want = _next_slice(seq[-1][1] if seq else None, s)
            if want is not None:
                after = f"after micro-batch {seq[-1][0]} ({_describe(seq[-1][1])})" if seq else "at the job's start"
                raise ScheduleError(
                    f"job {s.job!r}: micro-batch {m.index} holds {_describe(s)}, but {after} {want} must come next"
                )
            seq.append((m.index, s))
    return per_job


def _describe(s: JobSlice) -> str:
    what = "evaluation after step" if s.eval else "step"
    return f"{what} {s.step} micro {s.micro}" + (", last" if s.last else "")


def _next_slice(prev: JobSlice | None, s: JobSlice) -> str | None:
    """None if `s` may follow `prev` in a job's order, else what must come next."""
    if prev is None:
        return "an evaluation's micro 0" if s.eval and s.micro != 0 else None
    if prev.eval:
        want, want_eval = ((prev.step, prev.micro + 1), True) if not prev.last else ((prev.step, 0), False)
    else:
        want, want_eval = ((prev.step + 1, 0) if prev.last else (prev.step, prev.micro + 1)), False
    if (s.step, s.micro) == want and s.eval == want_eval:
        return None
    if prev.last and not prev.eval and s.eval and (s.step, s.micro) == want:
        return None  # an evaluation after the step just completed
    text = ("evaluation after step" if want_eval else "step") + f" {want[0]} micro {want[1]}"
    return text + (f" (or an evaluation after step {want[0]} micro 0)" if prev.last and not prev.eval else "")


def _complete_steps(micro_batches: Sequence[MicroBatch]) -> dict[tuple[str, int], list[int]]:
    """(job, step) → its micro-batch indices, for steps whose last slice is in the schedule."""
    members: dict[tuple[str, int], list[int]] = defaultdict(list)
    complete: set[tuple[str, int]] = set()
    for m in micro_batches:
        if m.is_eval:
            continue
        for s in m.slices:
            members[(s.job, s.step)].append(m.index)
            if s.last:
                complete.add((s.job, s.step))
    return {key: members[key] for key in members if key in complete}


def _check_actions(schedule: Schedule, known: set[int]) -> None:
    p = schedule.n_stages
    for k, acts in enumerate(schedule.stages):
        for i, a in enumerate(acts):
            if a.stage != k:
                raise ScheduleError(f"{_where(k, i, a)}: action belongs to stage {a.stage}")
            if a.kind is ActionKind.OPTIMIZER_STEP:
                if a.job is None or a.step is None:
                    raise ScheduleError(f"{_where(k, i, a)}: OPTIMIZER_STEP needs a job and a step")
                continue
            if a.mb not in known:
                raise ScheduleError(f"{_where(k, i, a)}: micro-batch {a.mb} is not in the schedule's micro-batch list")
            if a.kind in PEER_OFFSET:
                want = k + PEER_OFFSET[a.kind]
                if not 0 <= want < p:
                    raise ScheduleError(f"{_where(k, i, a)}: stage {k} has no neighbour {want} to {a.kind.name} with")
                if a.peer != want:
                    raise ScheduleError(f"{_where(k, i, a)}: {a.kind.name} peer must be stage {want}, got {a.peer}")


def _check_compute_and_comm(schedule: Schedule, order: list[int]) -> None:
    """Exactly one F and one B per micro-batch per stage, F first, each wrapped by its
    sends/receives; an evaluation micro-batch has its F and activation messages only."""
    p = schedule.n_stages
    evals = {m.index for m in schedule.micro_batches if m.is_eval}
    for k, acts in enumerate(schedule.stages):
        pos: dict[tuple[ActionKind, int], int] = {}
        for i, a in enumerate(acts):
            if a.kind is ActionKind.OPTIMIZER_STEP:
                continue
            key = (a.kind, a.mb)
            if key in pos:
                raise ScheduleError(f"{_where(k, i, a)}: duplicate {a.kind.name} of micro-batch {a.mb} (first at action {pos[key]})")
            pos[key] = i
        forward = [ActionKind.FORWARD] + [ActionKind.RECV_ACT] * (k > 0) + [ActionKind.SEND_ACT] * (k < p - 1)
        backward = [ActionKind.BACKWARD] + [ActionKind.SEND_GRAD] * (k > 0) + [ActionKind.RECV_GRAD] * (k < p - 1)
        for mb in order:
            for kind in forward if mb in evals else forward + backward:
                if (kind, mb) not in pos:
                    raise ScheduleError(f"stage {k}: micro-batch {mb} has no {kind.name}")
            if mb in evals:
                extra = sorted(pos[(kind, mb)] for kind in backward if (kind, mb) in pos)
                if extra:
                    a = acts[extra[0]]
                    raise ScheduleError(
                        f"{_where(k, extra[0], a)}: micro-batch {mb} is an evaluation: forward only, no {a.kind.name}"
                    )
            f = pos[(ActionKind.FORWARD, mb)]
            # (kind, must come before F/B, relative to which compute action)
            rules = [(ActionKind.RECV_ACT, f, True)] * (k > 0) + [(ActionKind.SEND_ACT, f, False)] * (k < p - 1)
            if mb not in evals:
                b = pos[(ActionKind.BACKWARD, mb)]
                if b < f:
                    raise ScheduleError(f"{_where(k, b, acts[b])}: BACKWARD of micro-batch {mb} before its FORWARD (action {f})")
                rules += [(ActionKind.SEND_GRAD, b, False)] * (k > 0) + [(ActionKind.RECV_GRAD, b, True)] * (k < p - 1)
            for kind, at, before in rules:
                c = pos[(kind, mb)]
                if before and c > at:
                    raise ScheduleError(f"{_where(k, c, acts[c])}: {kind.name} must come before {acts[at]} (action {at})")
                if not before and c < at:
                    raise ScheduleError(f"{_where(k, c, acts[c])}: {kind.name} must come after {acts[at]} (action {at})")


def _check_fifo(schedule: Schedule) -> None:
    """Per channel, the i-th receive must expect the i-th send's micro-batch (messages carry no tag)."""
    for k in range(schedule.n_stages - 1):
        for src, dst, send, recv, what in (
            (k, k + 1, ActionKind.SEND_ACT, ActionKind.RECV_ACT, "activations"),
            (k + 1, k, ActionKind.SEND_GRAD, ActionKind.RECV_GRAD, "gradients"),
        ):
            sends = [(i, a) for i, a in enumerate(schedule.stages[src]) if a.kind is send]
            recvs = [(i, a) for i, a in enumerate(schedule.stages[dst]) if a.kind is recv]
            for n, ((si, s), (ri, r)) in enumerate(zip(sends, recvs)):
                if s.mb != r.mb:
                    raise ScheduleError(
                        f"channel {src}->{dst} ({what}): send #{n} is micro-batch {s.mb} (stage {src}, action {si}) "
                        f"but receive #{n} expects micro-batch {r.mb} (stage {dst}, action {ri}); receives must follow send order"
                    )


def _check_weights(schedule: Schedule) -> None:
    """Every complete job step has one OPTIMIZER_STEP per stage, after all its backwards and
    before any forward of the job's next step (otherwise that forward uses stale weights).
    An evaluation after step s runs between OPTIMIZER_STEP s - 1 and OPTIMIZER_STEP s."""
    steps = _complete_steps(schedule.micro_batches)
    by_index = {m.index: m for m in schedule.micro_batches}
    for k, acts in enumerate(schedule.stages):
        seen: dict[tuple[str, int], int] = {}
        for i, a in enumerate(acts):
            if a.kind is not ActionKind.OPTIMIZER_STEP:
                continue
            key = (a.job, a.step)
            if key not in steps:
                raise ScheduleError(f"{_where(k, i, a)}: job {a.job!r} step {a.step} does not end in this schedule")
            if key in seen:
                raise ScheduleError(f"{_where(k, i, a)}: duplicate OPTIMIZER_STEP (first at action {seen[key]})")
            seen[key] = i
        for key in steps:
            if key not in seen:
                raise ScheduleError(f"stage {k}: job {key[0]!r} step {key[1]} has no OPTIMIZER_STEP")
        applied: set[tuple[str, int]] = set()
        backwarded: set[int] = set()
        for i, a in enumerate(acts):
            if a.kind is ActionKind.FORWARD:
                for s in by_index[a.mb].slices:
                    prev = (s.job, s.step - 1)
                    what = f"evaluation of job {s.job!r} after step {s.step}" if s.eval else f"job {s.job!r} step {s.step}"
                    if prev in steps and prev not in applied:
                        raise ScheduleError(
                            f"{_where(k, i, a)}: stale weights: forward of {what} "
                            f"before OPTIMIZER_STEP({s.job}, {s.step - 1}) on stage {k}"
                        )
                    if s.eval and (s.job, s.step) in applied:
                        raise ScheduleError(
                            f"{_where(k, i, a)}: forward of {what} after OPTIMIZER_STEP({s.job}, {s.step}) on stage {k}: "
                            f"it would see later weights"
                        )
            elif a.kind is ActionKind.BACKWARD:
                backwarded.add(a.mb)
            elif a.kind is ActionKind.OPTIMIZER_STEP:
                key = (a.job, a.step)
                missing = [mb for mb in steps[key] if mb not in backwarded]
                if missing:
                    raise ScheduleError(
                        f"{_where(k, i, a)}: OPTIMIZER_STEP({a.job}, {a.step}) before the BACKWARD of micro-batch(es) {missing}"
                    )
                applied.add(key)


def channel_of(a: Action) -> tuple[int, int, str]:
    """(src, dst, "act"|"grad"): the FIFO a send or receive belongs to."""
    data = "act" if a.kind in (ActionKind.SEND_ACT, ActionKind.RECV_ACT) else "grad"
    if a.kind in (ActionKind.SEND_ACT, ActionKind.SEND_GRAD):
        return (a.stage, a.peer, data)  # type: ignore[return-value]
    return (a.peer, a.stage, data)  # type: ignore[return-value]


def execution_order(schedule: Schedule) -> list[tuple[int, int]]:
    """One global order of (stage, action index) in which the lists can run with blocking
    receives and non-blocking sends; raises ScheduleError naming the stuck actions if none exists.

    Any real interleaving reaches the end too: a blocked receive only waits for a send
    that its peer will reach without waiting on the receiver (messages are matched FIFO).
    """
    p = schedule.n_stages
    ptr = [0] * p
    sent: dict[tuple[int, int, str], int] = defaultdict(int)
    received: dict[tuple[int, int, str], int] = defaultdict(int)
    order: list[tuple[int, int]] = []
    progress = True
    while progress:
        progress = False
        for k in range(p):
            acts = schedule.stages[k]
            while ptr[k] < len(acts):
                a = acts[ptr[k]]
                if a.kind in (ActionKind.RECV_ACT, ActionKind.RECV_GRAD):
                    ch = channel_of(a)
                    if sent[ch] <= received[ch]:
                        break
                    received[ch] += 1
                elif a.kind in (ActionKind.SEND_ACT, ActionKind.SEND_GRAD):
                    sent[channel_of(a)] += 1
                order.append((k, ptr[k]))
                ptr[k] += 1
                progress = True
    stuck = [k for k in range(p) if ptr[k] < len(schedule.stages[k])]
    if stuck:
        parts = []
        for k in stuck:
            a = schedule.stages[k][ptr[k]]
            send = ActionKind.SEND_ACT if a.kind is ActionKind.RECV_ACT else ActionKind.SEND_GRAD
            peer = a.peer if a.peer is not None else -1
            state = (
                f"blocked at {schedule.stages[peer][ptr[peer]]} (action {ptr[peer]})"
                if 0 <= peer < p and ptr[peer] < len(schedule.stages[peer])
                else "finished"
            )
            parts.append(f"{_where(k, ptr[k], a)} waits for {peer}{send.value}{a.mb} but stage {peer} is {state}")
        raise ScheduleError("deadlock: " + "; ".join(parts))
    return order


def validate_schedule(schedule: Schedule) -> None:
    """Raise ScheduleError on the first problem found; return None if the schedule is safe to run."""
    if schedule.n_stages < 1:
        raise ScheduleError("a schedule needs at least one stage")
    check_micro_batches(schedule.micro_batches)
    order = [m.index for m in schedule.micro_batches]
    _check_actions(schedule, set(order))
    _check_compute_and_comm(schedule, order)
    _check_fifo(schedule)
    _check_weights(schedule)
    execution_order(schedule)
