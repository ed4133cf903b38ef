"""Reading a scalar off the GPU without stalling the host.

`float(t)` waits for *everything* queued on the stream, the next batch included. A
copy into pinned host memory followed by an event waits only for the work that made
`t`; the trainer checks `ready()` between batches and logs what has arrived.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DeferredScalar:
    """A scalar tensor's value, fetched asynchronously on CUDA and at once on the CPU."""

    def __init__(self, value: Tensor | float) -> None:
        self._value: float | None = None
        self._host: Tensor | None = None
        self._event: torch.cuda.Event | None = None
        if isinstance(value, Tensor) and value.is_cuda:
            self._host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self._host.copy_(value.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._value = float(value)

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def get(self) -> float:
        if self._value is None:
            assert self._event is not None and self._host is not None
            self._event.synchronize()
            self._value = float(self._host)
        return self._value
