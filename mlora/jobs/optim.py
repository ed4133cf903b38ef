"""A job's optimizer over the slice of its adapter that one stage holds.

Gradient clipping uses the norm over the *whole* adapter: under pipelining each stage
contributes its squared norm and the runtime sums them, so clipping (and so the
adapter) is the same however the model is cut.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mlora.config import JobSpec
from mlora.jobs.lr import lr_factor
from mlora.model.lora_linear import StageAdapter


def build_optimizer(spec: JobSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (default) or SGD with the job's hyper-parameters."""
    if spec.optimizer == "adamw":
        on_gpu = bool(params) and params[0].is_cuda
        return torch.optim.AdamW(
            params,
            lr=spec.learning_rate,
            betas=(spec.adam_beta1, spec.adam_beta2),
            eps=spec.adam_epsilon,
            weight_decay=spec.weight_decay,
            fused=on_gpu or None,  # one kernel for all of a job's tensors on CUDA
            foreach=None if on_gpu else True,  # CPU: multi-tensor ops, not a Python loop over hundreds of tensors
        )
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=spec.learning_rate, momentum=spec.momentum, weight_decay=spec.weight_decay, foreach=True
        )
    raise ValueError(f"unknown optimizer {spec.optimizer!r}")


class JobOptimizer:
    """Optimizer + LR schedule for one job's adapter slice on this stage."""

    def __init__(self, spec: JobSpec, adapter: StageAdapter | Any, total_steps: int) -> None:
        """`adapter`: a StageAdapter, or any slice with `parameters()` (a MeteoRA adapter)."""
        self.spec, self.adapter, self.total_steps = spec, adapter, total_steps
        self.params = adapter.parameters()
        self.optimizer = build_optimizer(spec, self.params)
        self.steps_done = 0
        self._set_lr()

    def _set_lr(self) -> None:
        factor = lr_factor(self.steps_done, self.spec.warmup_steps, self.total_steps, self.spec.lr_scheduler)
        for group in self.optimizer.param_groups:
            group["lr"] = self.spec.learning_rate * factor

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def grad_sq_norm(self) -> Tensor:
        """Sum of squared gradient entries of this slice (fp32, on the params' device)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            device = self.params[0].device if self.params else torch.device("cpu")
            return torch.zeros((), dtype=torch.float32, device=device)
        norms = torch._foreach_norm(grads)  # multi-tensor: a few kernels for hundreds of tensors
        return torch.stack(norms).float().pow(2).sum()

    def step(self, total_norm: Tensor | None) -> None:
        """Clip by the whole adapter's norm, step, advance the LR schedule, clear grads."""
        if self.spec.max_grad_norm is not None and total_norm is not None:
            coef = torch.clamp(self.spec.max_grad_norm / (total_norm + 1e-6), max=1.0)
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self._set_lr()

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "optimizer": self.optimizer.state_dict(),
            "params": [p.detach().clone() for p in self.params],  # the trained tensors, in the optimizer's order
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["params"]
        if len(saved) != len(self.params) or any(s.shape != p.shape for s, p in zip(saved, self.params)):
            raise ValueError("checkpoint does not match this job's adapter slice (other ranks, targets or stage split)")
        with torch.no_grad():
            for param, value in zip(self.params, saved):
                param.copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done = int(state["steps_done"])
        self._set_lr()
