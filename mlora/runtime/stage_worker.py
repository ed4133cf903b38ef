"""One pipeline stage executing its action list: forward, backward, send, receive, step.

The worker owns its slice of every job's adapter and optimizer. Everything a stage must
know beyond its own tensors arrives as notes riding on activations and gradients:

- gradient clipping, and the overflow check of a float16 job's loss scaling (so that
  every stage skips or takes the step alike), need the norm of the *whole* adapter.
  After the backward of a job step's last micro-batch, stage k adds its squared norm to
  the partial sum that came up from stage k+1 and passes it upstream with the gradient.
  Stage 0 then knows the total, steps, and sends the total downstream with its next
  activations; stage k > 0 applies its pending step when the total arrives. The job's
  next step cannot reach stage k before that (it travels behind the total), so no step
  is stale. The sums stay on the device until a receiver reads the notes: a stage never
  waits for its own backward to finish before queuing more work.
- the last stage reports each (job, step) loss upstream the same way, to rank 0, reading
  a micro-batch's losses on the host only after its backward is queued. A MeteoRA job's
  gate loss and routing accuracy are summed the other way: each stage's share rides
  downstream with the step's last activations, and the last stage reports the totals
  beside the loss.
- an evaluation micro-batch is forwarded without autograd and never backwarded; the last
  stage sums its loss on the device and sends the evaluation's total upstream with the
  next gradient it sends (or the end-of-run message), every stage relaying it to rank 0.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from mlora.jobs import JobOptimizer
from mlora.meteora.gate import gate_step_terms, token_task_labels
from mlora.model.lora_linear import BatchLayout
from mlora.model.loss import Targets, job_loss_sums
from mlora.model.stage import StageModel
from mlora.runtime.slice_pruning import SlicePruner
from mlora.runtime.transport import (
    NOTE_DONE,
    NOTE_EVAL,
    NOTE_GRAD_NORM,
    NOTE_GRAD_SQ,
    NOTE_LOSS,
    NOTE_GATE_LOSS,
    NOTE_LOSS_SCALE,
    NOTE_ROUTE_ACC,
    Note,
    PipelineError,
    Transport,
    to_device,
)
from mlora.schedule.actions import Action, ActionKind
from mlora.schedule.microbatch import MicroBatch
from mlora.schedule.trace import TraceEvent, action_event


EXTRAS = {NOTE_LOSS_SCALE: "loss_scale", NOTE_GATE_LOSS: "gate_loss", NOTE_ROUTE_ACC: "route_acc"}  # logged beside a loss


class TraceClock:
    """When each action ran, for the trace: host time on the CPU, device time on CUDA.

    On CUDA a forward or backward only queues kernels, so host timestamps would put a
    stage's compute into its next receive and count it as idle. There, CUDA events are
    recorded on the compute stream around each action (a receive's end event follows
    the stream's wait for the data), and read once at the end of the run.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()
        self._origin = self._event() if self.cuda else None
        self._pending: list[tuple[Action, MicroBatch | None, object, object]] = []

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> object:
        return self._event() if self.cuda else time.perf_counter() - self.t0

    def add(self, action: Action, mb: MicroBatch | None, start: object, end: object, events: list[TraceEvent]) -> None:
        if self.cuda:
            self._pending.append((action, mb, start, end))
        else:
            events.append(action_event(action, float(start), float(end), mb))  # type: ignore[arg-type]

    def resolve(self, events: list[TraceEvent]) -> None:
        """Turn the recorded CUDA events into trace events (one device sync, at the end)."""
        if not self._pending:
            return
        torch.cuda.synchronize()
        assert self._origin is not None
        for action, mb, start, end in self._pending:
            t_start = self._origin.elapsed_time(start) / 1000  # type: ignore[arg-type]
            t_end = self._origin.elapsed_time(end) / 1000  # type: ignore[arg-type]
            events.append(action_event(action, t_start, t_end, mb))
        self._pending = []


@dataclass(frozen=True)
class MicroBatchPlan:
    """What every stage knows of a micro-batch before the run: its rows and loss weights."""

    batch: MicroBatch
    layout: BatchLayout
    inv_targets: tuple[float, ...]  # per slice: 1 / target tokens of that job step
    # MeteoRA slices: each row's per-token task, and gated linears × the step's tokens
    # (the gate loss's denominator); None / 0 for LoRA slices
    task_rows: tuple[tuple[tuple[int, ...], ...] | None, ...] = ()
    gate_denoms: tuple[float, ...] = ()


@dataclass
class StageState:
    """Live tensors of in-flight micro-batches, freed as soon as they are no longer needed."""

    inputs: dict[int, Tensor] = field(default_factory=dict)  # received activations (requires grad)
    outputs: dict[int, Tensor] = field(default_factory=dict)  # stage outputs kept for backward
    losses: dict[int, Tensor] = field(default_factory=dict)  # last stage: weighted per-slice losses
    gate_losses: dict[int, Tensor] = field(default_factory=dict)  # MeteoRA slices: this stage's gate loss terms
    grads: dict[int, Tensor] = field(default_factory=dict)  # received output gradients
    targets: dict[int, Targets] = field(default_factory=dict)  # last stage: loss positions
    weights: dict[int, Tensor] = field(default_factory=dict)  # last stage: per-slice loss weights
    up_notes: dict[int, list[Note]] = field(default_factory=dict)  # to send upstream with mb's grad
    loose_up: list[Note] = field(default_factory=list)  # to send upstream with the next grad, whichever
    down_notes: list[Note] = field(default_factory=list)  # to send downstream with the next activation


class StageWorker:
    """Executes one stage's actions. Rank 0 supplies token ids and targets by callback."""

    def __init__(
        self,
        index: int,
        n_stages: int,
        stage: StageModel,
        optimizers: dict[str, JobOptimizer],
        job_ids: dict[str, int],
        transport: Transport | None,
        plans: dict[int, MicroBatchPlan],
        token_ids: Callable[[int], Tensor] | None = None,
        targets: Callable[[int], Targets] | None = None,
        send_targets: Callable[[int], None] | None = None,
        on_loss: Callable[[str, int, float, dict[str, float]], None] | None = None,
        on_step: Callable[[str, int], None] | None = None,
        on_eval: Callable[[str, int, float], None] | None = None,
        pruner: SlicePruner | None = None,
    ) -> None:
        """token_ids/send_targets (rank 0) and targets (last stage) bring the data in;
        on_loss / on_eval (rank 0) take each step's loss (with its float16 loss scale,
        MeteoRA gate loss and routing accuracy: `EXTRAS`) and each evaluation's loss sum.
        `pruner` (save_total_limit without a shared output folder) sends and takes its
        notes with the messages."""
        self.index, self.n_stages = index, n_stages
        self.first, self.last = index == 0, index == n_stages - 1
        self.stage, self.optimizers, self.job_ids = stage, optimizers, job_ids
        self.job_names = {i: name for name, i in job_ids.items()}
        self.transport, self.plans = transport, plans
        self.token_ids, self.targets_of, self.on_loss = token_ids, targets, on_loss
        self.send_targets, self.on_step, self.on_eval = send_targets, on_step, on_eval
        self.pruner = pruner
        self.backwarded: dict[tuple[str, int], int] = {}
        self.state = StageState()
        self.step_loss: dict[tuple[str, int], float] = {}
        # rank 0: a step's loss scale (float16) and gate figures (MeteoRA) until its loss comes
        self.extras: dict[tuple[str, int], dict[str, float]] = {}
        self.gate_sums: dict[tuple[str, int], Tensor] = {}  # MeteoRA: [gate loss, route acc] so far, on the device
        self.eval_loss: dict[tuple[str, int], Tensor] = {}  # last stage: evaluation sums so far
        self.pending_steps: set[tuple[str, int]] = set()  # OPTIMIZER_STEP seen, total norm not yet
        self.known_norms: dict[tuple[str, int], float | Tensor] = {}
        self.partials: dict[tuple[str, int], float] = {}  # downstream squared-norm partials
        self.events: list[TraceEvent] = []
        self.device = next(iter(stage.parameters())).device
        self.clock = TraceClock(self.device)
        self.current: Action | None = None  # the action running, for an error's message

    # ------------------------------------------------------------ execution
    def run(self, actions: Sequence[Action]) -> list[TraceEvent]:
        handlers = {
            ActionKind.FORWARD: self._forward,
            ActionKind.BACKWARD: self._backward,
            ActionKind.SEND_ACT: self._send_act,
            ActionKind.RECV_ACT: self._recv_act,
            ActionKind.SEND_GRAD: self._send_grad,
            ActionKind.RECV_GRAD: self._recv_grad,
            ActionKind.OPTIMIZER_STEP: self._optimizer_step,
        }
        for action in actions:
            start = self.clock.mark()
            self.current = action
            handlers[action.kind](action)
            end = self.clock.mark()
            mb = self.plans[action.mb].batch if action.mb is not None else None
            self.clock.add(action, mb, start, end, self.events)
        self._finish()
        self.clock.resolve(self.events)
        return self.events

    def doing(self) -> str:
        """What the stage was doing, in words: the action and its micro-batch's shape."""
        action = self.current
        if action is None:
            return "before its first action"
        what = action.kind.name.lower().replace("_", " ")
        if action.mb is None:
            return f"at the {what} of job {action.job} step {action.step}"
        plan = self.plans[action.mb]
        jobs = ", ".join(dict.fromkeys(s.job for s in plan.batch.slices))
        return (f"at the {what} of micro-batch {action.mb} ({plan.layout.rows} rows x {plan.layout.seq_len} tokens; "
                f"jobs {jobs})")

    def _finish(self) -> None:
        """End of the list: pass the last totals downstream and wait for ours, then the
        last evaluation losses upstream."""
        done = Note(NOTE_DONE, 0, 0, 0.0)
        if not self.first:
            assert self.transport is not None
            _, notes = self.transport.recv(self.index - 1, -1, "the end-of-run message")
            self._absorb_down(notes)
        if not self.last:
            assert self.transport is not None
            self.transport.send(self.index + 1, -1, None, self.state.down_notes + self._pruner_notes(up=False) + [done])
            self.state.down_notes = []
            _, notes = self.transport.recv(self.index + 1, -1, "the end-of-run message", channel="grad")
            self._absorb_up(notes)
        if not self.first:
            assert self.transport is not None
            self.transport.send(self.index - 1, -1, None, self.state.loose_up + self._pruner_notes(up=True) + [done],
                                channel="grad")
            self.state.loose_up = []
        if self.transport is not None:
            self.transport.flush_sends()
        if self.pending_steps:
            raise PipelineError(f"stage {self.index}: steps never completed: {sorted(self.pending_steps)}")

    # ------------------------------------------------------------- compute
    def _forward(self, action: Action) -> None:
        plan = self.plans[action.mb]
        for s in plan.batch.slices:
            if any(job == s.job for job, _ in self.pending_steps):
                raise PipelineError(f"stage {self.index}: micro-batch {action.mb} would use stale weights of {s.job}")
        if self.first:
            assert self.token_ids is not None
            inputs = self.token_ids(action.mb)
        elif plan.batch.is_eval:
            inputs = self.state.inputs.pop(action.mb)
        else:
            inputs = self.state.inputs[action.mb]
        with torch.no_grad() if plan.batch.is_eval else nullcontext():
            hidden = self.stage(inputs, plan.layout)
        if plan.batch.is_eval:
            self._evaluated(action.mb, plan, hidden)
            return
        gate_loss = self._gate_loss(plan)
        if gate_loss is not None:
            self.state.gate_losses[action.mb] = gate_loss
        if self.last:
            targets = self.state.targets.pop(action.mb)
            sums = job_loss_sums(self.stage.lm_head, hidden, targets, self.stage.fused_loss)
            self.state.losses[action.mb] = sums * self.state.weights.pop(action.mb)
        else:
            self.state.outputs[action.mb] = hidden

    @torch.no_grad()
    def _evaluated(self, mb: int, plan: MicroBatchPlan, hidden: Tensor) -> None:
        """After an evaluation forward: pass the hidden states on, or (last stage) add the
        loss sums to their evaluations' totals and note each finished one for rank 0."""
        for s in plan.batch.slices:  # a MeteoRA gate's logits are trained on only
            take = getattr(self.stage.routing.adapters[s.job], "take_gate_logits", None)
            if take is not None:
                take()
        if not self.last:
            self.state.outputs[mb] = hidden
            return
        self.state.weights.pop(mb)
        sums = job_loss_sums(self.stage.lm_head, hidden, self.state.targets.pop(mb), self.stage.fused_loss)
        for k, s in enumerate(plan.batch.slices):
            key = (s.job, s.step)
            total = self.eval_loss.pop(key, None)
            total = sums[k] if total is None else total + sums[k]
            if s.last:
                self._absorb_up([Note(NOTE_EVAL, self.job_ids[s.job], s.step, total)])
            else:
                self.eval_loss[key] = total

    def _report_losses(self, mb: int, weighted: Tensor) -> None:
        """Last stage: add the micro-batch's per-slice losses to their steps' totals and
        note each finished step's loss for rank 0. Called once the backward is queued, so
        reading the values waits for the forward only, with the backward's work behind it
        on the device (read right after the forward, the device would idle meanwhile)."""
        notes = []
        scales = self._loss_scales(mb)
        scale_values = scales.tolist() if scales is not None else None
        for k, (s, value) in enumerate(zip(self.plans[mb].batch.slices, weighted.tolist())):
            key = (s.job, s.step)
            self.step_loss[key] = self.step_loss.get(key, 0.0) + value
            if s.last:
                job_id = self.job_ids[s.job]
                if scale_values is not None:
                    notes.append(Note(NOTE_LOSS_SCALE, job_id, s.step, scale_values[k]))
                gate = self.gate_sums.pop(key, None)
                if gate is not None:  # read here, with the losses, behind the queued backward
                    gate_loss, route_acc = gate.tolist()
                    notes += [Note(NOTE_GATE_LOSS, job_id, s.step, gate_loss), Note(NOTE_ROUTE_ACC, job_id, s.step, route_acc)]
                notes.append(Note(NOTE_LOSS, job_id, s.step, self.step_loss.pop(key)))
        self.state.up_notes.setdefault(mb, []).extend(notes)

    def _gate_loss(self, plan: MicroBatchPlan) -> Tensor | None:
        """Sum over the micro-batch's MeteoRA slices of coef × their gates' share of the step's
        mean cross-entropy, over the gates of this stage's linears (the stages' terms add up
        to the single-process gate loss)."""
        total: Tensor | None = None
        for s, rows, denom in zip(plan.batch.slices, plan.task_rows, plan.gate_denoms):
            if rows is None:
                continue
            logits = self.stage.routing.adapters[s.job].take_gate_logits()
            if not logits:
                continue
            labels = token_task_labels(rows, plan.layout.seq_len)
            ce, hits = gate_step_terms(logits, labels)
            self._add_gate_sums((s.job, s.step), torch.stack([ce.detach(), hits.float()]) / denom)
            opt = self.optimizers[s.job]
            term = opt.spec.gate_loss_coef * ce / denom
            if opt.scaler is not None:  # float16: the job's loss scale, as on its LM loss
                term = term * opt.scaler.scale
            total = term if total is None else total + term
        return total

    def _backward(self, action: Action) -> None:
        mb = action.mb
        assert mb is not None
        gate_loss = self.state.gate_losses.pop(mb, None)
        if self.last:
            weighted = self.state.losses.pop(mb)
            scales = self._loss_scales(mb)
            loss = weighted.sum() if scales is None else (weighted * scales).sum()
            (loss if gate_loss is None else loss + gate_loss).backward()
            self._report_losses(mb, weighted.detach())
        elif gate_loss is None:
            self.state.outputs.pop(mb).backward(self.state.grads.pop(mb))
        else:
            out, grad = self.state.outputs.pop(mb), self.state.grads.pop(mb)
            torch.autograd.backward([out, gate_loss], [grad, torch.ones_like(gate_loss)])
        plan = self.plans[mb]
        for s in plan.batch.slices:
            key = (s.job, s.step)
            done = self.backwarded.get(key, 0) + 1
            if done != s.micro + 1:
                raise PipelineError(f"stage {self.index}: {s.job} step {s.step} micro-batches backwarded out of order")
            if s.last:
                self.backwarded.pop(key, None)
            else:
                self.backwarded[key] = done
            if s.last and self._needs_norm(s.job):
                # fp64 as the notes carry it; no .item(): that would wait for this backward
                partial = self.optimizers[s.job].grad_sq_norm().double() + self.partials.pop(key, 0.0)
                if self.first:
                    self.known_norms[key] = partial.sqrt()
                else:
                    self.state.up_notes.setdefault(mb, []).append(Note(NOTE_GRAD_SQ, self.job_ids[s.job], s.step, partial))

    def _optimizer_step(self, action: Action) -> None:
        key = (action.job, action.step)
        assert action.job is not None
        if not self._needs_norm(action.job):
            self.optimizers[action.job].step(None)
            if self.on_step is not None:
                self.on_step(*key)
            return
        if key in self.known_norms:
            self._apply_step(key)
        elif self.first:
            raise PipelineError(f"stage 0: step {key} before its gradient norm is known")
        else:
            self.pending_steps.add(key)

    def _apply_step(self, key: tuple[str, int]) -> None:
        norm = self.known_norms.pop(key)
        opt = self.optimizers[key[0]]
        opt.step(torch.as_tensor(norm, dtype=torch.float32, device=opt.device))
        self.pending_steps.discard(key)
        if self.on_step is not None:
            self.on_step(*key)
        if self.first and not self.last:  # later stages pass totals on as they arrive
            self.state.down_notes.append(Note(NOTE_GRAD_NORM, self.job_ids[key[0]], key[1], norm))

    def _needs_norm(self, job: str) -> bool:
        return self.optimizers[job].needs_norm

    def _loss_scales(self, mb: int) -> Tensor | None:
        """float16: each slice's job loss scale (`LossScaler`), else None."""
        slices = self.plans[mb].batch.slices
        if self.optimizers[slices[0].job].scaler is None:  # not float16 (one dtype for the run's jobs)
            return None
        return torch.stack([self.optimizers[s.job].scaler.scale for s in slices])  # type: ignore[union-attr]

    # ------------------------------------------------------- communication
    def _send_act(self, action: Action) -> None:
        assert self.transport is not None and action.mb is not None
        if self.plans[action.mb].batch.is_eval:  # no backward will need it
            out = self.state.outputs.pop(action.mb)
        else:
            out = self.state.outputs[action.mb]
        if self.send_targets is not None:
            self.send_targets(action.mb)
        for s in self.plans[action.mb].batch.slices:  # this stage's gate figures join those from upstream
            gate = self.gate_sums.pop((s.job, s.step), None) if s.last and not s.eval else None
            if gate is not None:
                job_id = self.job_ids[s.job]
                self.state.down_notes += [Note(NOTE_GATE_LOSS, job_id, s.step, gate[0]),
                                          Note(NOTE_ROUTE_ACC, job_id, s.step, gate[1])]
        self.transport.send(self.index + 1, action.mb, out.detach(), self.state.down_notes + self._pruner_notes(up=False))
        self.state.down_notes = []

    def _recv_act(self, action: Action) -> None:
        assert self.transport is not None and action.mb is not None
        if self.last:  # rank 0 sends the targets just before the activations
            assert self.targets_of is not None
            self.state.targets[action.mb] = self.targets_of(action.mb)
            device = self.state.targets[action.mb].index.device
            weights = torch.tensor(self.plans[action.mb].inv_targets, dtype=torch.float32)
            self.state.weights[action.mb] = to_device(weights, device)
        x, notes = self.transport.recv(self.index - 1, action.mb, f"activations of micro-batch {action.mb}")
        assert x is not None
        self._absorb_down(notes)
        self.state.inputs[action.mb] = x if self.plans[action.mb].batch.is_eval else x.requires_grad_(True)

    def _send_grad(self, action: Action) -> None:
        assert self.transport is not None and action.mb is not None
        x = self.state.inputs.pop(action.mb)
        notes = self.state.up_notes.pop(action.mb, []) + self.state.loose_up + self._pruner_notes(up=True)
        self.state.loose_up = []
        self.transport.send(self.index - 1, action.mb, x.grad, notes, channel="grad")

    def _recv_grad(self, action: Action) -> None:
        assert self.transport is not None and action.mb is not None
        g, notes = self.transport.recv(self.index + 1, action.mb, f"gradients of micro-batch {action.mb}", channel="grad")
        assert g is not None
        self.state.grads[action.mb] = g
        relay = []
        for note in notes:
            key = (self.job_names[note.job], note.step)
            if note.kind == NOTE_GRAD_SQ:
                self.partials[key] = note.value
            elif note.kind in (NOTE_LOSS, *EXTRAS):
                if not self.first or self.on_loss is None:
                    relay.append(note)
                elif note.kind in EXTRAS:
                    self.extras.setdefault(key, {})[EXTRAS[note.kind]] = float(note.value)
                else:
                    self.on_loss(key[0], key[1], note.value, self.extras.pop(key, {}))
        self.state.up_notes.setdefault(action.mb, []).extend(relay)
        self._absorb_up(notes)

    def _pruner_notes(self, up: bool) -> list[Note]:
        if self.pruner is None:
            return []
        return self.pruner.take_up() if up else self.pruner.take_down()

    def _absorb_up(self, notes: list[Note]) -> None:
        """Evaluation losses from downstream (or, on the last stage, its own): rank 0 takes
        them, other stages send them on with their next gradient. Pruning notes go to the pruner."""
        for note in notes:
            if self.pruner is not None:
                self.pruner.absorb(note)
            if note.kind != NOTE_EVAL:
                continue
            if not self.first:
                self.state.loose_up.append(note)
            elif self.on_eval is not None:
                self.on_eval(self.job_names[note.job], note.step, float(note.value))

    def _add_gate_sums(self, key: tuple[str, int], value: Tensor) -> None:
        self.gate_sums[key] = value if key not in self.gate_sums else self.gate_sums[key] + value

    def _absorb_down(self, notes: list[Note]) -> None:
        """Totals from upstream: apply the steps they complete, pass them on; gate figures
        of the stages before, added to this stage's."""
        gates: dict[tuple[str, int], list[float]] = {}  # [gate loss, route acc], whatever the notes' order
        for note in notes:
            if self.pruner is not None and self.pruner.absorb(note):
                continue
            key = (self.job_names[note.job], note.step)
            if note.kind in (NOTE_GATE_LOSS, NOTE_ROUTE_ACC):
                gates.setdefault(key, [0.0, 0.0])[note.kind == NOTE_ROUTE_ACC] = float(note.value)
            if note.kind != NOTE_GRAD_NORM:
                continue
            self.known_norms[key] = note.value
            if not self.last:
                self.state.down_notes.append(note)
            if key in self.pending_steps:
                self._apply_step(key)
        for key, figures in gates.items():
            self._add_gate_sums(key, torch.tensor(figures, device=self.device))
