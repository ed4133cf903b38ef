"""Dynamic loss scaling for a job trained in float16, one scale per job.

float16 keeps 5 exponent bits: gradients of the activations below ~6e-8 flush to zero
and a LoRA adapter's small updates are lost. As torch.amp.GradScaler does (and Hugging
Face's Trainer with fp16), the loss is multiplied by a scale S before the backward and
the gradients divided by it before the step; a step whose gradients overflowed (inf or
nan anywhere in the job's adapter) is skipped and S halved, and S doubles after 2,000
steps in a row without one. GradScaler's defaults, kept per job: a job's gradients come
from its own rows only, so one job's overflow never costs another job its step.

Everything stays on the device (no host sync in a step, a CUDA graph reads S from the
same tensor): the skip is the fused optimizer's `found_inf`, the update
`torch._amp_update_scale_`. S is always a power of two, so scaling and unscaling a loss
value is exact. Under pipelining every stage keeps its own copy of each job's S and
updates it from the same whole-adapter gradient norm, so the copies stay equal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

INIT_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000


class LossScaler:
    """One job's loss scale and its count of finite steps since the last change."""

    def __init__(self, device: torch.device) -> None:
        self.scale = torch.full((), INIT_SCALE, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def update(self, found_inf: Tensor) -> None:
        """After a step: halve S if it overflowed (found_inf = 1.0), else count towards doubling."""
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, GROWTH_FACTOR, BACKOFF_FACTOR,
                                 GROWTH_INTERVAL)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.detach().cpu().clone(), "growth_tracker": self.growth_tracker.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])
