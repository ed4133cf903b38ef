"""Cutting the decoder blocks into pipeline stages of balanced cost.

Cost is forward FLOPs per token, the proxy for both compute and weight memory: each
block costs its parameter count (attention + MLP projections), the first stage also
pays the embedding lookup, the last the final norm, LM head and loss.

A cut may fall inside a block, between its attention and its MLP (each is "x + f(norm(x))"
on the residual stream, so the stream crosses the cut as it crosses a block's end). Whole
blocks cannot spread the LM head's cost: on a 7B Llama at 4 stages the last stage keeps
26.5 % of the cost against 24.5 % for the others, and every stage runs at the slowest
one's pace; with half-block cuts the stages come within about 1 % of each other. Cuts are
positions in *halves*: half 2i is block i's attention, 2i + 1 its MLP. The split that
minimises the most expensive stage, then the number of cuts inside blocks, is found
exactly by dynamic programming over the contiguous cuts (O(P·n²) for n ≤ a few hundred).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a Llama-layout config that set per-token cost."""

    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def attention_cost(self) -> float:
        return float(self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads))

    def mlp_cost(self) -> float:
        return float(3 * self.hidden * self.intermediate)

    def block_cost(self) -> float:
        return self.attention_cost() + self.mlp_cost()

    def half_cost(self, half: int) -> float:
        """Half 2i is block i's attention, 2i + 1 its MLP."""
        return self.attention_cost() if half % 2 == 0 else self.mlp_cost()

    def head_cost(self) -> float:
        return float(self.hidden * self.vocab)

    def embed_cost(self) -> float:
        return float(self.hidden)  # a lookup: bandwidth, not FLOPs


@dataclass(frozen=True)
class Split:
    """Stage k holds halves [cuts[k], cuts[k+1]) (half 2i: block i's attention, 2i + 1: its MLP)."""

    cuts: tuple[int, ...]
    costs: tuple[float, ...]

    def stage_halves(self, k: int) -> tuple[int, int]:
        return self.cuts[k], self.cuts[k + 1]

    def describe(self) -> str:
        rows = []
        total = sum(self.costs)
        for k in range(len(self.costs)):
            extra = (" + embed" if k == 0 else "") + (" + norm/head/loss" if k == len(self.costs) - 1 else "")
            rows.append(f"stage {k}: {describe_halves(*self.stage_halves(k))}{extra} "
                        f"({100 * self.costs[k] / total:.1f}% of cost)")
        return "\n".join(rows)


def describe_halves(lo: int, hi: int) -> str:
    """'blocks 0..7', 'blocks 0..7 + attention of 8', 'MLP of 8 + blocks 9..15', ..."""
    parts = []
    if lo % 2 == 1:
        parts.append(f"MLP of {lo // 2}")
        lo += 1
    tail = f"attention of {hi // 2}" if hi % 2 == 1 and hi > lo else None
    hi -= hi % 2
    if hi > lo:
        first, last = lo // 2, hi // 2 - 1
        parts.append(f"block {first}" if first == last else f"blocks {first}..{last}")
    if tail:
        parts.append(tail)
    return " + ".join(parts)


def _stage_cost(shape: ModelShape, n_stages: int, k: int, lo: int, hi: int, prefix: Sequence[float]) -> float:
    cost = prefix[hi] - prefix[lo]
    if k == 0:
        cost += shape.embed_cost()
    if k == n_stages - 1:
        cost += shape.head_cost()
    return cost


def _prefix_costs(shape: ModelShape) -> list[float]:
    prefix = [0.0]
    for half in range(2 * shape.n_layers):
        prefix.append(prefix[-1] + shape.half_cost(half))
    return prefix


def balanced_split(shape: ModelShape, n_stages: int, halves: bool = True) -> Split:
    """The contiguous split into n_stages with the smallest maximum stage cost, among
    those the fewest cuts inside a block. `halves=False`: whole blocks only (the split
    of runs checkpointed before half-block cuts existed)."""
    if not 1 <= n_stages <= shape.n_layers:
        raise ValueError(f"cannot cut {shape.n_layers} blocks into {n_stages} stages (each stage needs a block)")
    prefix = _prefix_costs(shape)
    positions = [h for h in range(2 * shape.n_layers + 1) if halves or h % 2 == 0]

    def cost(k: int, lo: int, hi: int) -> float:
        return _stage_cost(shape, n_stages, k, lo, hi, prefix)

    # the smallest maximum first, then, among the splits within it, the fewest cuts inside
    # blocks: one objective for the two would not be exact (a prefix worse on the first
    # may be better on the second once a later stage sets the maximum)
    worst = _best_cuts(positions, n_stages, lambda k, lo, hi, before: max(before, cost(k, lo, hi)))[-1][0]
    limit = worst * (1 + 1e-12)
    cuts = _best_cuts(positions, n_stages,
                      lambda k, lo, hi, before: before + hi % 2 if cost(k, lo, hi) <= limit else float("inf"))
    return cuts_split(shape, [c for _, c in cuts])


def _best_cuts(positions: Sequence[int], n_stages: int, extend: Callable[[int, int, int, float], float]
               ) -> list[tuple[float, int]]:
    """Dynamic programming over contiguous cuts: best[k][i] is the best value of stages
    0..k-1 covering [0, i), `extend(k, j, i, value)` the value with stage k - 1 = [j, i)
    added. Returns (value, cut) from the first cut (0) to the last (the end)."""
    end = positions[-1]
    best: list[dict[int, tuple[float, int]]] = [{0: (0.0, 0)}] + [{} for _ in range(n_stages)]
    for k in range(1, n_stages + 1):
        for i in positions:
            if i == 0 or (k == n_stages) != (i == end):
                continue
            for j, (value, _) in best[k - 1].items():
                if j < i:
                    candidate = extend(k - 1, j, i, value)
                    if candidate < best[k].get(i, (float("inf"), 0))[0]:
                        best[k][i] = (candidate, j)
    if end not in best[n_stages] or best[n_stages][end][0] == float("inf"):
        raise ValueError(f"cannot cut {end // 2} blocks into {n_stages} stages")
    path, at = [], end
    for k in range(n_stages, 0, -1):
        value, before = best[k][at]
        path.append((value, at))
        at = before
    path.append((0.0, 0))
    return path[::-1]


def cuts_split(shape: ModelShape, cuts: Sequence[int]) -> Split:
    """The split at these cuts (halves), with its stages' costs."""
    prefix = _prefix_costs(shape)
    p = len(cuts) - 1
    return Split(tuple(cuts), tuple(_stage_cost(shape, p, k, cuts[k], cuts[k + 1], prefix) for k in range(p)))


def split_as_layers(split: Split) -> list[float]:
    """The split as `run.layers_per_stage` writes it (blocks per stage, halves as .5)."""
    return [(hi - lo) / 2 if (hi - lo) % 2 else (hi - lo) // 2 for lo, hi in zip(split.cuts, split.cuts[1:])]


def explicit_split(shape: ModelShape, layers_per_stage: Sequence[float]) -> Split:
    """A split given in the run file as blocks per stage (halves allowed: 8.5 is eight
    blocks and the attention of a ninth), checked to cover the model."""
    halves = [2 * n for n in layers_per_stage]
    if any(h < 1 or h != int(h) for h in halves) or sum(halves) != 2 * shape.n_layers:
        raise ValueError(
            f"layers_per_stage {list(layers_per_stage)} must be positive multiples of 0.5 "
            f"summing to the model's {shape.n_layers} blocks"
        )
    cuts = [0]
    for h in halves:
        cuts.append(cuts[-1] + int(h))
    return cuts_split(shape, cuts)
