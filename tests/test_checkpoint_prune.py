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


def slices_of(out: Path, job: str = "job") -> list[int]:
    root = out / job / "checkpoints"
    return sorted(int(f.name.split("-")[1]) for f in root.iterdir()) if root.is_dir() else []


def test_ranks_without_a_shared_folder_delete_only_what_every_rank_holds_newer_copies_of(tmp_path):
    """Three ranks, each with its own disk, pass the newest step they and the ranks after
    them hold upstream and rank 0's decision downstream (the notes the pipeline's messages
    carry, passed here by hand): a checkpoint goes on each disk only once every rank
    holds the `keep` newest ones after it, even while one rank's writes lag."""
    from mlora.runtime.slice_pruning import SlicePruner, oldest_kept

    assert oldest_kept([10, 5, 15], 2) == 10 and oldest_kept([5], 2) is None and oldest_kept([5, 5], 2) is None
    disks = [tmp_path / f"rank{k}" for k in range(3)]
    ranks = [SlicePruner(disks[k], k, 3, {"job": 2}, {"job": 0, "other": 1}) for k in range(3)]

    def write(k: int, step: int) -> None:
        make(disks[k], step, slices=0, state=k == 0)
        (disks[k] / "job" / "checkpoints" / f"step-{step:06d}" / f"stage{k}.pt").write_bytes(b"x")
        ranks[k].written({"job": step, "other": step})  # "other" has no limit: ignored

    def pass_notes() -> None:
        for k in (2, 1):  # upstream, then downstream
            for note in ranks[k].take_up():
                ranks[k - 1].absorb(note)
        for k in (0, 1):
            for note in ranks[k].take_down():
                ranks[k + 1].absorb(note)

    for step in (5, 10, 15, 20):
        for k in (0, 1):  # rank 2's writes lag
            write(k, step)
        pass_notes()
    write(2, 5)
    pass_notes()
    assert [slices_of(d) for d in disks] == [[5, 10, 15, 20], [5, 10, 15, 20], [5]]  # rank 2 holds 5 only
    for step in (10, 15):
        write(2, step)
    pass_notes()  # every rank holds 15: keep 10 and 15, delete 5
    assert [slices_of(d) for d in disks] == [[10, 15, 20], [10, 15, 20], [10, 15]]
    write(2, 20)
    pass_notes()
    assert [slices_of(d) for d in disks] == [[15, 20], [15, 20], [15, 20]]
    assert sorted(p.name for p in (disks[0] / "job" / "checkpoints" / "step-000015").iterdir()) == ["stage0.pt", "state.json"]
    # a note that is not the pruner's is left to the stage
    from mlora.runtime.transport import NOTE_LOSS, Note

    assert not ranks[1].absorb(Note(NOTE_LOSS, 0, 3, 1.0))
