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
from mlora.jobs.loss_scale import LossScaler
from mlora.jobs.lr import lr_factor
from mlora.model.lora_linear import StageAdapter


def build_optimizer(spec: JobSpec, params: list[torch.nn.Parameter], skips: bool = False) -> torch.optim.Optimizer:
    """AdamW (default) or SGD with the job's hyper-parameters. `skips`: the step may be
    skipped on the device (loss scaling), which the fused implementations do (`found_inf`)."""
    if spec.optimizer == "adamw":
        fused = skips or (bool(params) and params[0].is_cuda)
        return torch.optim.AdamW(
            params,
            lr=spec.learning_rate,
            betas=(spec.adam_beta1, spec.adam_beta2),
            eps=spec.adam_epsilon,
            weight_decay=spec.weight_decay,
            fused=fused or None,  # one kernel for all of a job's tensors on CUDA
            foreach=None if fused else True,  # CPU: multi-tensor ops, not a Python loop over hundreds of tensors
        )
    if spec.optimizer == "sgd":
        sgd = torch.optim.SGD(
            params, lr=spec.learning_rate, momentum=spec.momentum, weight_decay=spec.weight_decay,
            fused=skips or None, foreach=None if skips else True,
        )
        if skips and spec.momentum:
            # a first step skipped would leave fused SGD's new momentum buffer uninitialised;
            # zeros from the start give what "the first gradient" gives (no dampening)
            for p in params:
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return sgd
    raise ValueError(f"unknown optimizer {spec.optimizer!r}")


def flatten_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Move params (and their gradients) into one buffer per dtype; they become views of it.

    A job's adapter is a few hundred small tensors (A and B of every linear). Stepping,
    clipping and zeroing them tensor by tensor costs milliseconds of host time per step
    for microseconds of GPU work; over one flat buffer each is a single kernel. The
    update is elementwise, so it is the same update. The params stay the same objects
    (the model's linears keep finding them) and keep their gradients, as views, for
    good: autograd adds into a gradient that exists in place.
    """
    groups: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    flats = []
    for group in groups.values():
        flat = torch.cat([p.detach().reshape(-1) for p in group])
        grad = torch.zeros_like(flat)
        at = 0
        for p in group:
            n = p.numel()
            p.data = flat[at : at + n].view_as(p)
            p.grad = grad[at : at + n].view_as(p)
            at += n
        whole = torch.nn.Parameter(flat)
        whole.grad = grad
        flats.append(whole)
    return flats


class JobOptimizer:
    """Optimizer + LR schedule for one job's adapter slice on this stage."""

    def __init__(self, spec: JobSpec, adapter: StageAdapter | Any, total_steps: int,
                 device: torch.device | None = None, loss_scaling: bool = False) -> None:
        """`adapter`: a StageAdapter, or any slice with `parameters()` (a MeteoRA adapter).

        The adapter's tensors are moved into flat buffers (`flatten_params`); gradients
        are zeroed in place after a step, never dropped, so they keep their addresses
        (a CUDA graph adds into them). A pipeline stage may hold none of a job's adapted
        linears (a stage of MLP halves, a job adapting attention only): the slice is then
        empty, and its steps only advance the schedule. `device`: where the stage computes
        (for an empty slice's zero norm). `loss_scaling` (float16): the job's loss is
        scaled (`scaler.scale`) and a step with overflowed gradients skipped (`loss_scale`).
        """
        self.spec, self.adapter, self.total_steps = spec, adapter, total_steps
        self.params = adapter.parameters()
        self.device = self.params[0].device if self.params else (device or torch.device("cpu"))
        self.flat = flatten_params(self.params)
        self.scaler = LossScaler(self.device) if loss_scaling else None
        self.optimizer = build_optimizer(spec, self.flat, skips=loss_scaling) if self.flat else None
        self.steps_done = 0
        self._lr = spec.learning_rate
        self._set_lr()

    def _set_lr(self) -> None:
        factor = lr_factor(self.steps_done, self.spec.warmup_steps, self.total_steps, self.spec.lr_scheduler)
        self._lr = self.spec.learning_rate * factor
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = self._lr

    @property
    def lr(self) -> float:
        return float(self._lr)

    def grad_sq_norm(self) -> Tensor:
        """Sum of squared gradient entries of this slice (fp32, on the stage's device)."""
        if not self.flat:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        return sum(torch.linalg.vector_norm(p.grad, dtype=torch.float32).square() for p in self.flat)  # type: ignore[return-value]

    @property
    def needs_norm(self) -> bool:
        """Whether a step needs the whole adapter's gradient norm: to clip, or (loss
        scaling) to know whether any stage's gradients overflowed."""
        return self.spec.max_grad_norm is not None or self.scaler is not None

    def step(self, total_norm: Tensor | None) -> None:
        """Unscale (loss scaling), clip by the whole adapter's norm, step (skipped on the
        device if the norm is not finite), advance the LR schedule, clear grads.

        `total_norm` is the norm of the gradients as they are (scaled, under loss scaling).
        A skipped step still counts towards the job's steps and its LR schedule."""
        coef: Tensor | None = None
        found_inf: Tensor | None = None
        if self.scaler is not None:
            assert total_norm is not None, "a loss-scaled step needs the gradient norm"
            total_norm = total_norm.to(self.device, torch.float32)
            found_inf = (~torch.isfinite(total_norm)).float()
            coef = self.scaler.scale.reciprocal()
            total_norm = total_norm * coef
        if self.spec.max_grad_norm is not None and total_norm is not None:
            clip = torch.clamp(self.spec.max_grad_norm / (total_norm + 1e-6), max=1.0)
            coef = clip if coef is None else coef * clip
        if coef is not None:
            for p in self.flat:
                p.grad.mul_(coef.to(p.device))
        if self.optimizer is not None:
            if found_inf is not None:
                self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]  # read by the fused step
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=False)
        if self.scaler is not None:
            assert found_inf is not None
            self.scaler.update(found_inf)
        self.steps_done += 1
        self._set_lr()

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            **({"loss_scale": self.scaler.state_dict()} if self.scaler is not None else {}),
            "params": [p.detach().clone() for p in self.params],  # the trained tensors, in the optimizer's order
        }

    def _flat_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """An optimizer state saved tensor by tensor (checkpoints from before the flat
        buffers) as the state of the one flat buffer: moments concatenated in the same
        order, step counts kept. Anything else is returned as it is."""
        groups = saved["param_groups"]
        per_tensor = len(groups) == 1 and len(groups[0]["params"]) == len(self.params) > 1
        if len(self.flat) != 1 or not per_tensor:
            return saved
        per = [saved["state"].get(i, {}) for i in groups[0]["params"]]
        if not all(per):
            return saved
        merged = {}
        for name, value in per[0].items():
            if torch.is_tensor(value) and value.dim() > 0:  # moments, momentum buffers
                merged[name] = torch.cat([t[name].reshape(-1) for t in per])
            else:  # step counts: the same for every tensor
                merged[name] = value.clone() if torch.is_tensor(value) else value
        return {"state": {0: merged}, "param_groups": [{**groups[0], "params": [0]}]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["params"]
        if len(saved) != len(self.params) or any(s.shape != p.shape for s, p in zip(saved, self.params)):
            raise ValueError("checkpoint does not match this job's adapter slice (other ranks, targets or stage split)")
        try:
            if self.optimizer is not None:
                self.optimizer.load_state_dict(self._flat_state(state["optimizer"]))
        except ValueError as exc:
            raise ValueError(f"checkpoint's optimizer state does not fit this job's optimizer ({exc})") from exc
        with torch.no_grad():
            for param, value in zip(self.params, saved):
                param.copy_(value)
        self.steps_done = int(state["steps_done"])
        if self.scaler is not None and "loss_scale" in state:
            self.scaler.load_state_dict(state["loss_scale"])
        self._set_lr()
