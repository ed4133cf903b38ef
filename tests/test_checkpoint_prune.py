"""save_total_limit: older checkpoints go only once enough newer ones are complete."""

from __future__ import annotations

import json
from pathlib import Path

from mlora.runtime.checkpoint import latest_checkpoint, prune_checkpoints


def make(out: Path, step: int, slices: int, state: bool = True) -> Path:
    folder = out / "job" / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    if state:
        (folder / "state.json").write_text(json.dumps({"step": step}))
    for k in range(slices):
        (folder / f"stage{k}.pt").write_bytes(b"x")
    return folder


def names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "job" / "checkpoints").iterdir())


def test_only_folders_older_than_the_newest_complete_ones_go(tmp_path):
    for step in (2, 4, 6):
        make(tmp_path, step, slices=2)
    make(tmp_path, 8, slices=1)  # a slice still on its way
    make(tmp_path, 10, slices=2, state=False)  # the driver's progress not yet written
    (tmp_path / "job" / "checkpoints" / ".step-000012.tmp").mkdir()  # being written under its temporary name
    gone = prune_checkpoints(tmp_path, "job", keep=2, n_stages=2)
    assert [p.name for p in gone] == ["step-000002"]
    assert names(tmp_path) == [".step-000012.tmp", "step-000004", "step-000006", "step-000008", "step-000010"]
    assert latest_checkpoint(tmp_path, "job", 2).name == "step-000006"
    # fewer complete than kept: nothing goes
    assert prune_checkpoints(tmp_path, "job", keep=3, n_stages=2) == []
    # one complete kept: everything older than it goes, the newer incomplete ones stay
    prune_checkpoints(tmp_path, "job", keep=1, n_stages=2)
    assert names(tmp_path) == [".step-000012.tmp", "step-000006", "step-000008", "step-000010"]
    assert prune_checkpoints(tmp_path, "other", keep=1) == []  # a job without checkpoints
