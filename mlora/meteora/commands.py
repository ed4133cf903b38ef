"""`mlora generate`: prompts in, continuations out, and with --show-routing the adapters per token.

The routing shown for a generated token is the one that produced it: at the position
before it, each gated linear's top-1 gate choice; the line lists the adapters by their
share of the linears (e.g. `reverse 93%  upper 7%` over 28 linears). It is recomputed
by one teacher-forced pass over prompt + generated tokens, which routes every position
as generation did (the model is causal).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlora.meteora.adapter import MeteoraAdapter, MeteoraError
from mlora.meteora.evaluate import generated_routing, quiet, read_prompts, routing_lines, templated
from mlora.meteora.generate import generate, load_model, open_adapter


def collect_prompts(prompts: list[str], prompts_file: str | None, template: str) -> list[str]:
    out = [templated(p, template) for p in prompts]
    if prompts_file:
        out += read_prompts(prompts_file, template)
    if not out:
        raise MeteoraError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    return out


def generate_from_cli(args: argparse.Namespace) -> int:
    from mlora.model.stage import read_config

    prompts = collect_prompts(args.prompt, args.prompts_file, args.template)
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise MeteoraError(f"{args.adapter}: no such adapter folder")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise MeteoraError("--max-new-tokens and --batch-size must be at least 1")
    if args.do_sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise MeteoraError("sampling needs --temperature > 0 and --top-p in (0, 1]")
    quiet()
    read_config(args.model_dir)  # a one-line error for a folder that is not a model
    model, tokenizer = load_model(args.model_dir, device=args.device)
    adapter = open_adapter(args.adapter, model) if args.adapter is not None else None
    if args.show_routing and not isinstance(adapter, MeteoraAdapter):
        raise MeteoraError(f"{args.adapter or '(no adapter)'}: --show-routing needs a MeteoRA folder (meteora_config.json)")
    gens = generate(model, tokenizer, prompts, adapter=adapter, max_new_tokens=args.max_new_tokens,
                    do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    batch_size=args.batch_size)
    routes = None
    if args.show_routing:
        assert isinstance(adapter, MeteoraAdapter)
        routes = generated_routing(tokenizer, model, adapter, prompts, gens, args.batch_size)
        names = [n for n, _ in adapter.config.adapters]
    for i, (prompt, gen) in enumerate(zip(prompts, gens), 1):
        print(f"=== [{i}] {prompt!r}")
        print(gen.text)
        if routes is not None:
            print(f"--- routing: per generated token, the top-1 adapter of each of the {len(adapter.paths)} gated linears "
                  f"(share of linears; top-k={adapter.top_k} adapters are mixed per linear)")
            for line in routing_lines(tokenizer, gen.token_ids, routes[i - 1], names):
                print(line)
    return 0
