"""Per-job language-model loss on the last stage.

Only positions with a target token go through the LM head: prompt and pad positions
cost nothing there. Which positions those are is worked out on the host when the batch
is made (`Targets`), so the loss needs no device-to-host sync. The result is each
job's *sum* of token losses; the trainer divides by the job's target-token count for
the whole optimizer step, so a job's loss is the mean over its step's target tokens
however its rows were batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlora.ops import fused_cross_entropy

IGNORE = -100


@dataclass
class Targets:
    """Flat positions (row * seq_len + t) whose next token is a target, and that token."""

    index: Tensor  # [N] positions in the flattened [B*L] hidden states
    token: Tensor  # [N] target token ids
    slot: Tensor  # [N] which micro-batch (job) of the fused batch each belongs to
    n_slots: int

    @classmethod
    def from_labels(cls, labels: Tensor, row_slot: Tensor, n_slots: int) -> "Targets":
        """labels [B, L] (-100 where no loss), on the host; position t predicts labels[t+1]."""
        rows, seq_len = labels.shape
        keep = labels[:, 1:] != IGNORE
        r, t = keep.nonzero(as_tuple=True)
        return cls(index=r * seq_len + t, token=labels[r, t + 1], slot=row_slot[r], n_slots=n_slots)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Targets":
        move = lambda x: x.to(device, non_blocking=non_blocking)  # noqa: E731
        return Targets(move(self.index), move(self.token), move(self.slot), self.n_slots)

    def pin_memory(self) -> "Targets":
        return Targets(self.index.pin_memory(), self.token.pin_memory(), self.slot.pin_memory(), self.n_slots)


def job_loss_sums(lm_head: nn.Module, hidden: Tensor, targets: Targets, fused: bool = True) -> Tensor:
    """Sum of next-token cross-entropy per micro-batch slot; hidden is [B, L, d].

    On CUDA (and `fused`, the stage's `fused_loss`) the loss reads the logits in their
    own dtype (`fused_cross_entropy`); otherwise PyTorch's, on an fp32 copy.
    """
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, targets.index)
    logits = lm_head(picked)
    if fused and fused_cross_entropy.usable(logits):
        losses = fused_cross_entropy.cross_entropy_rows(logits, targets.token)
    else:
        losses = nn.functional.cross_entropy(logits.float(), targets.token, reduction="none")
    sums = torch.zeros(targets.n_slots, dtype=torch.float32, device=hidden.device)
    return sums.index_add_(0, targets.slot, losses)


def full_logits(lm_head: nn.Module, hidden: Tensor) -> Tensor:
    """Logits at every position (generation and parity checks)."""
    return lm_head(hidden)
