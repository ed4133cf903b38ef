"""save_total_limit in a pipeline whose ranks do not share the output folder.

Each rank writes its checkpoint slices to its own disk (hosts without a shared file
system), so no one rank can see which checkpoints are complete, and deleting on one
rank's word could leave no step that every rank still holds. The ranks tell each other
with notes riding the pipeline's own messages (a collective in the middle of the action
lists would stall the schedule):

- upstream, with gradients: the newest checkpoint step of a job that this rank and every
  rank after it has written (one writer thread writes in order, so every earlier
  checkpoint of this run is written too);
- rank 0 takes the minimum with its own: the newest step every rank holds. Counting back
  `save_total_limit` checkpoints from it (among those on rank 0's disk) gives the oldest
  to keep; rank 0 deletes its own older ones and sends "delete before step s"
  downstream with activations, each rank deleting its own slices as the note passes.

So a checkpoint goes only once every rank holds the job's newest `save_total_limit`
ones after it, and --resume always finds a step that all ranks have. At the end of the
run, every write done, one all_gather of the steps each rank holds settles the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch.distributed as dist

from mlora.runtime.checkpoint import delete_stage_slices, local_slices
from mlora.runtime.transport import NOTE_CKPT_CUT, NOTE_CKPT_HELD, Note


def oldest_kept(steps: list[int], keep: int) -> int | None:
    """The `keep`-th newest of `steps` (every older one may go), or None when fewer."""
    ordered = sorted(set(steps))
    return ordered[-keep] if len(ordered) >= keep else None


class SlicePruner:
    """One rank's part: what it and the ranks after it hold, and the deletions it applies."""

    def __init__(self, out_dir: Path, rank: int, n_ranks: int, keep: Mapping[str, int],
                 job_ids: Mapping[str, int]) -> None:
        """`keep`: save_total_limit of each job that has one; `job_ids`: the notes' job numbers."""
        self.out, self.rank, self.keep = out_dir, rank, dict(keep)
        self.last = rank == n_ranks - 1
        self.job_ids = dict(job_ids)
        self.names = {i: name for name, i in job_ids.items()}
        self.own: dict[str, int] = {}  # newest checkpoint step this rank has written
        self.after: dict[str, int] = {}  # the same, over every rank after this one
        self.told: dict[str, int] = {}  # what was last sent upstream
        self.cut: dict[str, int] = {}  # checkpoints before this step are deleted here
        self.up: list[Note] = []
        self.down: list[Note] = []

    def written(self, newest: Mapping[str, int]) -> None:
        """This rank's writer's newest written checkpoint slice per job."""
        for job, step in newest.items():
            if job in self.keep and step > self.own.get(job, -1):
                self.own[job] = step
                self._held_changed(job)

    def absorb(self, note: Note) -> bool:
        """Take one note from a neighbour; False if it is not a pruning note."""
        if note.kind not in (NOTE_CKPT_HELD, NOTE_CKPT_CUT):
            return False
        job = self.names[note.job]
        if note.kind == NOTE_CKPT_HELD:
            if note.step > self.after.get(job, -1):
                self.after[job] = note.step
                self._held_changed(job)
        elif self._delete_before(job, note.step) and not self.last:
            self.down.append(note)
        return True

    def take_up(self) -> list[Note]:
        """Notes for the next message upstream."""
        notes, self.up = self.up, []
        return notes

    def take_down(self) -> list[Note]:
        """Notes for the next message downstream."""
        notes, self.down = self.down, []
        return notes

    def settle(self) -> None:
        """End of the run (a collective: every rank, every write done): delete what the
        steps all ranks hold allow, whatever notes were still on their way."""
        held: list[dict[str, list[int]]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(held, local_slices(self.out, list(self.keep), self.rank))
        for job, keep in self.keep.items():
            everywhere = set.intersection(*(set(h.get(job, ())) for h in held))
            before = oldest_kept(list(everywhere), keep)
            if before is not None:
                self._delete_before(job, before)

    def _held_changed(self, job: str) -> None:
        if job not in self.own or (not self.last and job not in self.after):
            return
        held = self.own[job] if self.last else min(self.own[job], self.after[job])
        if self.rank == 0:
            mine = local_slices(self.out, [job], 0)[job]
            before = oldest_kept([s for s in mine if s <= held], self.keep[job])
            if before is not None and self._delete_before(job, before) and not self.last:
                self.down.append(Note(NOTE_CKPT_CUT, self.job_ids[job], before, 0.0))
        elif held > self.told.get(job, -1):
            self.told[job] = held
            self.up.append(Note(NOTE_CKPT_HELD, self.job_ids[job], held, 0.0))

    def _delete_before(self, job: str, step: int) -> bool:
        """Delete this rank's checkpoints of `job` before `step`; False if already done."""
        if step <= self.cut.get(job, -1):
            return False
        self.cut[job] = step
        delete_stage_slices(self.out, job, self.rank, step)
        return True
