"""Pipeline schedules as data: build, validate, simulate, trace (pure Python, no torch)."""

from __future__ import annotations

import json
import random

import pytest

from mlora.schedule.actions import Action, ActionKind, Schedule
from mlora.schedule.microbatch import JobSlice, MicroBatch, round_robin_micro_batches
from mlora.schedule.pipeline import build_schedule
from mlora.schedule.simulate import SimResult, StageCosts, gpipe_bubble, render_ascii, simulate
from mlora.schedule.trace import TraceEvent, bubble_from_events, to_chrome_trace
from mlora.schedule.validate import ScheduleError, validate_schedule


def random_jobs(rng: random.Random, n_jobs: int) -> dict[str, tuple[int, int]]:
    """name → (steps 2–4, grad_accum 1–3)."""
    return {f"job{i}": (rng.randint(2, 4), rng.randint(1, 3)) for i in range(n_jobs)}


def packed_micro_batches(rng: random.Random, jobs: dict[str, tuple[int, int]]) -> tuple[MicroBatch, ...]:
    """Like round-robin, but each micro-batch takes 1–3 jobs' next slices (several jobs per micro-batch)."""
    queues = {
        j: [JobSlice(j, s, m, m == a - 1, rng.randint(1, 4), rng.randint(16, 256)) for s in range(n) for m in range(a)]
        for j, (n, a) in jobs.items()
    }
    out: list[MicroBatch] = []
    while any(queues.values()):
        live = [j for j, q in queues.items() if q]
        take = rng.sample(live, min(len(live), rng.randint(1, 3)))
        out.append(MicroBatch(10 * len(out) + 7, tuple(queues[j].pop(0) for j in take)))
    return tuple(out)


def stage_forwards(schedule: Schedule, stage: int) -> list[int]:
    return [a.mb for a in schedule.stages[stage] if a.kind is ActionKind.FORWARD]


# --- building and validating -------------------------------------------------------------


@pytest.mark.parametrize("n_stages", range(1, 9))
def test_build_validates_for_all_sizes(n_stages: int) -> None:
    rng = random.Random(n_stages)
    for n_jobs in range(1, 17):
        mbs = round_robin_micro_batches(random_jobs(rng, n_jobs))
        schedule = build_schedule(mbs, n_stages)
        validate_schedule(schedule)
        assert schedule.n_stages == n_stages
        # Each job's micro-batches keep planner order on every stage.
        for k in range(n_stages):
            fwd = stage_forwards(schedule, k)
            assert sorted(fwd) == [m.index for m in mbs]
            for job in {s.job for m in mbs for s in m.slices}:
                mine = [i for i in fwd if job in schedule.micro_batch(i).jobs]
                assert mine == sorted(mine)


@pytest.mark.parametrize("n_stages", [1, 2, 3, 5, 8])
def test_build_validates_multi_job_micro_batches_and_cost_models(n_stages: int) -> None:
    rng = random.Random(100 + n_stages)
    for n_jobs in (1, 3, 7, 12):
        mbs = packed_micro_batches(rng, random_jobs(rng, n_jobs))
        weights = tuple(rng.uniform(0.5, 2.0) for _ in range(n_stages))
        for costs, limit in (
            (None, None),
            (StageCosts.proportional(weights), None),
            (StageCosts(send_latency=0.5, optimizer=0.25), 2),
            (None, len(mbs)),  # no memory limit: all forwards first where possible
        ):
            schedule = build_schedule(mbs, n_stages, max_in_flight=limit, costs=costs)
            validate_schedule(schedule)
            simulate(schedule, costs)


def test_single_stage_is_plain_forward_backward_step() -> None:
    mbs = round_robin_micro_batches({"a": (2, 2), "b": (1, 1)})
    schedule = build_schedule(mbs, 1)
    expected = []
    for m in mbs:
        expected += [f"0F{m.index}", f"0B{m.index}"] + [f"0STEP[{s.job}@{s.step}]" for s in m.slices if s.last]
    assert [str(a) for a in schedule.stages[0]] == expected
    assert schedule.compute_only(0) == schedule.stages[0]


def test_stage0_injects_out_of_planner_order_when_a_job_waits_for_its_step() -> None:
    # Planner put all of a's steps first; a's step 1 must wait for step 0's update, so b goes in between.
    mbs = tuple(MicroBatch(i, (JobSlice(j, s, 0, True, 1, 8),)) for i, (j, s) in enumerate([("a", 0), ("a", 1), ("b", 0), ("b", 1)]))
    schedule = build_schedule(mbs, 2)
    validate_schedule(schedule)
    assert stage_forwards(schedule, 0)[:2] == [0, 2]


def test_action_string_form_round_trips() -> None:
    for text in ("0F3", "1B3", "0SEND_F3", "1RECV_F3", "2SEND_B11", "1RECV_B0", "1STEP[job-a@2]"):
        assert str(Action.parse(text)) == text
    assert Action.parse("0SEND_F3").peer == 1 and Action.parse("1SEND_B3").peer == 0
    with pytest.raises(ValueError):
        Action.parse("0X3")


def test_micro_batch_rejects_same_job_twice() -> None:
    with pytest.raises(ValueError, match="more than once"):
        MicroBatch(0, (JobSlice("a", 0, 0, True, 1, 1), JobSlice("a", 1, 0, True, 1, 1)))


# --- hand-made broken schedules --------------------------------------------------------------

TWO_STEPS = round_robin_micro_batches({"a": (2, 1)})  # mb 0: a@0, mb 1: a@1


def one_mb(job: str = "a") -> tuple[MicroBatch, ...]:
    return (MicroBatch(0, (JobSlice(job, 0, 0, True, 1, 4),)),)


GOOD_P2 = [
    "0F0 0SEND_F0 0RECV_B0 0B0 0STEP[a@0]",
    "1RECV_F0 1F0 1B0 1SEND_B0 1STEP[a@0]",
]


@pytest.mark.parametrize(
    "micro_batches, stages, fragment",
    [
        (one_mb(), GOOD_P2, None),
        # missing backward on stage 1
        (one_mb(), ["0F0 0SEND_F0 0RECV_B0 0B0 0STEP[a@0]", "1RECV_F0 1F0 1SEND_B0 1STEP[a@0]"], "stage 1: micro-batch 0 has no BACKWARD"),
        # backward before forward
        (one_mb(), ["0B0 0F0 0STEP[a@0]"], "stage 0, action 0 (0B0): BACKWARD of micro-batch 0 before its FORWARD"),
        # send and receive swapped on stage 0: it waits for a gradient before sending the activation
        (one_mb(), ["0F0 0RECV_B0 0SEND_F0 0B0 0STEP[a@0]", GOOD_P2[1]], "deadlock: stage 0, action 1 (0RECV_B0) waits for 1SEND_B0"),
        # stage 1 receives in the wrong order: it would take mb 0's activation for mb 1's
        (
            round_robin_micro_batches({"a": (1, 1), "b": (1, 1)}),
            [
                "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0STEP[a@0] 0RECV_B1 0B1 0STEP[b@0]",
                "1RECV_F1 1F1 1B1 1SEND_B1 1STEP[b@0] 1RECV_F0 1F0 1B0 1SEND_B0 1STEP[a@0]",
            ],
            "channel 0->1 (activations): send #0 is micro-batch 0",
        ),
        # stale weights: step 1 forwarded before step 0's update
        (TWO_STEPS, ["0F0 0F1 0B0 0STEP[a@0] 0B1 0STEP[a@1]"], "stage 0, action 1 (0F1): stale weights: forward of job 'a' step 1"),
        # missing optimizer step
        (TWO_STEPS, ["0F0 0B0 0F1 0B1 0STEP[a@1]"], "stage 0: job 'a' step 0 has no OPTIMIZER_STEP"),
        # optimizer step before its backward
        (TWO_STEPS, ["0F0 0STEP[a@0] 0B0 0F1 0B1 0STEP[a@1]"], "OPTIMIZER_STEP(a, 0) before the BACKWARD of micro-batch(es) [0]"),
        # receive placed after the forward that needs it
        (one_mb(), [GOOD_P2[0], "1F0 1RECV_F0 1B0 1SEND_B0 1STEP[a@0]"], "stage 1, action 1 (1RECV_F0): RECV_ACT must come before 1F0"),
        # duplicate forward
        (one_mb(), ["0F0 0F0 0B0 0STEP[a@0]"], "duplicate FORWARD of micro-batch 0"),
        # a stage 0 cannot receive activations
        (one_mb(), ["0RECV_F0 0F0 0B0 0STEP[a@0]"], "stage 0 has no neighbour -1"),
    ],
)
def test_validate_hand_made(micro_batches, stages, fragment) -> None:
    check_validation(Schedule.from_strings(micro_batches, stages), fragment)


def check_validation(schedule: Schedule, fragment: str | None) -> None:
    """The schedule validates (fragment None), or is refused with `fragment` in the message."""
    if fragment is None:
        validate_schedule(schedule)
        return
    with pytest.raises(ScheduleError) as err:
        validate_schedule(schedule)
    assert fragment in str(err.value), str(err.value)


def test_validate_rejects_micro_batches_out_of_job_order() -> None:
    mbs = (MicroBatch(0, (JobSlice("a", 1, 0, True, 1, 1),)), MicroBatch(1, (JobSlice("a", 0, 0, True, 1, 1),)))
    with pytest.raises(ScheduleError, match="job 'a': micro-batch 1 holds step 0 micro 0"):
        build_schedule(mbs, 2)


def test_a_schedule_window_may_start_and_end_mid_step() -> None:
    # Rows continue a step begun in an earlier window and leave the last step open for the next.
    mbs = (
        MicroBatch(5, (JobSlice("a", 3, 1, True, 1, 1),)),
        MicroBatch(6, (JobSlice("a", 4, 0, False, 1, 1),)),
    )
    schedule = build_schedule(mbs, 3)
    validate_schedule(schedule)
    steps = [str(a) for a in schedule.stages[2] if a.kind is ActionKind.OPTIMIZER_STEP]
    assert steps == ["2STEP[a@3]"]


# --- simulation -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_stages", range(2, 9))
def test_bubble_is_warmup_and_drain_only_with_enough_jobs(n_stages: int) -> None:
    slot = 1.0 + 2.0  # forward + backward with the default costs
    for n_jobs in (n_stages, n_stages + 3, 16):
        for steps, accum in ((3, 1), (2, 3)):
            mbs = round_robin_micro_batches({f"j{i}": (steps, accum) for i in range(n_jobs)})
            result = simulate(build_schedule(mbs, n_stages))
            assert max(result.idle) <= (n_stages - 1) * slot + 1e-9, (n_jobs, steps, accum, result.idle)
            # A per-step flush (GPipe, or 1F1B that drains at each step) pays (P-1)/(m+P-1) every step.
            m = n_jobs * accum
            assert result.bubble_fraction < gpipe_bubble(n_stages, m)


def test_simulate_one_f_one_b_makespan() -> None:
    p, m = 4, 8
    mbs = round_robin_micro_batches({f"j{i}": (1, 1) for i in range(m)})
    result = simulate(build_schedule(mbs, p))
    assert result.makespan == (m + p - 1) * 3
    assert result.busy == (m * 3.0,) * p
    assert result.bubble_fraction == pytest.approx(gpipe_bubble(p, m))  # one step: same as GPipe


def test_simulate_latency_and_per_token_costs() -> None:
    mbs = round_robin_micro_batches({"a": (2, 1), "b": (2, 1)}, tokens=10)
    schedule = build_schedule(mbs, 2)
    base = simulate(schedule)
    slow = simulate(schedule, StageCosts(send_latency=1.0))
    assert slow.makespan > base.makespan
    tok = simulate(schedule, StageCosts(forward=(0.1, 0.2), backward=(0.2, 0.4), per_token=True))
    assert tok.busy == pytest.approx((4 * 3.0, 4 * 6.0))


def test_simulate_reports_deadlock() -> None:
    schedule = Schedule.from_strings(one_mb(), ["0F0 0RECV_B0 0SEND_F0 0B0 0STEP[a@0]", GOOD_P2[1]])
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(schedule)


def test_render_ascii_has_one_row_per_stage() -> None:
    mbs = round_robin_micro_batches({f"j{i}": (2, 1) for i in range(4)})
    text = render_ascii(simulate(build_schedule(mbs, 4)))
    rows = [r for r in text.splitlines() if r.startswith("stage ")]
    assert len(rows) == 4 and len({len(r) for r in rows}) == 1
    assert rows[3].startswith("stage 3 |.........F0 B0====")


# --- traces -------------------------------------------------------------------------------------


def test_chrome_trace_round_trips_with_one_track_per_stage() -> None:
    p = 4
    mbs = packed_micro_batches(random.Random(1), {f"j{i}": (2, 2) for i in range(5)})
    result = simulate(build_schedule(mbs, p))
    trace = json.loads(json.dumps(to_chrome_trace(result.events, n_stages=p, time_scale=1e-3)))
    tracks = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert sorted(e["tid"] for e in tracks) == list(range(p))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in xs} == set(range(p))
    assert len(xs) == len(result.events)
    name = next(e["name"] for e in xs if e["cat"] == "F" and e["args"]["mb"] == mbs[0].index)
    assert name == f"F mb{mbs[0].index} [{','.join(mbs[0].jobs)}]"


def test_bubble_from_events_matches_simulation_and_handles_measured_events() -> None:
    mbs = round_robin_micro_batches({f"j{i}": (3, 1) for i in range(4)})
    result = simulate(build_schedule(mbs, 4))
    assert bubble_from_events(result.events, 4) == pytest.approx(result.bubble_fraction)
    assert bubble_from_events(result.events, 4, per_stage_window=True) < result.bubble_fraction
    measured = [
        TraceEvent(0, "F mb0 [a]", "F", 10.0, 11.0, 0, ("a",)),
        TraceEvent(0, "B mb0 [a]", "B", 10.5, 12.0, 0, ("a",)),  # overlap counts once
        TraceEvent(1, "RECV_F mb0", "RECV_F", 10.0, 11.0, 0),  # waiting is idle
        TraceEvent(1, "F mb0 [a]", "F", 11.0, 12.0, 0, ("a",)),
    ]
    assert bubble_from_events(measured, 2) == pytest.approx((0.0 + 1.0) / 4.0)
    assert bubble_from_events([], 2) == 0.0


def test_sim_result_bubble_fraction() -> None:
    r = SimResult(2, (), (3.0, 1.0), 4.0)
    assert r.idle == (1.0, 3.0) and r.bubble_fraction == pytest.approx(0.5)


# --- evaluation micro-batches -------------------------------------------------------------


def with_evaluations(rng: random.Random, mbs: tuple[MicroBatch, ...]) -> tuple[MicroBatch, ...]:
    """`mbs` with, after some job steps and after each job's last, a 1–3 chunk evaluation of
    that job's weights as its own micro-batches (indices renumbered in the new order)."""
    out: list[tuple[JobSlice, ...]] = []
    last_step = {s.job: s.step for m in mbs for s in m.slices}
    due: dict[str, list[JobSlice]] = {}

    def flush(jobs) -> None:
        for job in jobs:
            out.extend((e,) for e in due.pop(job, []))

    for m in mbs:
        flush(m.jobs)  # an evaluation goes in before the job's next rows, or earlier
        out.append(m.slices)
        for s in m.slices:
            if s.last and (s.step == last_step[s.job] or rng.random() < 0.5):
                n = rng.randint(1, 3)
                due[s.job] = [JobSlice(s.job, s.step + 1, i, i == n - 1, 2, 40, eval=True) for i in range(n)]
        if rng.random() < 0.5:
            flush(list(due))
    flush(list(due))
    return tuple(MicroBatch(i, slices) for i, slices in enumerate(out))


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4, 6])
def test_evaluations_are_forwarded_only_between_their_steps_updates(n_stages: int) -> None:
    rng = random.Random(500 + n_stages)
    for n_jobs in (1, 2, 5, 9):
        mbs = with_evaluations(rng, packed_micro_batches(rng, random_jobs(rng, n_jobs)))
        evals = {m.index: m.slices[0] for m in mbs if m.is_eval}
        assert evals
        for limit in (None, 1):
            schedule = build_schedule(mbs, n_stages, max_in_flight=limit)
            validate_schedule(schedule)
            simulate(schedule)
            for k, acts in enumerate(schedule.stages):
                forwards = [a.mb for a in acts if a.kind is ActionKind.FORWARD]
                assert sorted(forwards) == [m.index for m in mbs]
                assert not [a for a in acts if a.mb in evals and a.kind not in (ActionKind.FORWARD, ActionKind.SEND_ACT, ActionKind.RECV_ACT)]
                for idx, s in evals.items():  # the weights after exactly s.step steps
                    at = next(i for i, a in enumerate(acts) if a.kind is ActionKind.FORWARD and a.mb == idx)
                    steps = [(a.job, a.step) for a in acts[:at] if a.kind is ActionKind.OPTIMIZER_STEP]
                    assert (s.job, s.step - 1) in steps and (s.job, s.step) not in steps


def eval_mbs() -> tuple[MicroBatch, ...]:
    """a@0, evaluation after 1 step (one chunk), a@1."""
    return (
        MicroBatch(0, (JobSlice("a", 0, 0, True, 1, 4),)),
        MicroBatch(1, (JobSlice("a", 1, 0, True, 1, 4, eval=True),)),
        MicroBatch(2, (JobSlice("a", 1, 0, True, 1, 4),)),
    )


@pytest.mark.parametrize(
    "stages, fragment",
    [
        (["0F0 0SEND_F0 0RECV_B0 0B0 0STEP[a@0] 0F1 0SEND_F1 0F2 0SEND_F2 0RECV_B2 0B2 0STEP[a@1]",
          "1RECV_F0 1F0 1B0 1SEND_B0 1STEP[a@0] 1RECV_F1 1F1 1RECV_F2 1F2 1B2 1SEND_B2 1STEP[a@1]"], None),
        # an evaluation with a backward
        (["0F0 0SEND_F0 0RECV_B0 0B0 0STEP[a@0] 0F1 0SEND_F1 0RECV_B1 0B1 0F2 0SEND_F2 0RECV_B2 0B2 0STEP[a@1]",
          "1RECV_F0 1F0 1B0 1SEND_B0 1STEP[a@0] 1RECV_F1 1F1 1B1 1SEND_B1 1RECV_F2 1F2 1B2 1SEND_B2 1STEP[a@1]"],
         "stage 0, action 7 (0RECV_B1): micro-batch 1 is an evaluation: forward only, no RECV_GRAD"),
        # stage 1 evaluates after it applied step 1: later weights than stage 0 saw
        (["0F0 0SEND_F0 0RECV_B0 0B0 0STEP[a@0] 0F1 0SEND_F1 0F2 0SEND_F2 0RECV_B2 0B2 0STEP[a@1]",
          "1RECV_F0 1F0 1B0 1SEND_B0 1STEP[a@0] 1RECV_F1 1RECV_F2 1F2 1B2 1SEND_B2 1STEP[a@1] 1F1"],
         "stage 1, action 11 (1F1): forward of evaluation of job 'a' after step 1 after OPTIMIZER_STEP(a, 1)"),
        # stage 0 evaluates before step 0's update
        (["0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0STEP[a@0] 0F2 0SEND_F2 0RECV_B2 0B2 0STEP[a@1]",
          "1RECV_F0 1F0 1B0 1SEND_B0 1STEP[a@0] 1RECV_F1 1F1 1RECV_F2 1F2 1B2 1SEND_B2 1STEP[a@1]"],
         "stage 0, action 2 (0F1): stale weights: forward of evaluation of job 'a' after step 1 before OPTIMIZER_STEP(a, 0)"),
    ],
)
def test_validate_hand_made_evaluations(stages, fragment) -> None:
    check_validation(Schedule.from_strings(eval_mbs(), stages), fragment)


@pytest.mark.parametrize(
    "slices, fragment",
    [
        # evaluation mid-step: step 0's micro 1 must come first
        ([("a", 0, 0, False, False), ("a", 1, 0, True, True)],
         "holds evaluation after step 1 micro 0, last, but after micro-batch 0 (step 0 micro 0) step 0 micro 1 must come next"),
        # an evaluation of the wrong weights
        ([("a", 0, 0, True, False), ("a", 2, 0, True, True)], "step 1 micro 0 (or an evaluation after step 1 micro 0) must come next"),
        # chunks out of order, or the step's rows before the evaluation is whole
        ([("a", 0, 0, True, False), ("a", 1, 1, True, True)], "step 1 micro 0 (or an evaluation after step 1 micro 0)"),
        ([("a", 0, 0, True, False), ("a", 1, 0, False, True), ("a", 1, 0, True, False)], "evaluation after step 1 micro 1 must come next"),
        # after an evaluation, the step it was taken before
        ([("a", 1, 0, True, True), ("a", 2, 0, True, False)], "step 1 micro 0 must come next"),
        ([("a", 1, 1, True, True)], "at the job's start an evaluation's micro 0 must come next"),
    ],
)
def test_job_order_with_evaluations(slices, fragment) -> None:
    mbs = tuple(MicroBatch(i, (JobSlice(j, s, m, last, 1, 4, eval=e),)) for i, (j, s, m, last, e) in enumerate(slices))
    with pytest.raises(ScheduleError) as err:
        build_schedule(mbs, 2)
    assert fragment in str(err.value), str(err.value)


def test_a_micro_batch_holds_evaluation_or_training_rows_not_both() -> None:
    with pytest.raises(ValueError, match="mixes evaluation and training slices"):
        MicroBatch(0, (JobSlice("a", 1, 0, True, 1, 1, eval=True), JobSlice("b", 0, 0, True, 1, 1)))
    assert MicroBatch(0, (JobSlice("a", 1, 0, True, 1, 1, eval=True), JobSlice("b", 3, 0, True, 1, 1, eval=True))).is_eval
