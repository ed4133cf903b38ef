"""Finished jobs' adapters written beside training, so the other jobs never wait for a disk.

A job's end used to stop the loop while its adapter went to disk (7B, r = 16 on every
projection: 160 MB, 0.2-0.25 s per job on an H200 host, every running job idle meanwhile;
and the first save of a process imports PEFT to write its config, seconds more). Here the
trainer hands the job's GPU tensors over with an event recorded after its last step; one
writer thread waits for that event on its own stream (not behind the steps queued
since), copies the tensors to the host and writes the PEFT folder (`save_adapter`:
config last, so a folder with a config is complete). The trainer marks the job finished
when it collects the write, so a job waiting on it (a MeteoRA job's experts) starts only
once its adapter is on disk. A failed write is raised in the trainer's thread, naming
the job and folder; `close` waits for every write still going, even when the run fails.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mlora.model.peft_io import AdapterMeta, save_adapter


class AdapterWriteError(RuntimeError):
    """Writing a finished job's adapter failed."""


@dataclass(frozen=True)
class Written:
    """One finished write: which job, where, and when its folder became complete."""

    job: str
    folder: Path
    time: float


class AdapterWriter:
    """One background thread writing adapters in the order they were handed over."""

    def __init__(self, device: torch.device) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlora-adapter-writer")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[str, tuple[Path, Future[float]]] = {}

    def submit(self, job: str, folder: Path, meta: AdapterMeta, weights: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Write `weights` (module path -> (A, B), on any device) once the work queued so far
        has run. Nothing may change them afterwards: the job is over."""
        event = None
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record()  # on the trainer's stream, after the job's last optimizer step
        self._pending[job] = (folder, self._pool.submit(self._write, folder, meta, weights, event))

    def _write(self, folder: Path, meta: AdapterMeta, weights: dict[str, tuple[Tensor, Tensor]],
               event: torch.cuda.Event | None) -> float:
        if event is not None:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(event)
                weights = {p: (a.detach().to("cpu"), b.detach().to("cpu")) for p, (a, b) in weights.items()}
        save_adapter(folder, meta, weights)
        return time.time()

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def collect(self, block: bool = False) -> list[Written]:
        """The writes that are done (all of them if block), in the order they were handed over."""
        out = []
        for job, (folder, future) in list(self._pending.items()):
            if not (block or future.done()):
                break  # one thread writes in order: the later ones are not done either
            del self._pending[job]
            try:
                out.append(Written(job, folder, future.result()))
            except Exception as exc:
                raise AdapterWriteError(f"job {job!r}: writing its adapter to {folder} failed: {exc}") from exc
        return out

    def close(self) -> None:
        """Wait for every write still going (their errors are the caller's to collect first)."""
        self._pool.shutdown(wait=True)
