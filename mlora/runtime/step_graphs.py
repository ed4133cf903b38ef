"""CUDA graphs of the fused forward + backward: each recurring batch shape captured once, then replayed.

A fused step over a 1.1B-shape model runs 154 adapted linears, 22 blocks of norms,
attention and MLPs, forward and backward: thousands of kernels, each launched from
Python. On an H200 the GPU did its 103 ms of work while the host needed 189 ms to issue
it (bench/README.md). A CUDA graph records the kernels of one step once and replays
them with one launch, so the step costs what the GPU needs.

A graph fixes shapes, addresses and every host-side decision, so:
- the key is the batch's shape: rows, padded length, each job's rows (and its own
  padded length if it has dropout: its masks are drawn at that size), and the target
  count rounded up to a bucket (padding targets go to a slot nobody reads);
- inputs are copied into static buffers; gradients are added into each parameter's
  `.grad`, which the job's optimizer zeroes in place and never drops; the tables the
  operator caches per layout are kept with the graph, as are the tensors it reads;
- LoRA dropout draws from one generator per (job, linear), registered with the graph
  and reseeded from the batch's (job, step, micro-batch) seeds before every replay, so
  the masks are the eager ones;
- only what a replay is known to reproduce is captured: no MeteoRA job (its gate logits
  leave through the adapter), no `loop` oracle. The Triton path's tables depend on the
  layout alone and it keeps them in the step's cache, so it is recorded too (a graphed
  Triton run equals the eager one: tested on the GPU);
- the recorded step picks its own operator path (`graphed_backend`): under `auto` the
  Triton kernels on Hopper in bf16/fp16, which replayed beat the dense path (eagerly
  they are host-bound, so eager steps stay dense; bench/README.md, 2026-12-02).
Everything else, shapes seen once, and CPU runs go the eager way; the math is the same.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from mlora.model.lora_linear import BatchLayout, StageAdapter, dropout_seed_of
from mlora.model.loss import Targets, job_loss_sums
from mlora.model.stage import StageModel
from mlora.ops.multi_lora import graphed_backend, resolve_backend
from mlora.runtime.batch import FusedBatch

TARGET_BUCKET = 256  # target counts are rounded up to this, so batches of one shape share a graph
MAX_GRAPHS = 32  # captured shapes kept at once (one shared memory pool: about the largest one's need, not the sum)
MAX_SEEN = 4096  # shapes remembered while waiting for a second sighting


@dataclass(frozen=True)
class GraphKey:
    """Everything a captured step depends on besides tensor contents."""

    rows: int
    seq_len: int
    jobs: tuple[tuple[str, int, int, int], ...]  # (job, first row, end row, own length if it has dropout else 0)
    n_targets: int  # bucketed


def bucket(n_targets: int) -> int:
    return max(TARGET_BUCKET, -(-n_targets // TARGET_BUCKET) * TARGET_BUCKET)


def graph_key(layout: BatchLayout, n_targets: int, dropout_jobs: frozenset[str] = frozenset()) -> GraphKey:
    """A job's own padded length shapes only its dropout masks: it is part of the key for
    jobs with dropout alone, so other jobs' batches of varying lengths still share graphs."""
    jobs = tuple((j.job, j.row_start, j.row_end, j.seq_len if j.job in dropout_jobs else 0) for j in layout.jobs)
    return GraphKey(layout.rows, layout.seq_len, jobs, bucket(n_targets))


def capturable(layout: BatchLayout, adapters: Sequence[Any], backend: str) -> bool:
    """Whether this batch's step may be recorded: a replay must do exactly what the step's
    eager warm-up did (same kernels, tables and dropout masks), with no host decision inside."""
    if not layout.training or backend not in ("auto", "torch", "triton"):
        return False
    return all(isinstance(a, StageAdapter) for a in adapters)


@dataclass
class StaticStep:
    """One shape's graph and the static tensors it reads and writes."""

    layout: BatchLayout
    ids: Tensor
    index: Tensor
    token: Tensor
    slot: Tensor
    weights: Tensor
    out: Tensor
    params: list[Tensor]
    grads: list[Tensor]
    op_cache: dict = field(default_factory=dict)
    generators: dict = field(default_factory=dict)  # (job, linear index) -> dropout generator
    backend: str = "torch"  # the multi-LoRA path the warm-up and the recording take
    graph: Any = None

    @classmethod
    def allocate(cls, batch: FusedBatch, params: list[Tensor]) -> "StaticStep":
        n_t, n = bucket(batch.targets.index.shape[0]), len(batch.micros)
        device = batch.input_ids.device
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return cls(
            layout=batch.layout,
            ids=torch.empty_like(batch.input_ids),
            index=torch.empty(n_t, dtype=batch.targets.index.dtype, device=device),
            token=torch.empty(n_t, dtype=batch.targets.token.dtype, device=device),
            slot=torch.empty(n_t, dtype=batch.targets.slot.dtype, device=device),
            weights=torch.empty(n, dtype=torch.float32, device=device),
            out=torch.empty(n, dtype=torch.float32, device=device),
            params=params,
            grads=[p.grad for p in params],  # type: ignore[misc]
        )

    def fill(self, batch: FusedBatch) -> None:
        """Copy the batch into the static inputs (padding targets point at slot n, dropped)
        and seed the dropout generators for its (job, step, micro-batch)."""
        n_t = batch.targets.index.shape[0]
        self.ids.copy_(batch.input_ids)
        self.index[:n_t].copy_(batch.targets.index)
        self.index[n_t:].zero_()
        self.token[:n_t].copy_(batch.targets.token)
        self.token[n_t:].zero_()
        self.slot[:n_t].copy_(batch.targets.slot)
        self.slot[n_t:].fill_(len(self.weights))
        self.weights.copy_(batch.loss_weights)
        rows = {j.job: j for j in batch.layout.jobs}
        for (job, index), gen in self.generators.items():
            gen.manual_seed(dropout_seed_of(rows[job], index))


def step_grads(stage: StageModel, c: StaticStep) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Each micro-batch's weighted loss sum and the parameters' gradients, over the static buffers."""
    n = len(c.weights)
    hidden = stage(c.ids, c.layout, op_cache=c.op_cache, generators=c.generators, backend=c.backend)
    sums = job_loss_sums(stage.lm_head, hidden, Targets(c.index, c.token, c.slot, n + 1), stage.fused_loss)
    per_job = sums[:n] * c.weights
    return per_job.detach(), torch.autograd.grad(per_job.sum(), c.params)


def static_step(stage: StageModel, c: StaticStep) -> None:
    """The step over static buffers: what the warm-up runs and the graph records.

    Same math as the trainer's eager step; gradients are added into `.grad` explicitly
    (autograd's own accumulation may swap in a new tensor, which a graph cannot follow).
    """
    per_job, grads = step_grads(stage, c)
    torch._foreach_add_(c.grads, list(grads))
    c.out.copy_(per_job)


def warm_up(stage: StageModel, c: StaticStep, batch: FusedBatch, eager_backend: str) -> str | None:
    """The eager run a recording needs (its gradients count). If the step's own backend,
    picked for it by `auto`, fails (Triton cannot compile or launch on this machine), warn,
    redo the step on the eager path and keep that backend; returns the failure then.

    A failed step has added nothing: gradients are added only after all are computed,
    and `fill` reseeds the dropout generators before the second try. A backend the user
    named fails as it would eagerly."""
    try:
        static_step(stage, c)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of the picked kernels: the dense path still works
        if c.backend == eager_backend:
            raise
        lines = str(exc).strip().splitlines()
        failure = type(exc).__name__ + (f": {lines[0]}" if lines else "")
        warnings.warn(f"the fused Triton kernels failed in a recorded step ({failure}); recorded steps take the "
                      f"dense path for the rest of this run (run.backend: torch silences this)", stacklevel=3)
        c.backend = eager_backend
        c.op_cache.clear()
        c.fill(batch)
        static_step(stage, c)
        return failure


class StepGraphs:
    """Runs fused forward + backward passes through CUDA graphs where it can (see module doc)."""

    def __init__(self, stage: StageModel, max_graphs: int = MAX_GRAPHS,
                 recording_lock: threading.Lock | None = None) -> None:
        """`recording_lock`: held while a graph records, and shared with whatever makes
        CUDA calls from another thread of this process (the background writer's copies):
        during a recording in CUDA's global capture mode another thread's potentially
        unsafe calls (a synchronous copy to the host) are refused, and may spoil it."""
        self.stage, self.max_graphs = stage, max_graphs
        self.recording_lock = recording_lock or threading.Lock()
        self.graphs: dict[GraphKey, StaticStep] = {}
        self.seen: set[GraphKey] = set()
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self.replays = 0
        self.captures = 0
        self.off: str | None = None  # why graphs were turned off for the run, if they were
        self.kernels_failed: str | None = None  # why recorded steps fell back to the dense path, if they did
        self.compiled_ahead = False  # the first new shape's kernels were compiled side by side (`compile_ahead`)

    def step(self, batch: FusedBatch, adapters: Sequence[StageAdapter]) -> Tensor | None:
        """Forward + backward of `batch` with every job's gradient added into its `.grad`.

        Returns each micro-batch's weighted loss sum, or None when this batch should run
        eagerly (not capturable, or a shape seen for the first time).
        """
        if self.off is not None or not capturable(batch.layout, adapters, self.stage.routing.backend):
            return None
        dropout_jobs = frozenset(a.job for a in adapters if a.dropout > 0)
        key = graph_key(batch.layout, batch.targets.index.shape[0], dropout_jobs)
        captured = self.graphs.get(key)
        if captured is not None:
            captured.fill(batch)
            captured.graph.replay()
            self.replays += 1
            return captured.out.clone()
        if key not in self.seen or len(self.graphs) >= self.max_graphs:
            if len(self.seen) >= MAX_SEEN:
                self.seen.clear()
            self.seen.add(key)
            if not self.compiled_ahead:
                self.compiled_ahead = True
                self.compile_ahead(batch, [p for a in adapters for p in a.parameters()])
            return None
        return self._capture(key, batch, [p for a in adapters for p in a.parameters()])

    def forget(self, job: str) -> None:
        """Drop the graphs of batches that hold this job (it finished: its tensors go)."""
        for key in [k for k in self.graphs if any(j[0] == job for j in k.jobs)]:
            del self.graphs[key]
        if not self.graphs:
            # With its last graph gone the allocator releases the pool, and capturing into
            # a released pool that still holds a block fails its use_count assert (seen
            # on an H200 when every graph of a run held the first job to finish): new pool.
            self.pool = torch.cuda.graph_pool_handle()
        self.seen = {k for k in self.seen if all(j[0] != job for j in k.jobs)}

    def compile_ahead(self, batch: FusedBatch, params: list[Tensor]) -> None:
        """Compile every Triton kernel the recorded step of `batch` will launch (and the
        eager steps before it: the fused norms, SwiGLU, rotary and loss are the same
        variants), side by side on threads, by running that step with launches turned
        into compiles (`compile_ahead.compile_only`); its results are dropped, nothing is
        added to `.grad`. On an empty Triton cache the kernels compiled one by one as the
        first steps met them (bench/README.md, 2026-12-03, seventh session). Skipped with
        the GEMM autotuner on (it would time launches that do not run), under Triton's
        interpreter (nothing compiles there) and with MLORA_COMPILE_AHEAD=0 (to measure
        it); a failure here is left to the warm-up, which meets it again and falls back
        (`warm_up`)."""
        try:
            from mlora.ops.kernels import compile_ahead, fused_gemm
            from mlora.ops.kernels.interpret import INTERPRET
        except ImportError:  # no Triton: nothing to compile
            return
        if (INTERPRET or fused_gemm.autotuning() or not compile_ahead.available()
                or os.environ.get("MLORA_COMPILE_AHEAD", "1") == "0"):
            return
        c = StaticStep.allocate(batch, params)
        c.backend = self._recorded_backend(batch)
        c.fill(batch)
        try:
            with compile_ahead.compile_only():
                step_grads(self.stage, c)
        except Exception:  # noqa: BLE001 - the warm-up reports it (or falls back) when it meets it
            pass

    def _recorded_backend(self, batch: FusedBatch) -> str:
        """The operator path a recorded step takes: `graphed_backend`'s pick, or the eager
        path once the picked kernels have failed in this run."""
        if self.kernels_failed:
            return resolve_backend(self.stage.routing.backend)
        return graphed_backend(self.stage.routing.backend, batch.input_ids.device, self.stage.compute_dtype)

    def _capture(self, key: GraphKey, batch: FusedBatch, params: list[Tensor]) -> Tensor:
        """Run this batch eagerly on the side stream (the warm-up the capture needs), then record it."""
        c = StaticStep.allocate(batch, params)
        eager = resolve_backend(self.stage.routing.backend)
        c.backend = self._recorded_backend(batch)
        c.fill(batch)
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            self.kernels_failed = warm_up(self.stage, c, batch, eager) or self.kernels_failed
        main.wait_stream(self.stream)
        result = c.out.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            for gen in c.generators.values():  # made by the warm-up; replays read their seeds
                graph.register_generator_state(gen)
            # Recording runs nothing: the kernels only execute on replay.
            with self.recording_lock, torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                static_step(self.stage, c)
        except RuntimeError as exc:  # the model runs something a graph cannot hold (a host sync)
            device = batch.input_ids.device
            index = device.index if device.index is not None else torch.cuda.current_device()
            _clear_capture_marks([torch.cuda.default_generators[index], *c.generators.values()])
            self.off = f"{exc}".splitlines()[0]
            self.graphs.clear()
            warnings.warn(f"CUDA graphs are off for the rest of this run: recording a step failed ({self.off}); "
                          "training goes on without them (run.cuda_graphs: false silences this)", stacklevel=2)
            return result
        c.graph = graph
        self.graphs[key] = c
        self.captures += 1
        return result


def _clear_capture_marks(generators: Sequence[torch.Generator]) -> None:
    """Torch closes a capture on each generator it registered only when the capture
    succeeds; after a failed one every later random op of such a generator outside a
    graph raises "Offset increment outside graph capture" (the default CUDA generator
    is always registered: one failed recording broke `torch.randn` on CUDA for the rest
    of the process). A fresh copy of each state, same seed and offset, is not marked."""
    for gen in generators:
        gen.graphsafe_set_state(gen.clone_state())
