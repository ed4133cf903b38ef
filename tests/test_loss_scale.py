"""Dynamic loss scaling of float16 jobs: a scaled step is the unscaled step, an
overflowed one changes nothing but the scale, and the scale grows back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mlora.jobs.loss_scale as loss_scale
from mlora.config import load_run_file
from mlora.jobs.optim import JobOptimizer

from conftest import write_run


class Slice:
    """A job's adapter slice as the optimizer sees it: its parameters."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(4, 6, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.params


def job(tmp_path: Path, **fields):
    path = write_run(tmp_path / "run.yaml", {
        "model": {"path": "model"},
        "jobs": [{"name": "j", "dataset": "x.jsonl", "max_steps": 20, **fields}],
    })
    return load_run_file(path, check_paths=False).jobs[0]


def grads(seed: int, n: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(4, 6, generator=gen) * 0.01, torch.randn(7, generator=gen) * 0.01] for _ in range(n)]


def run(opt: JobOptimizer, steps: list[list[torch.Tensor]], scale: float | None) -> None:
    for step in steps:
        for p, g in zip(opt.params, step):
            p.grad.copy_(g if scale is None else g * scale)
        opt.step(opt.grad_sq_norm().sqrt())


OPTIMIZERS = [
    {},
    {"max_grad_norm": 0.02, "weight_decay": 0.1},  # clipped by the unscaled norm
    {"optimizer": "sgd", "momentum": 0.9, "learning_rate": 0.05, "max_grad_norm": 0.05},
]


@pytest.mark.parametrize("fields", OPTIMIZERS, ids=["adamw", "adamw-clipped", "sgd-momentum-clipped"])
def test_a_scaled_step_is_the_unscaled_step(tmp_path, fields):
    spec = job(tmp_path, **fields)
    plain, scaled = JobOptimizer(spec, Slice(0), 20), JobOptimizer(spec, Slice(0), 20, loss_scaling=True)
    steps = grads(1, 4)
    run(plain, steps, None)
    run(scaled, steps, 2.0**16)
    for a, b in zip(plain.params, scaled.params):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert scaled.scaler.scale.item() == 2.0**16 and scaled.scaler.growth_tracker.item() == 4


@pytest.mark.parametrize("fields", OPTIMIZERS, ids=["adamw", "adamw-clipped", "sgd-momentum-clipped"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_an_overflowed_step_changes_nothing_but_the_scale(tmp_path, fields, bad):
    """Skipped first (no optimizer state yet: a fused SGD would keep an uninitialised
    momentum buffer) and in the middle: the run is the one without those steps, the LR
    schedule excepted (a skipped step counts), and the scale halves each time."""
    spec = job(tmp_path, **fields)
    plain, scaled = JobOptimizer(spec, Slice(0), 20), JobOptimizer(spec, Slice(0), 20, loss_scaling=True)
    steps = grads(2, 4)
    overflow = [steps[0][0].clone(), steps[0][1].clone()]
    overflow[1][3] = bad
    run(plain, steps[:2], None)
    plain.steps_done += 1  # where the scaled run skips its third step
    run(plain, steps[2:], None)
    run(scaled, [overflow], 2.0**16)
    assert all(torch.equal(p, q) for p, q in zip(scaled.params, Slice(0).params))
    assert scaled.scaler.scale.item() == 2.0**15 and scaled.steps_done == 1
    scaled.steps_done -= 1  # the plain run has no first step to count
    run(scaled, steps[:2], 2.0**15)
    run(scaled, [overflow], 2.0**15)
    assert scaled.scaler.scale.item() == 2.0**14 and scaled.scaler.growth_tracker.item() == 0
    run(scaled, steps[2:], 2.0**14)
    for a, b in zip(plain.params, scaled.params):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_the_scale_doubles_after_a_run_of_finite_steps_and_is_checkpointed(tmp_path, monkeypatch):
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 3)
    spec = job(tmp_path)
    opt = JobOptimizer(spec, Slice(0), 20, loss_scaling=True)
    run(opt, grads(3, 2), 2.0**16)
    assert opt.scaler.scale.item() == 2.0**16 and opt.scaler.growth_tracker.item() == 2
    run(opt, grads(4, 1), 2.0**16)
    assert opt.scaler.scale.item() == 2.0**17 and opt.scaler.growth_tracker.item() == 0
    again = JobOptimizer(spec, Slice(5), 20, loss_scaling=True)
    again.load_state_dict(opt.state_dict())
    assert again.scaler.scale.item() == 2.0**17 and again.steps_done == 3
    assert all(torch.equal(p, q) for p, q in zip(again.params, opt.params))
