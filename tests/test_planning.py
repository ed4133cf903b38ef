"""Pure planning: a job's steps, which micro-batches are fused, and length passes."""

from __future__ import annotations

import json
import random

import torch
from conftest import write_run
from safetensors.torch import load_file

from mlora.config import load_run_file
from mlora.jobs import plan_steps
from mlora.runtime.trainer import train
from mlora.schedule.planner import Candidate, plan_fused_batch, split_by_length


def test_steps_cover_each_epoch_once_in_order():
    steps = plan_steps(10, 3, 2, 2, None, lambda e: list(range(10))[::-1] if e else list(range(10)))
    assert [s.epoch for s in steps] == [0, 0, 1, 1]
    assert steps[0].micro_batches == ((0, 1, 2), (3, 4, 5)) and steps[1].micro_batches == ((6, 7, 8), (9,))
    assert len(plan_steps(10, 3, 2, 1, 7, lambda e: range(10))) == 7


def test_grouping_by_length_keeps_each_steps_examples_and_sizes():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(40)]
    order = list(range(40))
    rng.shuffle(order)
    plain = plan_steps(40, 4, 3, 1, None, lambda e: order)
    grouped = plan_steps(40, 4, 3, 1, None, lambda e: order, lengths)
    padded = {"plain": 0, "grouped": 0}
    for a, b in zip(plain, grouped):
        assert sorted(i for mb in a.micro_batches for i in mb) == sorted(i for mb in b.micro_batches for i in mb)
        assert [len(mb) for mb in a.micro_batches] == [len(mb) for mb in b.micro_batches]
        flat = [lengths[i] for mb in b.micro_batches for i in mb]
        assert flat == sorted(flat) or len(b.micro_batches) == 1
        for name, step in (("plain", a), ("grouped", b)):
            padded[name] += sum(len(mb) * max(lengths[i] for i in mb) for mb in step.micro_batches)
    assert padded["grouped"] < 0.8 * padded["plain"]
    # no accumulation: nothing to regroup, the epoch order stands
    assert plan_steps(40, 4, 1, 1, None, lambda e: order, lengths) == plan_steps(40, 4, 1, 1, None, lambda e: order)


def test_fused_batch_respects_the_budget_and_rotates():
    c = [Candidate("a", 4, 100), Candidate("b", 4, 100), Candidate("c", 4, 100)]
    assert plan_fused_batch(c, 1200) == [0, 1, 2]
    assert plan_fused_batch(c, 800, turn=0) == [0, 1]
    assert plan_fused_batch(c, 800, turn=1) == [1, 2]
    assert plan_fused_batch(c, 800, turn=2) == [0, 2]
    assert plan_fused_batch([Candidate("big", 8, 1000)], 100) == [0]  # never split


def test_length_passes_keep_like_lengths_together():
    c = [Candidate("long", 4, 512), Candidate("short", 8, 40), Candidate("short2", 8, 48), Candidate("long2", 2, 500)]
    passes = split_by_length(c, [0, 1, 2, 3])
    assert passes == [[1, 2], [0, 3]]
    padded = sum(sum(c[i].rows for i in p) * max(c[i].max_len for i in p) for p in passes)
    one = sum(x.rows for x in c) * 512
    assert padded < 0.45 * one
    assert split_by_length(c, [1, 2]) == [[1, 2]]
    same = [Candidate(str(i), 4, 500 + i) for i in range(4)]
    assert split_by_length(same, [0, 1, 2, 3]) == [[0, 1, 2, 3]]


def test_jobs_of_different_lengths_fused_equal_alone(tmp_path, tiny_models):
    """Two passes per fused batch (short rows, long rows): each job as if alone."""
    rng = random.Random(1)
    files = {}
    for name, (lo, hi) in {"short": (1, 3), "long": (20, 30)}.items():
        rows = [{"instruction": "echo", "input": " ".join(rng.choice("abcdef") for _ in range(rng.randint(lo, hi))),
                 "output": "ok"} for _ in range(16)]
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(jobs: list[str], out: str):
        raw = {"model": {"path": str(tiny_models["llama"]), "dtype": "float32", "device": "cpu"},
               "defaults": {"template": "plain", "cutoff_len": 96, "max_steps": 3, "micro_batch_size": 4,
                            "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "target_modules": "all"},
               "jobs": [{"name": j, "dataset": str(files[j])} for j in jobs],
               "run": {"output_dir": str(tmp_path / out)}}
        return train(load_run_file(write_run(tmp_path / f"{out}.yaml", raw)), live=False).output_dir

    together = run(["short", "long"], "together")
    for job in ("short", "long"):
        alone = run([job], f"alone-{job}")
        a = load_file(str(alone / job / "adapter_model.safetensors"))
        b = load_file(str(together / job / "adapter_model.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)


def test_pipeline_groups_cut_rows_of_unlike_length_apart():
    from mlora.schedule.planner import JobPlanSizes, plan_pipeline

    def job(name: str, length: int) -> JobPlanSizes:
        return JobPlanSizes(name, steps=(((4, length), (4, length)),) * 2, tokens=((4 * length, 4 * length),) * 2)

    mbs = plan_pipeline([job("long", 500), job("short", 40), job("short2", 44)], n_groups=1, max_concurrent=3, max_tokens=10**6)
    assert [sorted(s.job for s in mb.slices) for mb in mbs[:2]] == [["short", "short2"], ["long"]]
    assert len(mbs) == 8
    for name in ("long", "short", "short2"):  # each job's micro-batches in its own order
        seq = [(s.step, s.micro) for mb in mbs for s in mb.slices if s.job == name]
        assert seq == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_pipeline_plan_evaluates_whole_between_steps_and_after_the_last():
    from mlora.schedule.planner import JobPlanSizes, plan_pipeline

    def job(name: str, steps: int, evals: tuple[int, ...], after: set[int], first: int = 0) -> JobPlanSizes:
        return JobPlanSizes(name, steps=(((2, 8), (2, 8)),) * steps, tokens=((16, 16),) * steps, first_step=first,
                            eval_chunks=tuple((r, 8) for r in evals), eval_tokens=tuple(8 * r for r in evals),
                            eval_after=frozenset(after))

    jobs = [job("a", 3, (2, 1), {2, 3}), job("b", 2, (2,), {1, 2}), job("c", 2, (), {2}), job("d", 2, (1,), {1, 3}, first=1)]
    mbs = plan_pipeline(jobs, n_groups=1, max_concurrent=3, max_tokens=10**6)
    assert all(len({s.eval for s in m.slices}) == 1 for m in mbs)
    order = {name: [(s.eval, s.step, s.micro) for m in mbs for s in m.slices if s.job == name] for name in "abcd"}
    train = lambda first, n: [(False, s, m) for s in range(first, first + n) for m in (0, 1)]  # noqa: E731
    assert order["a"] == train(0, 2) + [(True, 2, 0), (True, 2, 1)] + train(2, 1) + [(True, 3, 0), (True, 3, 1)]
    assert order["b"] == train(0, 1) + [(True, 1, 0)] + train(1, 1) + [(True, 2, 0)]
    assert order["c"] == train(0, 2)  # nothing held out: never evaluated
    # a resumed job with an evaluation due at the step it starts from takes it first
    assert order["d"] == [(True, 1, 0)] + train(1, 2) + [(True, 3, 0)]
    # jobs evaluating in the same turn share micro-batches, chunk by chunk
    assert any({"a", "b"} <= set(m.jobs) for m in mbs if m.is_eval)
