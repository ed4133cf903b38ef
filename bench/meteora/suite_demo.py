"""CPU end-to-end on the MeteoRA suite: K task LoRAs → one MeteoRA model → scores.

Needs a tiny model folder and one trained PEFT LoRA per suite task (folders named like
the tasks, e.g. the output of `mlora train` on bench/meteora/suite_loras.yaml). Prints
and writes JSON with: each LoRA on its own task's test set (the oracle: the right
adapter chosen by hand), the MeteoRA model (gates trained here) on the mixed test set
and on the composite records (three tasks in one context), and how often the traced
adapter of each generated token is the token's task.

    .venv/bin/python -m bench.meteora.suite_demo --model models/tiny-llama --loras out/suite-loras --out out/meteora
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mlora.meteora import suite
from mlora.meteora.adapter import MeteoraAdapter, linear_shapes
from mlora.meteora.generate import LoraDelta, generate, generate_chain, load_model
from mlora.meteora.train import examples, train_gates
from mlora.data.templates import prompt_text


def evaluate(model, tokenizer, records, adapter, trace: str | None = None) -> tuple[dict[str, float], list]:
    prompts = [prompt_text(r, suite.TEMPLATE) for r in records]
    outs = generate(model, tokenizer, prompts, adapter=adapter, max_new_tokens=16, batch_size=64, trace=trace)
    return suite.score([o.text for o in outs], records), outs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--loras", type=Path, required=True, help="folder with one PEFT folder per task name")
    ap.add_argument("--out", type=Path, required=True, help="where the MeteoRA folder and results.json go")
    ap.add_argument("--gate-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    shapes, n_layers = linear_shapes(model)
    folders = [args.loras / name for name in suite.TASK_NAMES]
    results: dict = {"oracle": {}}

    for i, (name, folder) in enumerate(zip(suite.TASK_NAMES, folders)):
        records = suite.read_jsonl(suite.DATA_DIR / f"{name}_test.jsonl")
        results["oracle"][name] = evaluate(model, tokenizer, records, LoraDelta.load(folder, shapes))[0][name]
    results["oracle"]["all"] = sum(results["oracle"].values()) / len(suite.TASK_NAMES)

    adapter = MeteoraAdapter.from_adapters(folders, shapes, names=list(suite.TASK_NAMES), n_layers=n_layers,
                                           base_model=str(args.model), top_k=args.top_k, backend="loop")
    train = examples(tokenizer, suite.read_jsonl(suite.DATA_DIR / "mixed_train.jsonl"), suite.TEMPLATE)
    start = time.perf_counter()
    logs = train_gates(model, tokenizer, adapter, train, steps=args.gate_steps, lr=args.lr, log_every=20)
    results["gate_training"] = {"seconds": round(time.perf_counter() - start, 1), "log": [vars(l) for l in logs]}
    folder = args.out / "meteora"
    if not (folder / "meteora_config.json").exists():
        adapter.save(folder)
    adapter.record_gate_logits = False

    mixed = suite.read_jsonl(suite.DATA_DIR / "mixed_test.jsonl")
    scores, outs = evaluate(model, tokenizer, mixed, adapter, trace="majority")
    results["meteora"] = scores
    routed = [[a[0] == r["task"] for a in o.adapters] for o, r in zip(outs, mixed) if o.adapters]
    results["meteora_token_routing"] = sum(sum(x) for x in routed) / max(1, sum(len(x) for x in routed))

    composite = suite.read_jsonl(suite.DATA_DIR / "composite_test.jsonl")
    answers, _ = generate_chain(model, tokenizer, composite, adapter=adapter)
    results["meteora_composite"] = suite.score_composite(answers, composite)
    oracle_chain = []
    for record in composite:  # the right LoRA for each part, chosen by hand, in the same growing context
        done: list[str] = []
        for part in record["parts"]:
            lora = LoraDelta.load(folders[part["task"]], shapes)
            text = suite.composite_context(record["parts"], done)
            done.append(generate(model, tokenizer, [text], adapter=lora, max_new_tokens=16)[0].text.strip())
        oracle_chain.append(done)
    results["oracle_composite"] = suite.score_composite(oracle_chain, composite)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'task':10s} {'oracle':>7s} {'meteora':>8s}")
    for name in suite.TASK_NAMES:
        print(f"{name:10s} {results['oracle'][name]:7.2f} {results['meteora'].get(name, 0.0):8.2f}")
    print(f"{'all':10s} {results['oracle']['all']:7.2f} {results['meteora']['all']:8.2f}")
    print(f"composite (all three parts right): oracle {results['oracle_composite']['all']:.2f}, "
          f"meteora {results['meteora_composite']['all']:.2f}; per part: oracle {results['oracle_composite']['parts']:.2f}, "
          f"meteora {results['meteora_composite']['parts']:.2f}")
    print(f"generated tokens whose majority adapter is their task's: {results['meteora_token_routing']:.2f}")
    return results


if __name__ == "__main__":
    main()
