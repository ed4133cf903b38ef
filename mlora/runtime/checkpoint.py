"""Checkpoints: per job, per step; each stage writes its own slice, the driver the progress.

A checkpoint folder is written under a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint that --resume would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import torch

from mlora.config import ConfigError, JobSpec, RunSpec
from mlora.runtime.output import checkpoint_root, is_finished, job_dir

STATE = "state.json"
# per stage: job -> the checkpoint steps whose slice of that stage is on the stage's own disk
# (ranks on hosts without a shared file system see only their own slices)
Held = Sequence[Mapping[str, Collection[int]]]


def step_dir(out_dir: Path, job: str, step: int) -> Path:
    return checkpoint_root(out_dir, job) / f"step-{step:06d}"


def write_checkpoint(out_dir: Path, job: str, step: int, stages: dict[int, dict[str, Any]], state: dict[str, Any]) -> Path:
    """stages: stage index → JobOptimizer.state_dict(); state: the driver's progress."""
    final = step_dir(out_dir, job, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for k, stage_state in stages.items():
            torch.save(stage_state, tmp / f"stage{k}.pt")
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)  # a re-run of a step after --resume: same content
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_stage_slice(folder: Path, stage: int, stage_state: dict[str, Any]) -> None:
    """A non-driver stage adds its slice to a checkpoint folder (atomic per file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".stage{stage}.pt.tmp"
    torch.save(stage_state, tmp)
    os.replace(tmp, folder / f"stage{stage}.pt")


def step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def local_slices(out_dir: Path, jobs: Sequence[str], stage: int) -> dict[str, list[int]]:
    """The checkpoint steps of each job whose slice of `stage` this machine holds."""
    return {job: sorted(step_of(f.parent) for f in checkpoint_root(out_dir, job).glob(f"step-*/stage{stage}.pt"))
            for job in jobs}


def _slices_there(folder: Path, job: str, n_stages: int, held: Held | None) -> bool:
    """Every stage's slice of this checkpoint written: on this disk, or (`held`) on each stage's own."""
    if held is None:
        return all((folder / f"stage{k}.pt").is_file() for k in range(n_stages))
    return len(held) >= n_stages and all(step_of(folder) in held[k].get(job, ()) for k in range(n_stages))


def latest_checkpoint(out_dir: Path, job: str, n_stages: int = 1, held: Held | None = None) -> Path | None:
    """The newest complete checkpoint of a job: state.json and every stage's slice present
    (`held`: as each stage reports its own, where the ranks do not share this folder)."""
    root = checkpoint_root(out_dir, job)
    if not root.is_dir():
        return None
    for folder in sorted(root.glob("step-*"), reverse=True):
        if (folder / STATE).is_file() and _slices_there(folder, job, n_stages, held):
            return folder
    return None


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE).read_text())


def adapter_signature(job: JobSpec) -> dict[str, Any]:
    """What a checkpoint's tensors are shaped by: a resumed job must say the same (its
    learning rate, schedule or step count may change; its rank or targets may not)."""
    if job.kind == "meteora":
        return {"kind": job.kind, "adapters": list(job.adapters), "train_loras": job.train_loras, "optimizer": job.optimizer}
    return {"kind": job.kind, "lora_r": job.lora_r, "target_modules": list(job.target_modules), "optimizer": job.optimizer}


def prune_checkpoints(out_dir: Path, job: str, keep: int, n_stages: int = 1) -> list[Path]:
    """Delete a job's checkpoints older than its `keep` newest complete ones (state and
    every stage's slice there); returns the folders deleted. A newer folder still being
    written is kept, and so is every folder when fewer than `keep` are complete, so a
    crash at any moment leaves a checkpoint to resume from."""
    root = checkpoint_root(out_dir, job)
    folders = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    complete = [f for f in folders if (f / STATE).is_file() and _slices_there(f, job, n_stages, None)]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[keep - 1].name
    gone = [f for f in folders if f.name < oldest_kept]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return gone


def delete_stage_slices(out_dir: Path, job: str, stage: int, before: int) -> list[int]:
    """Delete this stage's slices of the job's checkpoints before step `before` on this
    machine's disk (stage 0: their progress too), and each folder left empty; returns the
    steps. For ranks that do not share the output folder, each deleting its own."""
    gone = []
    for folder in checkpoint_root(out_dir, job).glob("step-*"):
        if step_of(folder) >= before:
            continue
        (folder / f"stage{stage}.pt").unlink(missing_ok=True)
        if stage == 0:
            (folder / STATE).unlink(missing_ok=True)
        try:
            folder.rmdir()  # another rank on this machine may still have its slice here
        except OSError:
            pass
        gone.append(step_of(folder))
    return sorted(gone)


def newest_state(out_dir: Path, job: str) -> Path | None:
    """The newest checkpoint folder of a job with its progress written, whatever its slices."""
    root = checkpoint_root(out_dir, job)
    folders = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    return next((f for f in folders if (f / STATE).is_file()), None)


def written_split(folder: Path, held: Held | None = None) -> tuple[int, tuple[tuple[int, int], ...] | None]:
    """How many stages wrote a checkpoint, and their split (halves per stage; None when
    written before checkpoints recorded it: whole blocks, one slice per stage, the most
    any of the job's checkpoints has, as a crash may have cut the newest short; counted
    on this disk and, with `held`, on each stage's own)."""
    split = read_state(folder).get("split")
    if split is None:
        job, folders = folder.parent.parent.name, list(folder.parent.glob("step-*"))
        here = max(len(list(f.glob("stage*.pt"))) for f in folders)
        reported = max(sum(step_of(f) in h.get(job, ()) for h in held) for f in folders) if held else 0
        return max(here, reported), None
    return len(split), tuple((int(lo), int(hi)) for lo, hi in split)


def resumed_split(spec: RunSpec, out_dir: Path, held: Held | None = None
                  ) -> tuple[int, tuple[tuple[int, int], ...] | None] | None:
    """The split the checkpoints of the run's unfinished jobs were written under (as
    `written_split`), None if none has a checkpoint; a ConfigError if they disagree. A
    checkpoint from before splits were recorded agrees with a recorded split of whole
    blocks over as many stages (a run resumed since has recorded the split it kept)."""
    found: dict[Any, str] = {}
    for job in spec.jobs:
        folder = newest_state(out_dir, job.name)
        if folder is not None and not is_finished(job_dir(out_dir, job.name)):
            found.setdefault(written_split(folder, held), job.name)
    recorded = [w for w in found if w[1] is not None]
    if len(recorded) == 1 and all(lo % 2 == 0 for lo, _ in recorded[0][1]):
        found = {w: name for w, name in found.items() if w[1] is not None or w[0] != recorded[0][0]}
    if len(found) > 1:
        names = ", ".join(repr(name) for name in found.values())
        raise ConfigError(f"{spec.source}: --resume: the checkpoints of jobs {names} in {out_dir} were written "
                          "under different pipeline splits; resume those jobs in separate output_dirs")
    return next(iter(found), None)


def check_resumable(spec: RunSpec, out_dir: Path, n_stages: int = 1, held: Held | None = None) -> None:
    """Before any weight is read: each job's newest checkpoint was written by as many
    stages as will resume it and for the adapter the run file describes now, else a
    ConfigError naming the job and what changed. `held` as for `latest_checkpoint`."""
    for job in spec.jobs:
        newest = newest_state(out_dir, job.name)
        if newest is not None and not is_finished(job_dir(out_dir, job.name)):
            written = written_split(newest, held)[0]
            if written != n_stages:
                how = "one process" if written == 1 else f"a {written}-stage pipeline ({written} processes)"
                now = "one process" if n_stages == 1 else f"{n_stages} processes"
                raise ConfigError(
                    f"{spec.source}: job {job.name!r}: --resume: its checkpoint {newest.name} was written by {how}, "
                    f"and this run has {now}; resume it with {how}"
                )
        folder = latest_checkpoint(out_dir, job.name, n_stages, held)
        if folder is None or is_finished(job_dir(out_dir, job.name)):  # a finished job is not trained again
            continue
        saved = read_state(folder).get("adapter")
        if saved is None:  # written before checkpoints recorded it: the tensors' shapes are checked on load
            continue
        now = adapter_signature(job)
        changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if changed:
            raise ConfigError(
                f"{spec.source}: job {job.name!r}: --resume: its checkpoint {folder.name} was written for another "
                f"adapter ({'; '.join(changed)}); put the run file back as it was for this job, or train it into "
                "another output_dir"
            )


def read_stage_slice(folder: Path, stage: int) -> dict[str, Any]:
    return torch.load(folder / f"stage{stage}.pt", map_location="cpu", weights_only=False)
