"""Cutting the decoder blocks into pipeline stages of balanced cost.

Cost is forward FLOPs per token, the proxy for both compute and weight memory: each
block costs its parameter count (attention + MLP projections), the first stage also
pays the embedding lookup, the last the final norm, LM head and loss. The split that
minimises the most expensive stage is found exactly by dynamic programming over the
contiguous cuts (n_layers ≤ a few hundred, so O(P·n²) is nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


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

    def block_cost(self) -> float:
        attn = self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return float(attn + mlp)

    def head_cost(self) -> float:
        return float(self.hidden * self.vocab)

    def embed_cost(self) -> float:
        return float(self.hidden)  # a lookup: bandwidth, not FLOPs


@dataclass(frozen=True)
class Split:
    """Stage k holds blocks [bounds[k], bounds[k+1])."""

    bounds: tuple[int, ...]
    costs: tuple[float, ...]

    def stage_range(self, k: int) -> tuple[int, int]:
        return self.bounds[k], self.bounds[k + 1]

    def describe(self) -> str:
        rows = []
        total = sum(self.costs)
        for k in range(len(self.costs)):
            lo, hi = self.stage_range(k)
            extra = (" + embed" if k == 0 else "") + (" + norm/head/loss" if k == len(self.costs) - 1 else "")
            rows.append(f"stage {k}: blocks {lo}..{hi - 1}{extra} ({100 * self.costs[k] / total:.1f}% of cost)")
        return "\n".join(rows)


def balanced_split(shape: ModelShape, n_stages: int) -> Split:
    """The contiguous split of blocks into n_stages with the smallest maximum stage cost."""
    n = shape.n_layers
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {n_stages} stages (each stage needs a block)")
    block = shape.block_cost()

    def cost(k: int, lo: int, hi: int) -> float:
        c = (hi - lo) * block
        if k == 0:
            c += shape.embed_cost()
        if k == n_stages - 1:
            c += shape.head_cost()
        return c

    inf = float("inf")
    # best[k][i]: minimal max cost of stages 0..k-1 covering blocks [0, i)
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for i in range(k, n - (n_stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], cost(k - 1, j, i))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds = [n]
    for k in range(n_stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    bounds.reverse()
    return Split(tuple(bounds), tuple(cost(k, bounds[k], bounds[k + 1]) for k in range(n_stages)))


def explicit_split(shape: ModelShape, layers_per_stage: Sequence[int]) -> Split:
    """A split given in the run file as blocks per stage, checked to cover the model."""
    if any(n < 1 for n in layers_per_stage) or sum(layers_per_stage) != shape.n_layers:
        raise ValueError(
            f"layers_per_stage {list(layers_per_stage)} must be positive and sum to the model's {shape.n_layers} blocks"
        )
    bounds = [0]
    for n in layers_per_stage:
        bounds.append(bounds[-1] + n)
    p = len(layers_per_stage)
    block = shape.block_cost()
    costs = tuple(
        (bounds[k + 1] - bounds[k]) * block + (shape.embed_cost() if k == 0 else 0) + (shape.head_cost() if k == p - 1 else 0)
        for k in range(p)
    )
    return Split(tuple(bounds), costs)
