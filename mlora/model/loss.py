"""Per-job language-model loss on the last stage.

Only positions with a target token (labels != -100) go through the LM head: prompt and
pad positions cost nothing there. The result is each job's *sum* of token losses; the
trainer divides by the job's target-token count for the whole optimizer step, so a job's
loss is the mean over its step's target tokens however its rows were batched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IGNORE = -100


def job_loss_sums(lm_head: nn.Module, hidden: Tensor, labels: Tensor, row_job: Tensor, n_jobs: int) -> Tensor:
    """Sum of next-token cross-entropy per job: hidden [B, L, d], labels [B, L], row_job [B]."""
    target = labels[:, 1:]
    keep = target != IGNORE
    picked = hidden[:, :-1][keep]
    logits = lm_head(picked).float()
    losses = nn.functional.cross_entropy(logits, target[keep], reduction="none")
    job_of_token = row_job[:, None].expand_as(target)[keep]
    return torch.zeros(n_jobs, dtype=torch.float32, device=hidden.device).index_add_(0, job_of_token, losses)
