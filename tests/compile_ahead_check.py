"""A recorded Triton step after `StepGraphs.compile_ahead` compiles nothing more (one GPU).

Run by tests/test_step_graphs.py in a fresh process whose TRITON_CACHE_DIR is an empty
folder, without Triton's interpreter: each kernel variant Triton compiles, and each
launcher it builds, adds an entry there, so the entries after the first sighting (where
the step's kernels are compiled side by side) must be all there will be after an eager
step, a recorded one and a replay. Prints one JSON line: the entry counts, the entries
made later, the launchers that could not be built ahead, the first sighting's seconds,
the losses.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlora.config import JobSpec  # noqa: E402
from mlora.config.schema import ALL_TARGET_MODULES  # noqa: E402
from mlora.data.tokenize import Example  # noqa: E402
from mlora.jobs import PendingMicro  # noqa: E402
from mlora.model.loss import job_loss_sums  # noqa: E402
from mlora.model.stage import stage_from_model  # noqa: E402
from mlora.runtime.batch import collate  # noqa: E402
from mlora.runtime.step_graphs import StepGraphs  # noqa: E402
from mlora.runtime.trainer import make_adapter  # noqa: E402


def entries() -> list[str]:
    """Each cache entry as its folder name and the files that name what it holds (a
    kernel's binary, a launcher's module), sorted."""
    root = os.environ["TRITON_CACHE_DIR"]
    out = []
    for name in sorted(os.listdir(root)):
        files = [f for f in os.listdir(os.path.join(root, name)) if f.endswith((".cubin", ".so"))]
        out.append(f"{name[:8]}:{','.join(sorted(files))}")
    return out


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "needs compiled kernels"
    device = torch.device("cuda")
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).requires_grad_(False).eval()
    stage = stage_from_model(model, fused_ops=True)
    specs = [JobSpec(name="a", dataset="-", lora_r=8, target_modules=ALL_TARGET_MODULES, seed=1),
             JobSpec(name="b", dataset="-", lora_r=16, lora_dropout=0.1, target_modules=ALL_TARGET_MODULES, seed=2)]
    adapters = []
    for spec in specs:
        adapters.append(make_adapter(spec, stage, device))
        stage.routing.adapters[spec.name] = adapters[-1]
    gen = torch.Generator().manual_seed(0)
    rows = [[torch.randint(3, 512, (64,), generator=gen).tolist() for _ in range(2)] for _ in specs]
    exs = [[Example(r, [-100] + r[1:]) for r in job] for job in rows]
    micros = [PendingMicro(s.name, 0, 0, True, (0, 1)) for s in specs]
    batch = collate(micros, exs, [s.seed for s in specs], 0, device, loss_weights=[1 / 126, 1 / 126])
    graphs = StepGraphs(stage)
    params = [p for a in adapters for p in a.parameters()]

    before = entries()
    from mlora.ops.kernels import compile_ahead

    failed: list[str] = []  # launchers the compile-ahead could not build, and why
    build = compile_ahead.build_launcher

    def build_launcher(kernel: object) -> str | None:
        error = build(kernel)
        if error is not None:
            failed.append(error[:300])
        return error

    compile_ahead.build_launcher = build_launcher
    start = time.perf_counter()
    assert graphs.step(batch, adapters) is None  # first sighting: compiled ahead, then run eagerly
    ahead_s = time.perf_counter() - start
    after_ahead = entries()
    untouched = all(p.grad is None or not p.grad.any() for p in params)
    hidden = stage(batch.input_ids, batch.layout)
    eager = (job_loss_sums(stage.lm_head, hidden, batch.targets, stage.fused_loss) * batch.loss_weights)
    eager.sum().backward()
    # Drop the eager step's autograd graph before the recording: nodes it kept alive were
    # made on the default stream, and the capture on its side stream failed on them.
    eager = eager.detach()
    del hidden
    recorded = graphs.step(batch, adapters)  # warm-up on the Triton path, then the recording
    replayed = graphs.step(batch, adapters)
    torch.cuda.synchronize()
    after_steps = entries()
    print(json.dumps(dict(before=len(before), after_ahead=len(after_ahead), after_steps=len(after_steps),
                          later=sorted(set(after_steps) - set(after_ahead)), launchers_failed=failed, ahead_s=ahead_s,
                          grads_untouched=untouched, captures=graphs.captures, replays=graphs.replays,
                          eager=eager.tolist(), recorded=recorded.tolist(), replayed=replayed.tolist())))


if __name__ == "__main__":
    main()
