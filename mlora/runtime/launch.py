"""Choosing how a run executes: one process, or one process per pipeline stage."""

from __future__ import annotations

from typing import Sequence


def train_from_cli(run_file: str, overrides: Sequence[str], *, resume: bool, overwrite: bool, live: bool | None) -> int:
    """Under torchrun with several processes, a pipeline; otherwise the single-process trainer.

    Returns the exit status: 0 when every job finished; 128 + the signal's number when
    interrupted (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process the signal ended.
    """
    from mlora.runtime.pipeline import is_pipeline_launch, run_pipeline

    if is_pipeline_launch():
        return run_pipeline(run_file, overrides, resume=resume, overwrite=overwrite, live=live)
    from mlora.config import load_run_file
    from mlora.runtime.trainer import train

    spec = load_run_file(run_file, overrides)
    result = train(spec, resume=resume, overwrite=overwrite, live=live)
    if result.interrupted_by:
        return 128 + int(result.interrupted_by)
    return 1 if result.stopped_early or result.failed else 0
