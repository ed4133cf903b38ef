"""Choosing how a run executes: one process, or one process per pipeline stage."""

from __future__ import annotations

from typing import Any

from mlora.config import RunSpec


def train_from_cli(spec: RunSpec, **kwargs: Any) -> int:
    """Run the single-process trainer; exit status 0 when every job finished."""
    from mlora.runtime.trainer import train

    result = train(spec, **kwargs)
    return 0 if not result.stopped_early else 1
