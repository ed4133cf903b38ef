"""The floor under a frozen-base LoRA training step on this GPU: the base model's
matmuls and attention, nothing else, replayed until the clock settles.

A step of any trainer that fine-tunes LoRA adapters over a frozen Llama (PEFT, mLoRA,
mlora) must at least run, for the e2e benchmark's batch (4 jobs × 4 rows × 512 tokens =
8192 tokens): in every layer the seven projections forward (x·Wᵀ) and their input
gradients (dy·W; none for layer 0's q, k and v, whose input needs no gradient), the
causal attention forward and backward; and the LM head forward and backward. This
script records exactly those kernels (cuBLAS through `torch.mm`, torch's SDPA) as one
CUDA graph and replays it back to back, and reports the step time at the start (the
GPU at its boost clock) and sustained (where a 700 W part settles under a dense load),
and the tokens/s that floor allows. No LoRA, norm, activation, loss, residual add or
optimizer is in it, so a real step cannot be faster; divided by a PEFT run's tokens/s
on the same machine it bounds the ratio any LoRA trainer can reach there.

Beside the floor (`--variants`), the same skeleton with every projection through
mlora's multi-LoRA operator (each job's adapters over its tokens) shows what the
operator adds; all variants are recorded over one set of weights and replayed in
rounds of `--seconds`, the order rotated each round.

    PYTHONPATH=. python3 bench/e2e/skeleton.py --shapes 7b,1.1b --variants cublas --seconds 20 --rounds 1
    PYTHONPATH=. python3 bench/e2e/skeleton.py --shapes 7b --seconds 5 --rounds 3 --out skeleton.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.e2e.bench_e2e import SHAPES, matmul_peak_tflops  # noqa: E402


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    inter: int
    heads: int
    kv_heads: int
    vocab: int
    rows: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.rows * self.seq

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def dims_of(shape: str, vocab: int, rows: int, seq: int) -> Dims:
    s = SHAPES[shape]
    return Dims(s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"], s["num_attention_heads"],
                s["num_key_value_heads"], vocab, rows, seq)


def hf_params(shape: str, vocab: int) -> int:
    """Parameters of the Hugging Face model bench_e2e builds (its MFU numerator's P)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], vocab_size=vocab, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def matmul_flops(d: Dims) -> int:
    """FLOPs of the matmuls `step` runs (attention's own products not counted)."""
    per_layer = d.hidden * (2 * d.hidden + 2 * d.kv_dim) + 3 * d.hidden * d.inter  # weights of the 7 projections
    qkv = d.hidden * (d.hidden + 2 * d.kv_dim)
    forward = 2 * d.tokens * (d.layers * per_layer + d.vocab * d.hidden)
    backward = forward - 2 * d.tokens * qkv  # layer 0's q, k, v need no input gradient
    return forward + backward


class _Both(torch.autograd.Function):
    """The MLP's gate output passed on while the up projection's gets the same gradient:
    keeps both products (and their input gradients) in the step without the activation's
    elementwise passes."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:  # type: ignore[override]
        return gate.view_as(gate)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return grad, grad


PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


class Skeleton:
    """Random frozen weights of one model shape (and, with `jobs`, each job's r-rank adapters
    on every projection), the step's input and its logits' gradient, fixed in memory so a
    step can be recorded once and replayed.

    `variant` says how a projection runs: "cublas" x·Wᵀ alone (the floor); "triton-split",
    "triton-fused" or "dense" mlora's multi-LoRA operator with the jobs' adapters over
    their tokens, on the Triton backend with its GEMMs split (the LoRA part from Triton,
    the base product from cuBLAS) or fused (one Triton GEMM; MLORA_TRITON_BASE), or on
    the dense backend; "triton-nolora" the fused Triton GEMMs with one slot and no tokens
    in it (no LoRA work: that GEMM's own cost against cuBLAS)."""

    def __init__(self, d: Dims, device: torch.device, dtype: torch.dtype, variant: str = "cublas",
                 jobs: int = 4, rank: int = 16, base: Skeleton | None = None) -> None:
        self.d, self.variant = d, variant
        if base is not None:  # the same frozen weights and inputs as another variant
            self.layers, self.head, self.x, self.d_logits = base.layers, base.head, base.x, base.d_logits
        else:
            def w(out_f: int, in_f: int) -> Tensor:
                return torch.randn(out_f, in_f, device=device, dtype=dtype) * in_f**-0.5

            self.layers = [dict(q=w(d.hidden, d.hidden), k=w(d.kv_dim, d.hidden), v=w(d.kv_dim, d.hidden),
                                o=w(d.hidden, d.hidden), gate=w(d.inter, d.hidden), up=w(d.inter, d.hidden),
                                down=w(d.hidden, d.inter)) for _ in range(d.layers)]
            self.head = w(d.vocab, d.hidden)
            self.x = torch.randn(d.tokens, d.hidden, device=device, dtype=dtype)
            self.d_logits = torch.randn(d.tokens, d.vocab, device=device, dtype=dtype) * d.vocab**-0.5
        self.cache: dict = {}  # the operator's per-batch tables, kept alive for the recorded graph
        self.adapters: list[dict[str, tuple[list[Tensor], list[Tensor]]]] = []
        if variant == "cublas":
            return
        from mlora.ops.multi_lora import Segment

        slots = 1 if variant == "triton-nolora" else jobs
        per_job = d.tokens // jobs
        self.segments = [] if variant == "triton-nolora" else [
            Segment(slot=j, start=j * per_job, end=(j + 1) * per_job) for j in range(jobs)]
        self.scales = [2.0] * slots
        for layer in self.layers:  # fp32 masters, as the trainer keeps them; B random, not zero
            self.adapters.append({
                name: ([(torch.randn(rank, wt.shape[1], device=device) * wt.shape[1]**-0.5).requires_grad_()
                        for _ in range(slots)],
                       [(torch.randn(wt.shape[0], rank, device=device) * 0.01).requires_grad_() for _ in range(slots)])
                for name, wt in layer.items()})

    def context(self) -> contextlib.AbstractContextManager:
        """What the step runs under while it is warmed up and recorded: the Triton
        variants' MLORA_TRITON_BASE."""
        from mlora.ops.triton_multi_lora import base_gemm_set

        return base_gemm_set({"triton-split": "split", "triton-fused": "fused", "triton-nolora": "fused"}.get(self.variant))

    def params(self) -> list[Tensor]:
        return [t for layer in self.adapters for a, b in layer.values() for t in (*a, *b)]

    def proj(self, i: int, name: str, x: Tensor) -> Tensor:
        weight = self.layers[i][name]
        if self.variant == "cublas":
            y = torch.mm(x, weight.t())
            return y if y.requires_grad else y.requires_grad_()  # layer 0's q, k, v: attention still backward
        from mlora.ops.multi_lora import multi_lora_linear

        a, b = self.adapters[i][name]
        backend = "torch" if self.variant == "dense" else "triton"
        y = multi_lora_linear(x, weight, None, a, b, self.scales, self.segments, backend=backend, cache=self.cache)
        return y if y.requires_grad else y.requires_grad_()

    def _heads(self, t: Tensor, n: int) -> Tensor:
        d = self.d
        return t.view(d.rows, d.seq, n, d.head_dim).transpose(1, 2)

    def step(self) -> None:
        """Forward through every layer and the head, then backward from the logits."""
        d = self.d
        x = self.x
        for i in range(d.layers):
            q, k, v = (self.proj(i, n, x) for n in ("q", "k", "v"))
            attn = F.scaled_dot_product_attention(self._heads(q, d.heads), self._heads(k, d.kv_heads),
                                                  self._heads(v, d.kv_heads), is_causal=True,
                                                  enable_gqa=d.kv_heads != d.heads)
            o = self.proj(i, "o", attn.transpose(1, 2).reshape(d.tokens, d.hidden))
            x = self.proj(i, "down", _Both.apply(self.proj(i, "gate", o), self.proj(i, "up", o)))
        logits = torch.mm(x, self.head.t())
        params = self.params()
        for p in params:
            p.grad = None
        torch.autograd.backward(logits, self.d_logits)


def record(model: Skeleton) -> torch.cuda.CUDAGraph:
    """Two eager warm-up steps on a side stream (compiles, fills the operator's tables),
    then the step recorded."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with model.context():
        with torch.cuda.stream(side):
            for _ in range(2):
                model.step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            model.step()
    torch.cuda.synchronize()
    return graph


def replay_for(graph: torch.cuda.CUDAGraph, seconds: float) -> list[float]:
    """Replay back to back for `seconds`; each replay's device time in ms."""
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            events.append((a, b))
        events[-4][0].synchronize()  # keep the host at most a few steps ahead
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


def run_shape(shape: str, variants: list[str], args: argparse.Namespace, peak: float) -> list[dict]:
    """Every variant recorded over one set of weights, then replayed in rounds of
    `args.seconds` each, the order rotated per round (the clock under a power limit moves
    with the machine and the minute, so the variants share both)."""
    d = dims_of(shape, args.vocab, args.rows, args.seq)
    torch.manual_seed(0)
    models: dict[str, Skeleton] = {}
    for v in variants:
        base = next(iter(models.values()), None)
        models[v] = Skeleton(d, torch.device("cuda"), torch.bfloat16, v, args.jobs, args.rank, base=base)
    graphs = {v: record(m) for v, m in models.items()}
    rounds: dict[str, list[list[float]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            print(f"  {shape} {v} round {r + 1} from {time.strftime('%H:%M:%S')}", flush=True)
            rounds[v].append(replay_for(graphs[v], args.seconds))
    flops = matmul_flops(d)
    params = hf_params(shape, args.vocab)
    out = []
    for v in variants:
        first = statistics.median(rounds[v][0][:5])
        last = statistics.median([t for times in rounds[v] for t in times[len(times) // 2:]])
        out.append(dict(shape=shape, variant=v, tokens_per_step=d.tokens, replays=sum(map(len, rounds[v])),
                        first_ms=first, sustained_ms=last,
                        tokens_per_s_first=d.tokens / first * 1e3, tokens_per_s_sustained=d.tokens / last * 1e3,
                        base_matmul_tflops_sustained=flops / last / 1e9,
                        mfu_first=4 * params * d.tokens / (first * 1e-3) / (peak * 1e12),
                        mfu_sustained=4 * params * d.tokens / (last * 1e-3) / (peak * 1e12),
                        times_ms=[[round(t, 3) for t in times] for times in rounds[v]]))
    del graphs, models
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="7b,1.1b")
    parser.add_argument("--variants", default="cublas,triton-split,triton-fused,triton-nolora,dense",
                        help="how the projections run: cublas (the floor), triton-split, triton-fused, triton-nolora, dense")
    parser.add_argument("--seconds", type=float, default=6.0, help="replay time of one variant in one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4, help="jobs whose adapters the operator variants train")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=16, help="rows per step (4 jobs × micro-batch 4)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--out", help="JSON file for the rows (each replay's time included)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("skeleton.py needs a CUDA GPU")
    peak = matmul_peak_tflops(torch.device("cuda"), torch.bfloat16, 8192)
    variants = args.variants.split(",")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; burst matmul peak {peak:.0f} TFLOP/s "
          f"(bench_e2e's MFU denominator); {args.rounds} rounds of {args.seconds:.0f} s per variant")
    rows = []
    for shape in args.shapes.split(","):
        rows += run_shape(shape, variants, args, peak)
    print(f"{'shape':6s} {'variant':14s} {'first ms':>9s} {'sustained ms':>13s} {'tokens/s first':>15s} "
          f"{'sustained':>10s} {'MFU first':>10s} {'sustained':>10s}")
    for r in rows:
        print(f"{r['shape']:6s} {r['variant']:14s} {r['first_ms']:9.1f} {r['sustained_ms']:13.1f} "
              f"{r['tokens_per_s_first']:15,.0f} {r['tokens_per_s_sustained']:10,.0f} "
              f"{r['mfu_first']:10.1%} {r['mfu_sustained']:10.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "peak_tflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
