"""Learning-rate schedules, as Hugging Face Trainer computes them (so curves compare)."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    Warm-up is linear from 0 (HF's convention: step 0 of a warm-up trains at lr 0);
    then constant, linear decay to 0, or half a cosine to 0 at `total_steps`.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    raise ValueError(f"unknown lr_scheduler {kind!r}")
