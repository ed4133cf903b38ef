"""The run's output folder: refusing to clobber it, and where each file goes.

OUTPUT/
  run_summary.json, report.png, trace.json, tensorboard/, eval/ (`mlora eval`): no job may take these names
  <job>/adapter_config.json + adapter_model.safetensors   (the PEFT adapter, when finished)
  <job>/metrics.jsonl
  <job>/checkpoints/step-000010/{stage0.pt, state.json}
"""

from __future__ import annotations

import shutil
from pathlib import Path

SUMMARY = "run_summary.json"
TRACE = "trace.json"  # a pipeline run's trace
SHARED_MARKER = ".mlora-shared-"  # + a random name: a pipeline's ranks check they share the folder


class OutputError(ValueError):
    """The output folder cannot be used as asked (it holds work that would be lost)."""


def is_run_dir(path: Path) -> bool:
    return (path / SUMMARY).is_file()


def prepare_output(out_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Make the folder ready; never lose a user's earlier results without --overwrite.

    - new or empty folder (a pipeline's marker left by a run stopped as it began counts as
      empty): used as is;
    - earlier mlora run: --resume continues it, --overwrite deletes it, else refuse;
    - a folder with other content: refused even with --overwrite (it is not ours).
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise OutputError(f"{out_dir}: --resume and --overwrite contradict each other; choose one")
    if not out_dir.exists() or all(p.name.startswith(SHARED_MARKER) for p in out_dir.iterdir()):
        if resume:
            raise OutputError(f"{out_dir}: nothing to resume (no earlier run there)")
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir
    if not is_run_dir(out_dir):
        raise OutputError(f"{out_dir}: exists and is not an mlora run folder (no {SUMMARY}); choose another output_dir")
    if resume:
        return out_dir
    if not overwrite:
        raise OutputError(
            f"{out_dir}: holds an earlier run; pass --resume to continue it or --overwrite to replace it"
        )
    shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return out_dir


def job_dir(out_dir: Path, job: str) -> Path:
    return out_dir / job


def slices_dir(out: Path, job: str) -> Path:
    """Where the stages put their slices of a finished job for rank 0 (removed once written)."""
    return job_dir(out, job) / ".stage-slices"


def checkpoint_root(out_dir: Path, job: str) -> Path:
    return out_dir / job / "checkpoints"


def is_finished(folder: Path) -> bool:
    """A job folder holding a complete output: a PEFT adapter or a MeteoRA folder
    (each written with its config last, so the config means complete)."""
    return (folder / "adapter_config.json").is_file() or (folder / "meteora_config.json").is_file()
