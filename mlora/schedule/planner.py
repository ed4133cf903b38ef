"""Which jobs' next micro-batches go together into one fused batch (one process).

Pure: it sees only each job's pending micro-batch size, never tensors. Jobs are taken
in rotating order so that, when the token budget cannot hold all of them, no job waits
more than a turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Candidate:
    """A job's pending micro-batch: how many rows, and its longest row."""

    job: str
    rows: int
    max_len: int


def plan_fused_batch(candidates: Sequence[Candidate], max_tokens: int, turn: int = 0) -> list[int]:
    """Indices of the candidates to fuse: rows × padded length stays within max_tokens.

    Starts at candidate `turn % n`; the first one is always taken, even if it alone
    exceeds the budget (a micro-batch is never split: that would change the job).
    """
    n = len(candidates)
    if n == 0:
        return []
    chosen: list[int] = []
    rows, length = 0, 0
    for k in range(n):
        i = (turn + k) % n
        c = candidates[i]
        new_rows, new_len = rows + c.rows, max(length, c.max_len)
        if chosen and new_rows * new_len > max_tokens:
            continue
        chosen.append(i)
        rows, length = new_rows, new_len
    return sorted(chosen)
