"""A pipeline schedule as data: per stage, the ordered list of actions the runtime executes.

Written like torch.distributed.pipelining's action lists (`0F3`, `1B3`, `0SEND_F3`), plus
per-job optimizer steps (`1STEP[job@2]`), because mlora's jobs step independently:
there is no pipeline flush at a step boundary, only a per-job, per-stage update.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

from mlora.schedule.microbatch import MicroBatch


class ActionKind(str, Enum):
    """What a stage does; the value is the short code used in the string form."""

    FORWARD = "F"
    BACKWARD = "B"
    SEND_ACT = "SEND_F"
    RECV_ACT = "RECV_F"
    SEND_GRAD = "SEND_B"
    RECV_GRAD = "RECV_B"
    OPTIMIZER_STEP = "STEP"

    @property
    def is_compute(self) -> bool:
        """Forward, backward and optimizer steps occupy the device; sends and receives do not."""
        return self in (ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.OPTIMIZER_STEP)

    @property
    def is_comm(self) -> bool:
        return not self.is_compute


# Where each communication kind goes, relative to the stage that executes it.
PEER_OFFSET = {
    ActionKind.SEND_ACT: +1,
    ActionKind.RECV_ACT: -1,
    ActionKind.SEND_GRAD: -1,
    ActionKind.RECV_GRAD: +1,
}


@dataclass(frozen=True)
class Action:
    """One entry of a stage's list. `mb` for F/B/SEND/RECV, `job`/`step` for OPTIMIZER_STEP."""

    kind: ActionKind
    stage: int
    mb: int | None = None
    job: str | None = None
    step: int | None = None
    peer: int | None = None

    def __str__(self) -> str:
        if self.kind is ActionKind.OPTIMIZER_STEP:
            return f"{self.stage}STEP[{self.job}@{self.step}]"
        return f"{self.stage}{self.kind.value}{self.mb}"

    @staticmethod
    def parse(text: str) -> "Action":
        """The inverse of str(): `0F3`, `1RECV_B3`, `2STEP[jobA@1]` (peers follow from the kind)."""
        m = re.fullmatch(r"\s*(\d+)STEP\[(.+)@(\d+)\]\s*", text)
        if m:
            return optimizer_step(int(m.group(1)), m.group(2), int(m.group(3)))
        m = re.fullmatch(r"\s*(\d+)(F|B|SEND_F|RECV_F|SEND_B|RECV_B)(\d+)\s*", text)
        if not m:
            raise ValueError(f"not an action: {text!r} (expected e.g. 0F3, 1B3, 0SEND_F3, 1STEP[job@2])")
        stage, kind, mb = int(m.group(1)), ActionKind(m.group(2)), int(m.group(3))
        peer = stage + PEER_OFFSET[kind] if kind in PEER_OFFSET else None
        return Action(kind, stage, mb=mb, peer=peer)


def forward(stage: int, mb: int) -> Action:
    return Action(ActionKind.FORWARD, stage, mb=mb)


def backward(stage: int, mb: int) -> Action:
    return Action(ActionKind.BACKWARD, stage, mb=mb)


def comm(kind: ActionKind, stage: int, mb: int) -> Action:
    """A send or receive; the peer is the neighbouring stage the kind points at."""
    return Action(kind, stage, mb=mb, peer=stage + PEER_OFFSET[kind])


def optimizer_step(stage: int, job: str, step: int) -> Action:
    return Action(ActionKind.OPTIMIZER_STEP, stage, job=job, step=step)


@dataclass(frozen=True)
class Schedule:
    """Per-stage action lists (stage k executes `stages[k]` in order) and the micro-batches they name."""

    stages: tuple[tuple[Action, ...], ...]
    micro_batches: tuple[MicroBatch, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
        object.__setattr__(self, "micro_batches", tuple(self.micro_batches))

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    def micro_batch(self, index: int) -> MicroBatch:
        """The micro-batch with this `index` (indices need not start at 0)."""
        for m in self.micro_batches:
            if m.index == index:
                return m
        raise KeyError(f"no micro-batch {index} in schedule")

    def compute_only(self, stage: int) -> tuple[Action, ...]:
        """The stage's F/B/STEP actions: what a single process runs when sends are no-ops."""
        return tuple(a for a in self.stages[stage] if a.kind.is_compute)

    def __str__(self) -> str:
        return "\n".join(f"stage {k}: " + " ".join(str(a) for a in acts) for k, acts in enumerate(self.stages))

    @staticmethod
    def from_strings(micro_batches: Sequence[MicroBatch], stages: Iterable[Iterable[str] | str]) -> "Schedule":
        """Build a schedule from text lists (`["0F0 0SEND_F0 ...", ...]`): for tests and hand-written schedules."""
        parsed = []
        for acts in stages:
            items = acts.split() if isinstance(acts, str) else list(acts)
            parsed.append(tuple(Action.parse(a) for a in items))
        return Schedule(tuple(parsed), tuple(micro_batches))
