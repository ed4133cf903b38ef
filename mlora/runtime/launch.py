"""Choosing how a run executes: one process, or one process per pipeline stage."""

from __future__ import annotations

from typing import Sequence


def train_from_cli(run_file: str, overrides: Sequence[str], *, resume: bool, overwrite: bool, live: bool | None) -> int:
    """Under torchrun with several processes, a pipeline; otherwise the single-process trainer.

    Returns the exit status: 0 when every job finished, 130 when interrupted (Ctrl-C).
    """
    from mlora.runtime.pipeline import is_pipeline_launch, run_pipeline

    if is_pipeline_launch():
        return run_pipeline(run_file, overrides, resume=resume, overwrite=overwrite, live=live)
    from mlora.config import load_run_file
    from mlora.runtime.trainer import train

    spec = load_run_file(run_file, overrides)
    result = train(spec, resume=resume, overwrite=overwrite, live=live)
    return 130 if result.interrupted else 1 if result.stopped_early else 0  # 130: the shell's code for Ctrl-C
