"""Cutting the model into pipeline stages, inside blocks too: the split is the best one,
the stages compose to the whole model, and a resumed run keeps the split its
checkpoints were written under."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from mlora.config import ConfigError, load_run_file
from mlora.jobs.optim import JobOptimizer
from mlora.model.lora_linear import BatchLayout, JobRows, StageAdapter
from mlora.model.stage import StageBounds, load_stage
from mlora.runtime.checkpoint import check_resumable, resumed_split
from mlora.runtime.pipeline_plan import split_model, stage_shape
from mlora.schedule.partition import (
    ModelShape,
    balanced_split,
    cuts_split,
    describe_halves,
    explicit_split,
    split_as_layers,
)

from conftest import write_run

SHAPE_7B = ModelShape(n_layers=32, hidden=4096, intermediate=11008, n_heads=32, n_kv_heads=32, vocab=32000)


def brute_force(shape: ModelShape, n_stages: int, halves: bool) -> tuple[float, int]:
    """(smallest maximum stage cost, fewest cuts inside blocks) over every contiguous split."""
    n = 2 * shape.n_layers
    positions = [h for h in range(1, n) if halves or h % 2 == 0]
    best = (float("inf"), 0)
    for inner in itertools.combinations(positions, n_stages - 1):
        split = cuts_split(shape, (0, *inner, n))
        best = min(best, (max(split.costs), sum(c % 2 for c in inner)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_balanced_split_is_the_best_contiguous_one(seed):
    rng = random.Random(seed)
    shape = ModelShape(n_layers=rng.randint(2, 7), hidden=rng.choice([64, 96]), intermediate=rng.randint(40, 400),
                       n_heads=4, n_kv_heads=rng.choice([1, 2, 4]), vocab=rng.randint(50, 3000))
    for n_stages in range(1, shape.n_layers + 1):
        for halves in (True, False):
            split = balanced_split(shape, n_stages, halves)
            assert split.cuts[0] == 0 and split.cuts[-1] == 2 * shape.n_layers and len(split.costs) == n_stages
            assert all(lo < hi for lo, hi in zip(split.cuts, split.cuts[1:]))
            assert halves or all(c % 2 == 0 for c in split.cuts)
            got = (max(split.costs), sum(c % 2 for c in split.cuts))
            assert got == pytest.approx(brute_force(shape, n_stages, halves)), (shape, n_stages, halves)


def test_a_cut_inside_a_block_spreads_the_heads_cost_at_7b_on_4_stages():
    whole, halves = balanced_split(SHAPE_7B, 4, halves=False), balanced_split(SHAPE_7B, 4)
    share = [round(100 * c / sum(halves.costs), 1) for c in halves.costs]
    assert [round(100 * c / sum(whole.costs), 1) for c in whole.costs] == [24.5, 24.5, 24.5, 26.5]
    assert share == [24.5, 24.5, 25.5, 25.5] and halves.cuts == (0, 16, 32, 49, 64)
    assert halves.describe().splitlines()[2:] == [
        "stage 2: blocks 16..23 + attention of 24 (25.5% of cost)",
        "stage 3: MLP of 24 + blocks 25..31 + norm/head/loss (25.5% of cost)",
    ]
    assert balanced_split(SHAPE_7B, 3).cuts == balanced_split(SHAPE_7B, 3, halves=False).cuts  # no gain: whole blocks


def test_splits_by_hand_and_their_description():
    shape = ModelShape(n_layers=4, hidden=64, intermediate=172, n_heads=4, n_kv_heads=2, vocab=1000)
    split = explicit_split(shape, [1.5, 2, 0.5])
    assert split.cuts == (0, 3, 7, 8) and split_as_layers(split) == [1.5, 2, 0.5]
    assert [describe_halves(*split.stage_halves(k)) for k in range(3)] == [
        "block 0 + attention of 1", "MLP of 1 + block 2 + attention of 3", "MLP of 3"]
    for bad in ([1.25, 2.75], [2, 1], [0, 4], [4.5, -0.5]):
        with pytest.raises(ValueError, match="positive multiples of 0.5 summing to the model's 4 blocks"):
            explicit_split(shape, bad)


def test_stage_bounds_in_halves():
    bounds = StageBounds.from_halves(3, 8, False, True)
    assert (bounds.start, bounds.end, bounds.mlp_first, bounds.attention_last) == (1, 4, True, False)
    assert bounds.halves == (3, 8)
    assert [bounds.held_parts(i) for i in range(1, 4)] == [("mlp",), ("attention", "mlp"), ("attention", "mlp")]
    assert StageBounds.from_halves(2, 3, True, False).held_parts(1) == ("attention",)
    with pytest.raises(ValueError, match="empty stage"):
        StageBounds.from_halves(3, 3, False, False)
    with pytest.raises(ValueError, match="holds nothing"):
        StageBounds(1, 2, False, False, mlp_first=True, attention_last=True)


def _chain(model: Path, cuts: tuple[int, ...], checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    """The stages at these cuts run one after another (a pipeline in one process): the
    last stage's output, every adapter gradient by linear and tensor, the stages."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (3, 11), generator=gen)
    layout = BatchLayout(3, 11, (JobRows("job", 0, 3, 11, 7),))
    stages, grads, hidden = [], {}, ids
    adapters = []
    for k in range(len(cuts) - 1):
        stage = load_stage(model, StageBounds.from_halves(cuts[k], cuts[k + 1], k == 0, k == len(cuts) - 2))
        stage.gradient_checkpointing = checkpointing
        shapes = stage.linear_shapes(("q_proj", "o_proj", "up_proj", "down_proj"))
        adapter = StageAdapter.create("job", 4, 8, 0.1, False, shapes, 3, torch.device("cpu"))
        with torch.no_grad():  # B is zero at creation: give the adapter something to do
            for path, b in adapter.b.items():
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(len(path) + b.numel())) * 0.1)
        stage.routing.adapters["job"] = adapter
        hidden = stage(hidden, layout)
        stages.append(stage)
        adapters.append(adapter)
    hidden.square().mean().backward()
    for adapter in adapters:
        for path in adapter.a:
            grads[f"{path}.A"], grads[f"{path}.B"] = adapter.a[path].grad, adapter.b[path].grad
    return hidden, grads, stages


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_stages_cut_inside_blocks_compose_to_the_whole_model(tiny_models, arch, checkpointing):
    """Halves on different stages give the one-stage model's output and adapter
    gradients (LoRA dropout on: each linear's mask does not depend on the split); a stage
    keeps only the parts it runs."""
    n = 2 * stage_shape(str(tiny_models[arch])).n_layers
    want, want_grads, _ = _chain(tiny_models[arch], (0, n), checkpointing)
    got, got_grads, stages = _chain(tiny_models[arch], (0, 3, 4, n - 1, n), checkpointing)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)
    # stage 0 ends after block 1's attention; stage 1 is block 1's MLP alone
    assert not hasattr(stages[0].layers[1], "mlp") and hasattr(stages[0].layers[1], "self_attn")
    assert [p.rsplit(".", 2)[-2] for p in stages[1].lora_linears] == ["mlp"] * 3
    assert not hasattr(stages[1].layers[0], "self_attn") and not hasattr(stages[1].layers[0], "input_layernorm")


def test_a_stage_without_any_of_a_jobs_linears_steps_an_empty_slice(tiny_models, tmp_path):
    """A stage of MLP halves holds nothing of a job adapting q and v: its slice is empty,
    its steps advance only the schedule, and its checkpoint slice loads back."""
    path = write_run(tmp_path / "run.yaml", {
        "model": {"path": str(tiny_models["llama"])},
        "jobs": [{"name": "qv", "dataset": "x.jsonl", "target_modules": ["q_proj", "v_proj"], "max_steps": 10,
                  "lr_scheduler": "linear", "max_grad_norm": 1.0}],
    })
    job = load_run_file(path, check_paths=False).jobs[0]
    stage = load_stage(tiny_models["llama"], StageBounds.from_halves(1, 2, False, False))
    adapter = StageAdapter.create("qv", 8, 16, 0.0, False, stage.linear_shapes(job.target_modules), 0, torch.device("cpu"))
    opt = JobOptimizer(job, adapter, 10, torch.device("cpu"))
    assert adapter.parameters() == [] and opt.optimizer is None
    assert opt.grad_sq_norm().item() == 0.0
    lrs = [opt.lr]
    for _ in range(3):
        opt.step(torch.tensor(0.0))
        lrs.append(opt.lr)
    assert lrs == pytest.approx([job.learning_rate * (1 - s / 10) for s in range(4)])
    again = JobOptimizer(job, adapter, 10)
    again.load_state_dict(opt.state_dict())
    assert again.steps_done == 3 and again.lr == pytest.approx(lrs[-1])


def _pipeline_spec(tmp_path: Path, model: Path, **run) -> object:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(8)))
    path = write_run(tmp_path / "run.yaml", {
        "model": {"path": str(model)},
        "jobs": [{"name": "a", "dataset": str(data)}, {"name": "b", "dataset": str(data)}],
        "run": {"output_dir": str(tmp_path / "out"), **run},
    })
    return load_run_file(path)


def _checkpoint(out: Path, job: str, step: int, split: list | None, n_slices: int) -> None:
    folder = out / job / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    state = {"step": step, "tokens": 0, "losses": []} | ({"split": split} if split is not None else {})
    (folder / "state.json").write_text(json.dumps(state))
    for k in range(n_slices):
        (folder / f"stage{k}.pt").write_bytes(b"")


def test_a_resumed_pipeline_keeps_the_split_its_checkpoints_were_written_under(tmp_path, tiny_models):
    spec = _pipeline_spec(tmp_path, tiny_models["llama"])
    out = tmp_path / "out"
    assert split_model(spec, 2)[0][0].halves == (0, 5)  # what a new 2-stage run takes
    _checkpoint(out, "a", 2, [[0, 3], [3, 8]], 2)
    written = resumed_split(spec, out)
    assert written == (2, ((0, 3), (3, 8)))
    bounds, text, _ = split_model(spec, 2, written)
    assert [b.halves for b in bounds] == [(0, 3), (3, 8)] and "attention of 1" in text
    # a split given by hand must be that one
    fixed = _pipeline_spec(tmp_path, tiny_models["llama"], layers_per_stage=[3, 1])
    with pytest.raises(ConfigError, match=r"run: layers_per_stage: \[3, 1\] is not the split its checkpoints were "
                                          r"written with \(\[1.5, 2.5\]\)"):
        split_model(fixed, 2, written)
    assert [b.halves for b in split_model(_pipeline_spec(tmp_path, tiny_models["llama"], layers_per_stage=[1.5, 2.5]),
                                          2, written)[0]] == [(0, 3), (3, 8)]
    # checkpoints from before splits were recorded: whole blocks, as then
    assert [b.halves for b in split_model(spec, 2, (2, None))[0]] == [(0, 6), (6, 8)]
    _checkpoint(out, "b", 2, [[0, 6], [6, 8]], 2)
    with pytest.raises(ConfigError, match="jobs 'a', 'b' .* were written under different pipeline splits"):
        resumed_split(spec, out)
    # a job checkpointed before splits were recorded, beside one resumed since (whole blocks kept)
    _checkpoint(out, "a", 4, None, 2)
    assert resumed_split(spec, out) == (2, ((0, 6), (6, 8)))


def test_resume_refuses_another_number_of_stages_before_reading_anything(tmp_path, tiny_models):
    spec = _pipeline_spec(tmp_path, tiny_models["llama"])
    out = tmp_path / "out"
    _checkpoint(out, "a", 2, [[0, 8]], 1)
    with pytest.raises(ConfigError, match=r"job 'a': --resume: its checkpoint step-000002 was written by one process, "
                                          r"and this run has 2 processes; resume it with one process"):
        check_resumable(spec, out, 2)
    check_resumable(spec, out, 1)
    _checkpoint(out, "b", 4, None, 3)  # before splits were recorded: a slice per stage
    _checkpoint(out, "b", 6, None, 1)  # the newest cut short by a crash
    with pytest.raises(ConfigError, match=r"job 'b': .* written by a 3-stage pipeline \(3 processes\), and this run "
                                          r"has one process"):
        check_resumable(spec, out, 1)


def test_cuts_inside_blocks_bring_the_predicted_4_stage_7b_bubble_under_5_percent():
    """bench/pipeline/predict_bubble.py, issue 6's configuration (8 jobs, 4 x 512 a step,
    50 steps): whole blocks give the 6.9 % the simulator predicted before cuts inside
    blocks existed (bench/README.md), the default split less than 5 %."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "pipeline" / "predict_bubble.py"
    spec = importlib.util.spec_from_file_location("predict_bubble", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    whole, halves = (balanced_split(module.SHAPES["7b"], 4, cut) for cut in (False, True))
    assert round(100 * module.bubble(whole.costs, 8, 50), 1) == 6.9
    assert 100 * module.bubble(halves.costs, 8, 50) < 5.0
