"""Point-to-point transport between pipeline stages (torch.distributed isend/irecv).

Every message is a small header, then optional notes, then the tensor. The header
(micro-batch index, shape, dtype) lets shapes change from micro-batch to micro-batch
and lets the receiver check it got what its action list expects. Notes are
(kind, job, step, value) records that ride along with activations and gradients:
gradient-norm partial sums and losses travel upstream with gradients, total norms
downstream with activations, so no extra collective ever synchronises the stages.
(Evaluation losses go upstream with the next gradient the last stage sends, or with
the end-of-run message.)

On CUDA the tensors go GPU to GPU through NCCL; on the CPU through gloo. Activations,
gradients and targets each travel on their own process group ("channel"): NCCL runs
one communicator's sends and receives in order on one stream, so with a single group
stage k's activation send and stage k+1's gradient send could wait on each other.
Every wait has a deadline, and a peer that died or hangs becomes a PipelineError
naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

MAGIC = 0x6D6C6F7261  # "mlora"
HEADER_LEN = 12
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]

NOTE_GRAD_SQ = 0  # partial sum of squared gradient entries of (job, step), stages k..P-1
NOTE_GRAD_NORM = 1  # total gradient norm of (job, step) over all stages
NOTE_LOSS = 2  # loss of (job, step), from the last stage
NOTE_DONE = 3  # end of the run: no more messages on this channel
NOTE_EVAL = 4  # evaluation loss sum of (job, after step), from the last stage
NOTE_LOSS_SCALE = 5  # float16: the loss scale (job, step) ran with, from the last stage, just before its NOTE_LOSS
# MeteoRA: (job, step)'s mean gate cross-entropy and top-1 routing accuracy; each stage adds
# its gates' share riding downstream, the last stage reports the totals just before NOTE_LOSS
NOTE_GATE_LOSS = 6
NOTE_ROUTE_ACC = 7
# save_total_limit without a shared output folder (slice_pruning.py): upstream, the newest
# checkpoint step of (job) that this stage and every one after it has written; downstream,
# "delete (job)'s checkpoints before this step", from rank 0
NOTE_CKPT_HELD = 8
NOTE_CKPT_CUT = 9


class PipelineError(RuntimeError):
    """A stage could not go on: a peer died, hung, or sent what was not expected."""


@dataclass(frozen=True)
class Note:
    kind: int
    job: int  # index of the job in the run file
    step: int
    value: float | Tensor  # a 0-d tensor on the sender's device stays there until sent


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on `device`. On CUDA through pinned memory and a non-blocking
    copy: a plain copy from pageable memory waits for every kernel queued on the stream."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def notes_tensor(notes: list[Note], device: torch.device) -> Tensor:
    """[n, 4] float64 rows (kind, job, step, value). Tensor values are copied in on the
    device, so a sender never waits for the kernels that compute them."""
    host = torch.tensor([[n.kind, n.job, n.step, 0.0 if isinstance(n.value, Tensor) else n.value] for n in notes],
                        dtype=torch.float64)
    rows = to_device(host, device)
    for i, note in enumerate(notes):
        if isinstance(note.value, Tensor):
            rows[i, 3] = note.value
    return rows


class Transport:
    """Sends and receives for one rank. `describe(rank)` names a rank in messages."""

    def __init__(
        self,
        rank: int,
        device: torch.device,
        timeout_s: float,
        describe: Callable[[int], str],
        channels: dict[str, dist.ProcessGroup | None] | None = None,
    ) -> None:
        self.rank, self.device = rank, device
        self.channels = channels or {}
        self.timeout = timedelta(seconds=timeout_s)
        self.describe = describe
        self._pending: list[tuple[dist.Work, list[Tensor]]] = []

    def send(self, dst: int, mb: int, tensor: Tensor | None, notes: list[Note], channel: str = "act") -> None:
        """isend header, notes and tensor on `channel`; they stay alive until `flush_sends`."""
        group = self.channels.get(channel)
        shape = tuple(tensor.shape) if tensor is not None else ()
        if len(shape) > 4:
            raise PipelineError(f"cannot send a {len(shape)}-d tensor")
        dtype_code = DTYPES.index(tensor.dtype) if tensor is not None else -1
        header = [MAGIC, mb, len(notes), len(shape), dtype_code, *shape]
        header += [0] * (HEADER_LEN - len(header))
        parts = [to_device(torch.tensor(header, dtype=torch.int64), self.device)]
        if notes:
            parts.append(notes_tensor(notes, self.device))
        if tensor is not None:
            parts.append(tensor.detach().contiguous())
        for part in parts:
            try:
                work = dist.isend(part, dst, group=group)
            except RuntimeError as exc:  # gloo raises when posting to a peer that is gone
                raise PipelineError(
                    f"{self.describe(self.rank)}: lost {self.describe(dst)} while sending: {exc}"
                ) from exc
            self._pending.append((work, [part]))
        self._reap()

    def recv(self, src: int, expect_mb: int, what: str, channel: str = "act") -> tuple[Tensor | None, list[Note]]:
        """Blocking receive of one message from `src` on `channel`; checks it is micro-batch expect_mb."""
        group = self.channels.get(channel)
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._recv_into(header, src, group, what)
        h = header.tolist()
        if h[0] != MAGIC:
            raise PipelineError(f"{self.describe(self.rank)}: garbled header from {self.describe(src)} ({what})")
        mb, n_notes, ndim, dtype_code = h[1], h[2], h[3], h[4]
        if mb != expect_mb:
            raise PipelineError(
                f"{self.describe(self.rank)}: expected micro-batch {expect_mb} from {self.describe(src)}, got {mb} ({what})"
            )
        notes: list[Note] = []
        if n_notes:
            buf = torch.empty(n_notes, 4, dtype=torch.float64, device=self.device)
            self._recv_into(buf, src, group, what)
            notes = [Note(int(k), int(j), int(s), float(v)) for k, j, s, v in buf.tolist()]
        tensor = None
        if dtype_code >= 0:
            tensor = torch.empty(tuple(h[5 : 5 + ndim]), dtype=DTYPES[dtype_code], device=self.device)
            self._recv_into(tensor, src, group, what)
        return tensor, notes

    def _recv_into(self, buf: Tensor, src: int, group: dist.ProcessGroup | None, what: str) -> None:
        """irecv into buf and wait for it; a peer that is gone is a PipelineError naming it,
        whether the posting itself fails (gloo, once the connection is closed) or the wait."""
        try:
            work = dist.irecv(buf, src, group=group)
        except RuntimeError as exc:
            raise PipelineError(
                f"{self.describe(self.rank)}: lost {self.describe(src)} while receiving {what}: {exc}"
            ) from exc
        self._wait(work, src, what)

    def _wait(self, work: dist.Work, peer: int, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as exc:
            raise PipelineError(
                f"{self.describe(self.rank)}: lost {self.describe(peer)} while receiving {what}: {exc}"
            ) from exc
        if ok is False:
            raise PipelineError(
                f"{self.describe(self.rank)}: no answer from {self.describe(peer)} within "
                f"{self.timeout.total_seconds():.0f} s while receiving {what}"
            )

    def _reap(self) -> None:
        self._pending = [(w, keep) for w, keep in self._pending if not w.is_completed()]

    def flush_sends(self) -> None:
        """Wait for every send still in flight (at the end, or before freeing memory)."""
        for work, _ in self._pending:
            try:
                work.wait(self.timeout)
            except RuntimeError as exc:
                raise PipelineError(f"{self.describe(self.rank)}: a send failed: {exc}") from exc
        self._pending = []
