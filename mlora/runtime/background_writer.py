"""Adapters and checkpoints written beside training, so no job waits for a disk.

A job's end used to stop the loop while its adapter went to disk (7B, r = 16 on every
projection: 160 MB, 0.2-0.25 s per job on an H200 host, every running job idle meanwhile;
and the first save of a process imports PEFT to write its config, seconds more), and so
did every checkpoint (the adapter and its optimizer moments, three times that). Here the
trainer hands tensors over with an event recorded after the step that produced them; one
writer thread waits for that event on its own CUDA stream (not behind the steps queued
since), copies the tensors to the host and writes the files, in the order handed over.

- An adapter's tensors are the finished job's own: nothing changes them any more. The
  trainer marks the job finished when it collects the write, so a job waiting on it (a
  MeteoRA job's experts) starts only once the folder is complete (`save_adapter`: config
  last). A finished MeteoRA job's folder (gates, and its experts if it trained them) is
  written the same way, by its own save function (`submit_folder`).
- A checkpoint's tensors are a copy made on the GPU in stream order (`snapshot`), since
  the job's next steps update the originals in place: for a moment the job's optimizer
  state is on the GPU twice. The folder is renamed into place when complete, as before;
  a pipeline stage writes its own slice the same way (`submit_stage_slice`).
- The copies off the GPU hold `device_lock`, which the trainer's CUDA graphs hold while
  they record: CUDA refuses another thread's synchronous copy during a recording in its
  global capture mode (and the recording may be spoiled), so the two take turns. Only
  the copies hold it, not the disk writes (a MeteoRA folder's save function copies and
  writes in one, so it holds it throughout).

A failed write is raised in the trainer's thread, naming the job and folder; `close`
waits for every write still going, even when the run fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlora.model.peft_io import AdapterMeta, save_adapter
from mlora.runtime.checkpoint import prune_checkpoints, write_checkpoint, write_stage_slice


class WriteError(RuntimeError):
    """Writing a job's adapter or checkpoint failed."""


@dataclass(frozen=True)
class Written:
    """One finished adapter write: which job, where, and when its folder became complete."""

    job: str
    folder: Path
    time: float


@dataclass(frozen=True)
class _Pending:
    job: str
    what: str  # "adapter" or "checkpoint"
    folder: Path
    future: Future
    step: int | None = None  # a stage's checkpoint slice: its step


def map_tensors(tree: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """`fn` applied to every tensor of a nested dict / list / tuple (a state dict)."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(v, fn) for v in tree)
    return tree


def snapshot(tree: Any) -> Any:
    """A copy of every tensor in a state dict (on its device, in stream order)."""
    return map_tensors(tree, lambda t: t.detach().clone())


class BackgroundWriter:
    """One background thread writing adapters and checkpoints in the order handed over."""

    def __init__(self, device: torch.device) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlora-writer")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: list[_Pending] = []
        self.slices_written: dict[str, int] = {}  # job -> newest checkpoint step whose stage slice is written
        self.device_lock = threading.Lock()  # held by this thread's CUDA work, and by graph recordings

    def submit_adapter(self, job: str, folder: Path, meta: AdapterMeta,
                       weights: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Write `weights` (module path -> (A, B), on any device) as a PEFT folder once the
        work queued so far has run. Nothing may change them afterwards: the job is over."""
        self._submit(job, "adapter", folder, weights, lambda host: (save_adapter(folder, meta, host), time.time())[1])

    def submit_folder(self, job: str, folder: Path, write: Callable[[], Any]) -> None:
        """Run `write`, which reads the finished job's tensors and writes its folder (a
        MeteoRA job's), once the work queued so far has run; collected like an adapter."""
        def locked(_: Any) -> float:
            with self.device_lock:  # it copies the tensors itself
                write()
            return time.time()

        self._submit(job, "adapter", folder, None, locked)

    def submit_stage_slice(self, job: str, folder: Path, stage: int, stage_state: dict[str, Any],
                           step: int | None = None) -> None:
        """Write a pipeline stage's slice of a checkpoint (of `step`; None: a finished job's
        final slice); `stage_state` as for `submit_checkpoint`. The folder counts as complete
        once every slice is there; `collect` notes the step in `slices_written`."""
        self._submit(job, "checkpoint", folder, stage_state, lambda host: write_stage_slice(folder, stage, host), step)

    def submit_checkpoint(self, job: str, out_dir: Path, step: int, stage_state: dict[str, Any],
                          state: dict[str, Any], keep: int | None = None) -> None:
        """Write a single-stage checkpoint of `stage_state`, which must be the caller's
        `snapshot` (its tensors unchanged from now on), and the driver's `state`; then,
        with `keep`, delete the job's checkpoints older than its `keep` newest."""
        def write(host: Any) -> None:
            write_checkpoint(out_dir, job, step, {0: host}, state)
            if keep is not None:
                prune_checkpoints(out_dir, job, keep)

        self._submit(job, "checkpoint", out_dir / job, stage_state, write)

    def _submit(self, job: str, what: str, folder: Path, tensors: Any, write: Callable[[Any], Any],
                step: int | None = None) -> None:
        event = None
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record()  # on the trainer's stream, after the step that made the tensors
        self._pending.append(_Pending(job, what, folder, self._pool.submit(self._write, tensors, write, event), step))

    def _write(self, tensors: Any, write: Callable[[Any], Any], event: torch.cuda.Event | None) -> Any:
        if event is None:
            return write(tensors)
        with torch.cuda.stream(self._stream):  # a `submit_folder` write copies on this stream too
            with self.device_lock:
                self._stream.wait_event(event)
                tensors = map_tensors(tensors, lambda t: t.detach().to("cpu"))
            return write(tensors)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def collect(self, block: bool = False) -> list[Written]:
        """The adapter writes that are done (all writes, if block), in the order handed over;
        raises the first failed write, of either kind. Checkpoint slices done update
        `slices_written`."""
        out = []
        while self._pending and (block or self._pending[0].future.done()):
            item = self._pending.pop(0)  # one thread writes in order: later ones are not done before
            try:
                result = item.future.result()
            except Exception as exc:
                raise WriteError(f"job {item.job!r}: writing its {item.what} under {item.folder} failed: {exc}") from exc
            if item.what == "adapter":
                out.append(Written(item.job, item.folder, result))
            elif item.step is not None:
                self.slices_written[item.job] = item.step
        return out

    def close(self) -> None:
        """Wait for every write still going (their errors are the caller's to collect first)."""
        self._pool.shutdown(wait=True)
