"""Evaluating MeteoRA on the suite (`mlora eval`), and the routing `mlora generate` shows.

`run_eval` reads one run's output folder: a LoRA per suite task (folders named like the
tasks), one LoRA trained on all tasks mixed, and the MeteoRA folder. It scores, per
task, exact match of the answer's first line for

- hand: the task's own LoRA on the task's test set (the upper bound),
- mixed: the mixed LoRA on the same records,
- meteora: the MeteoRA model on the same records, no task given,

the gate's routing accuracy, and composite prompts (three tasks asked one after another
in one context; `suite.composite_context`). It writes eval.json and routing.png.

Routing accuracy is measured by teacher forcing: each record (prompt and reference
answer, every part of a composite record) goes through the MeteoRA model once, and at
every token each gated linear's top-1 gate choice is taken. A token's choice is the
adapter most of the linears pick first (a tie counts as wrong); the accuracy is the
fraction of tokens whose choice is their task. The BOS and the first `skip` tokens of
each part (the gate has not seen the task's keyword yet) are left out. The mean over
(token, linear) pairs is reported too: it is lower, because the first layer's
attention and MLP inputs are the token's embedding alone, so their gates can only
route by token identity and share words ("the", "word", the inputs) across tasks.
The routing of a causal model at a position depends on the tokens up to it only, so a
teacher-forced pass over a generated text gives the routing each token had during
generation.
"""

from __future__ import annotations

import codecs
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mlora.data.records import RECORD_FILES, DataError, read_raw, sharegpt_as_messages
from mlora.data.templates import TEMPLATES, prompt_text
from mlora.meteora import suite
from mlora.meteora.adapter import CONFIG_FILE as METEORA_CONFIG
from mlora.meteora.adapter import MeteoraAdapter, MeteoraConfig, MeteoraError
from mlora.meteora.generate import Generation, LoraDelta, attach, generate, generate_chain, load_model, open_adapter
from mlora.model.peft_io import CONFIG_FILE as PEFT_CONFIG

IGNORE = -100
SKIP_TOKENS = 3  # left out at the start of each task part when scoring routing
ROUTING_TARGET = 0.95
MAX_GAP = 0.05  # MeteoRA within 5 points of the hand-picked adapter, per task
MAX_NEW_TOKENS = 16
EVAL_DIR = "eval"  # under the run folder, unless --out says otherwise
PLOT_FILE = "routing.png"
RESULTS_FILE = "eval.json"


def quiet() -> None:
    """No weight-loading progress bars or cache deprecation notices in command output."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")


# ---------------------------------------------------------------- prompts (mlora generate)


def templated(instruction: str, template: str, input_text: str = "") -> str:
    """The prompt for an instruction (and input) under a template; `\\n` escapes become newlines."""
    decode = lambda s: codecs.decode(s, "unicode_escape") if "\\" in s else s  # noqa: E731
    return prompt_text({"instruction": decode(instruction), "input": decode(input_text)}, template)


def read_prompts(path: str | Path, template: str) -> list[str]:
    """Prompts from a file: records (instruction/input, messages or ShareGPT conversations)
    from a .jsonl, .json, .parquet, .csv or .tsv file, as in training data; else one
    instruction a line."""
    path = Path(path)
    if not path.is_file():
        raise MeteoraError(f"{path}: prompts file not found")
    if template not in TEMPLATES:
        raise MeteoraError(f"unknown template {template!r}: use one of {', '.join(sorted(TEMPLATES))}")
    if path.suffix.lower() not in RECORD_FILES:
        lines = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        if not lines:
            raise MeteoraError(f"{path}: no prompts")
        return [templated(line, template) for line in lines]
    try:
        rows, where = read_raw(path)
        if not rows:
            raise MeteoraError(f"{path}: no prompts")
        out = []
        for n, record in rows:
            if isinstance(record, dict) and "conversations" in record:  # ShareGPT, as in training data
                record = sharegpt_as_messages(record, f"{path}: {where} {n}")
            if not isinstance(record, dict) or not ("instruction" in record or "messages" in record):
                raise MeteoraError(f"{path}: {where} {n}: needs `instruction` (and optional `input`), `messages` or "
                                   "`conversations`")
            out.append(prompt_text(record, template))
    except DataError as exc:
        raise MeteoraError(str(exc)) from exc
    return out


# ---------------------------------------------------------------- routing


@torch.no_grad()
def route_rows(model: nn.Module, adapter: MeteoraAdapter, rows: Sequence[Sequence[int]], batch_size: int = 64) -> list[Tensor]:
    """Each row's routing at every position: top-k adapter indices [P, len(row), k] (P = adapter.paths)."""
    device = next(model.parameters()).device
    handles = attach(model, adapter)
    saved = adapter.trace, adapter.record_gate_logits
    adapter.trace, adapter.record_gate_logits = True, False
    out: list[Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(r) for r in batch)
            ids = torch.tensor([list(r) + [0] * (width - len(r)) for r in batch], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
            model(input_ids=ids, attention_mask=mask)
            idx = torch.stack([adapter.last_idx[p].view(len(batch), width, -1) for p in adapter.paths]).cpu()
            out.extend(idx[:, b, : len(r)] for b, r in enumerate(batch))
    finally:
        for h in handles:
            h.remove()
        adapter.trace, adapter.record_gate_logits = saved
        adapter.last_idx.clear()
    return out


def token_choice(top1: Tensor, n_adapters: int) -> Tensor:
    """[L]: per token, the adapter most gated linears choose first (top1 [P, L]); -1 where two or more tie."""
    counts = torch.nn.functional.one_hot(top1.long(), n_adapters).sum(0)  # [L, K]
    best, choice = counts.max(-1)
    tied = (counts == best[:, None]).sum(-1) > 1
    return torch.where(tied, torch.full_like(choice, -1), choice)


def _check_rows(top1: Sequence[Tensor], labels: Sequence[Tensor]) -> None:
    if len(top1) != len(labels):
        raise ValueError(f"{len(top1)} routed rows but {len(labels)} label rows")
    for t, lab in zip(top1, labels):
        if t.dim() != 2 or t.shape[1] != len(lab):
            raise ValueError(f"a row's top1 must be [P, L] with L = its {len(lab)} labels, got {tuple(t.shape)}")


def routing_accuracy(top1: Sequence[Tensor], labels: Sequence[Tensor], n_adapters: int) -> float:
    """Fraction of labelled tokens (label != -100) whose `token_choice` is their label.

    top1: per row [P, L], each gated linear's top-1 adapter at each token; labels: per row [L].
    """
    _check_rows(top1, labels)
    hits = count = 0
    for t, lab in zip(top1, labels):
        lab = torch.as_tensor(lab)
        keep = lab != IGNORE
        hits += int((token_choice(t, n_adapters)[keep] == lab[keep]).sum())
        count += int(keep.sum())
    return hits / count if count else float("nan")


def linear_accuracy(top1: Sequence[Tensor], labels: Sequence[Tensor]) -> float:
    """Mean over labelled (token, gated linear) pairs of [top-1 choice == label] (the training log's route_acc)."""
    _check_rows(top1, labels)
    hits = pairs = 0
    for t, lab in zip(top1, labels):
        lab = torch.as_tensor(lab)
        keep = lab != IGNORE
        hits += int((t[:, keep] == lab[keep]).sum())
        pairs += int(keep.sum()) * t.shape[0]
    return hits / pairs if pairs else float("nan")


def top1_shares(top1: Tensor, n_adapters: int) -> Tensor:
    """[L, K]: for each token, the fraction of gated linears whose top-1 choice is each adapter."""
    onehot = torch.nn.functional.one_hot(top1.long(), n_adapters).float()  # [P, L, K]
    return onehot.mean(0)


def part_tokens(
    tokenizer: Any, parts: Sequence[dict], answers: Sequence[str], task_to_adapter: Sequence[int],
    template: str = suite.TEMPLATE, skip: int = SKIP_TOKENS,
) -> tuple[list[int], list[int], list[int]]:
    """Token ids of parts asked in a row with their answers, each token's adapter label, and where each part starts.

    The text is `suite.composite_context` with every answer given: part i is its prompt,
    its answer and a newline, tokenised on its own (as training tokenises pieces). A
    token's label is its part's task mapped to the adapter index; the BOS and the first
    `skip` tokens of each part are labelled -100.
    """
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE] * len(ids)
    starts: list[int] = []
    for part, answer in zip(parts, answers, strict=True):
        piece = tokenizer(prompt_text(part, template) + answer + "\n", add_special_tokens=False)["input_ids"]
        starts.append(len(ids))
        label = task_to_adapter[part["task"]]
        ids += piece
        labels += [IGNORE if j < skip else label for j in range(len(piece))]
    return ids, labels, starts


def generated_routing(
    tokenizer: Any, model: nn.Module, adapter: MeteoraAdapter, prompts: Sequence[str], gens: Sequence[Generation], batch_size: int = 64,
) -> list[Tensor]:
    """Per prompt, [n_generated, P]: each gated linear's top-1 adapter at the position that produced each generated token."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    routes = route_rows(model, adapter, [p + g.token_ids for p, g in zip(prompt_ids, gens)], batch_size)
    return [r[:, len(p) - 1 : len(p) - 1 + len(g.token_ids), 0].t() for r, p, g in zip(routes, prompt_ids, gens)]


def routing_lines(tokenizer: Any, token_ids: Sequence[int], top1: Tensor, names: Sequence[str], show: int = 3) -> list[str]:
    """One line per generated token: the token, then adapters by their share of the gated linears' top-1 choices."""
    lines = []
    for tok, choices in zip(token_ids, top1):
        counts = torch.bincount(choices.long(), minlength=len(names)).tolist()
        ranked = sorted(range(len(names)), key=lambda e: (-counts[e], e))[:show]
        shares = "  ".join(f"{names[e]} {100 * counts[e] / len(choices):.0f}%" for e in ranked if counts[e])
        lines.append(f"  {tokenizer.decode([tok])!r:14s} {shares}")
    return lines


# ---------------------------------------------------------------- scoring and the table


def first_line(text: str) -> str:
    """The answer: the generated text's first line, stripped (every suite answer is one line)."""
    return text.strip().split("\n")[0].strip()


def check_targets(per_task: dict[str, dict[str, float]], routing: dict[str, float],
                  routing_target: float = ROUTING_TARGET, max_gap: float = MAX_GAP) -> dict[str, Any]:
    """Whether routing ≥ target (for each of `routing`'s prompt sets), and MeteoRA ≥ hand − max_gap on every task."""
    gaps = {t: s["hand"] - s["meteora"] for t, s in per_task.items()}
    worst = max(gaps, key=lambda t: gaps[t]) if gaps else None
    out: dict[str, Any] = {
        f"routing_{name}": {"value": value, "target": routing_target, "met": bool(value >= routing_target)}
        for name, value in routing.items()
    }
    out["meteora_vs_hand"] = {
        "max_gap": max_gap, "gaps": gaps, "worst_task": worst,
        "worst_gap": gaps[worst] if worst else 0.0,
        "met": all(g <= max_gap + 1e-9 for g in gaps.values()),
    }
    return out


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def format_table(results: dict[str, Any]) -> str:
    """The printed summary: per-task exact match, routing, composite accuracy, targets."""
    per_task, routing, targets = results["per_task"], results["routing"], results["targets"]
    gap_ok = targets["meteora_vs_hand"]["max_gap"]
    lines = [f"exact match per task ({results['records_per_task']} test records each; MeteoRA given no task)",
             f"{'task':10s} {'hand':>7s} {'mixed':>7s} {'MeteoRA':>8s} {'gap':>6s} {'routing':>8s}"]
    for task, s in per_task.items():
        gap = s["hand"] - s["meteora"]
        flag = "" if gap <= gap_ok + 1e-9 else "  <- more than 5 points below hand"
        lines.append(f"{task:10s} {_pct(s['hand']):>7s} {_pct(s.get('mixed')):>7s} {_pct(s['meteora']):>8s} "
                     f"{100 * gap:+5.1f} {_pct(routing['per_task'].get(task)):>8s}{flag}")
    a = results["all"]
    lines.append(f"{'all':10s} {_pct(a['hand']):>7s} {_pct(a.get('mixed')):>7s} {_pct(a['meteora']):>8s}")
    c = results["composite"]
    lines.append(f"composite ({c['records']} records, 3 tasks in one context): parts right "
                 f"hand {_pct(c['hand']['parts'])}  mixed {_pct(c['mixed']['parts'] if c.get('mixed') else None)}  "
                 f"MeteoRA {_pct(c['meteora']['parts'])}; all three right "
                 f"hand {_pct(c['hand']['all'])}  mixed {_pct(c['mixed']['all'] if c.get('mixed') else None)}  "
                 f"MeteoRA {_pct(c['meteora']['all'])}")
    lines.append(f"routing accuracy (tokens whose majority top-1 adapter over the {routing['gated_linears']} gated linears "
                 f"is their task; prompt and answer tokens past the first {routing['skip_tokens']} of each part): "
                 f"composite {_pct(routing['composite'])}, single-task test {_pct(routing['single'])} "
                 f"(per linear: {_pct(routing['per_linear']['composite']).strip()}, {_pct(routing['per_linear']['single']).strip()})")
    where = {"routing_single": "single-task test prompts", "routing_composite": "composite prompts"}
    for key, label in where.items():
        if key in targets:
            rt = targets[key]
            lines.append(f"target routing >= {100 * rt['target']:.0f}% on {label}: "
                         f"{'MET' if rt['met'] else 'NOT MET'} ({_pct(rt['value']).strip()})")
    mv = targets["meteora_vs_hand"]
    lines.append(f"target MeteoRA within {100 * mv['max_gap']:.0f} points of hand on every task: "
                 f"{'MET' if mv['met'] else 'NOT MET'} (worst {mv['worst_task']}: {100 * mv['worst_gap']:+.1f} points)")
    return "\n".join(lines)


# ---------------------------------------------------------------- the plot


def plot_routing(path: Path, examples: Sequence[dict[str, Any]], names: Sequence[str]) -> Path:
    """One panel per composite record: per token, the share of gated linears choosing each adapter first.

    Each example holds `tokens` (strings), `shares` [L, K], `labels` (the task's adapter
    per token) and `starts` (where each part begins); the true task is drawn as a red
    outline and the part boundaries as dashed lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len(e["tokens"]) for e in examples)
    fig, axes = plt.subplots(len(examples), 1, figsize=(max(8.0, 0.16 * widest + 2), 2.6 * len(examples)), squeeze=False)
    for ax, ex in zip(axes[:, 0], examples):
        shares = torch.as_tensor(ex["shares"]).t().numpy()  # [K, L]
        im = ax.imshow(shares, aspect="auto", cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.scatter(range(len(ex["labels"])), ex["labels"], s=14, facecolors="none", edgecolors="red", linewidths=0.8)
        for s in ex["starts"][1:]:
            ax.axvline(s - 0.5, color="tab:blue", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xticks(range(len(ex["tokens"])), ex["tokens"], fontsize=5, rotation=90)
        ax.set_title(ex["title"], fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    fig.suptitle("MeteoRA: share of gated linears choosing each adapter first, per token "
                 "(red circle: the token's task; dashed: task boundary)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the run


def _adapter_folder(folder: Path, what: str, config_file: str) -> Path:
    if not folder.is_dir():
        raise MeteoraError(f"{folder}: no such folder ({what})")
    if not (folder / config_file).is_file():
        raise MeteoraError(f"{folder}: no {config_file} (not a {what} folder; has the job finished?)")
    return folder


def find_folders(run_dir: Path, task_adapters: Sequence[str], mixed: str | None, meteora: str) -> dict[str, Any]:
    """The run's folders: task LoRAs (in suite task order), the mixed LoRA (or None), the MeteoRA folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MeteoraError(f"{run_dir}: no such run output folder")
    if len(task_adapters) != len(suite.TASKS):
        raise MeteoraError(f"--tasks-adapters: {len(task_adapters)} names for the suite's {len(suite.TASKS)} tasks "
                           f"({', '.join(suite.TASK_NAMES)})")
    return {
        "tasks": [_adapter_folder(run_dir / n, "LoRA", PEFT_CONFIG) for n in task_adapters],
        "mixed": _adapter_folder(run_dir / mixed, "LoRA", PEFT_CONFIG) if mixed else None,
        "meteora": _adapter_folder(run_dir / meteora, "MeteoRA", METEORA_CONFIG),
    }


def task_to_adapter(meteora_dir: Path, task_adapters: Sequence[str], task_folders: Sequence[Path]) -> list[int]:
    """MeteoRA's adapter index for each suite task: by adapter name, else by folder, else in order."""
    config = MeteoraConfig.read(meteora_dir)
    names = [n for n, _ in config.adapters]
    folders = [(Path(f) if Path(f).is_absolute() else meteora_dir / f).resolve() for _, f in config.adapters]
    if all(n in names for n in task_adapters):
        return [names.index(n) for n in task_adapters]
    if all(f.resolve() in folders for f in task_folders):
        return [folders.index(f.resolve()) for f in task_folders]
    if len(names) == len(task_adapters):
        return list(range(len(names)))
    raise MeteoraError(f"{meteora_dir}: its {len(names)} adapters {names} do not match the suite's tasks {list(task_adapters)}")


def _limited(records: list[dict], limit: int | None, key: Callable[[dict], Any] = lambda r: r["task"]) -> list[dict]:
    if limit is None:
        return records
    seen: dict[Any, int] = {}
    out = []
    for r in records:
        if seen.get(key(r), 0) < limit:
            seen[key(r)] = seen.get(key(r), 0) + 1
            out.append(r)
    return out


def _answers(model, tok, records, adapter, batch_size) -> list[str]:
    prompts = [prompt_text(r, suite.TEMPLATE) for r in records]
    return [first_line(g.text) for g in generate(model, tok, prompts, adapter=adapter, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size)]


def chain_by_task(model, tok, records: Sequence[dict], loras: Sequence[LoraDelta], batch_size: int = 64) -> list[list[str]]:
    """Composite records answered part by part in one context, each part with its own task's LoRA."""
    answers: list[list[str]] = [[] for _ in records]
    for step in range(max((len(r["parts"]) for r in records), default=0)):
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(records):
            if len(r["parts"]) > step:
                groups.setdefault(r["parts"][step]["task"], []).append(i)
        for task, todo in sorted(groups.items()):
            prompts = [suite.composite_context(records[i]["parts"], answers[i]) for i in todo]
            outs = generate(model, tok, prompts, adapter=loras[task], max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size)
            for i, g in zip(todo, outs):
                answers[i].append(first_line(g.text))
    return answers


def run_eval(
    run_dir: str | Path,
    model_dir: str | Path,
    *,
    task_adapters: Sequence[str] | None = None,
    mixed: str | None = "mixed",
    meteora: str = "meteora",
    out: str | Path | None = None,
    limit: int | None = None,
    skip: int = SKIP_TOKENS,
    plot_records: int = 3,
    batch_size: int = 64,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score the run's adapters on the suite; write eval.json and routing.png under `out` (default RUN/eval)."""
    from mlora.model.stage import read_config

    start = time.perf_counter()
    quiet()
    run_dir = Path(run_dir)
    task_adapters = list(task_adapters or suite.TASK_NAMES)
    if limit is not None and limit < 1:
        raise MeteoraError(f"--limit must be at least 1, got {limit}")
    folders = find_folders(run_dir, task_adapters, mixed, meteora)
    read_config(model_dir)  # a clear error for a folder that is not a model
    out_dir = Path(out) if out is not None else run_dir / EVAL_DIR
    model, tok = load_model(model_dir, device=device)
    loras = [open_adapter(f, model) for f in folders["tasks"]]
    mixed_lora = open_adapter(folders["mixed"], model) if folders["mixed"] else None
    meteora_adapter = open_adapter(folders["meteora"], model)
    assert isinstance(meteora_adapter, MeteoraAdapter)
    t2a = task_to_adapter(folders["meteora"], task_adapters, folders["tasks"])
    adapter_names = [n for n, _ in meteora_adapter.config.adapters]

    records = _limited(suite.read_jsonl(suite.DATA_DIR / "mixed_test.jsonl"), limit)
    composite = suite.read_jsonl(suite.DATA_DIR / "composite_test.jsonl")[: limit if limit is not None else None]
    by_task = {i: [r for r in records if r["task"] == i] for i in range(len(suite.TASKS))}

    log(f"hand-picked LoRAs on {len(records)} test records …")
    hand = {}
    for i, name in enumerate(suite.TASK_NAMES):
        hand[name] = suite.score(_answers(model, tok, by_task[i], loras[i], batch_size), by_task[i])[name]
    mixed_scores = None
    if mixed_lora is not None:
        log("mixed LoRA …")
        mixed_scores = suite.score(_answers(model, tok, records, mixed_lora, batch_size), records)
    log("MeteoRA, no task given …")
    meteora_scores = suite.score(_answers(model, tok, records, meteora_adapter, batch_size), records)
    per_task = {name: {"hand": hand[name], "mixed": mixed_scores[name] if mixed_scores else None, "meteora": meteora_scores[name]}
                for name in suite.TASK_NAMES}
    n = len(records)
    all_row = {"hand": sum(hand[t] * len(by_task[i]) for i, t in enumerate(suite.TASK_NAMES)) / max(1, n),
               "mixed": mixed_scores["all"] if mixed_scores else None, "meteora": meteora_scores["all"]}

    log(f"composite prompts ({len(composite)} records) …")
    comp_hand = suite.score_composite(chain_by_task(model, tok, composite, loras, batch_size), composite)
    comp_mixed = None
    if mixed_lora is not None:
        comp_mixed = suite.score_composite(generate_chain(model, tok, composite, adapter=mixed_lora, max_new_tokens=MAX_NEW_TOKENS,
                                                          batch_size=batch_size)[0], composite)
    meteora_answers, _ = generate_chain(model, tok, composite, adapter=meteora_adapter, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size)
    comp_meteora = suite.score_composite(meteora_answers, composite)

    log("routing …")
    single = [part_tokens(tok, [r], [r["output"]], t2a, skip=skip) for r in records]
    single_top1 = [r[:, :, 0] for r in route_rows(model, meteora_adapter, [s[0] for s in single], batch_size)]
    single_labels = [torch.tensor(s[1]) for s in single]
    k = len(adapter_names)
    per_task_routing = {
        name: routing_accuracy([t for t, r in zip(single_top1, records) if r["task"] == i],
                               [lab for lab, r in zip(single_labels, records) if r["task"] == i], k)
        for i, name in enumerate(suite.TASK_NAMES) if by_task[i]
    }
    gold = [part_tokens(tok, r["parts"], [p["output"] for p in r["parts"]], t2a, skip=skip) for r in composite]
    gold_top1 = [r[:, :, 0] for r in route_rows(model, meteora_adapter, [g[0] for g in gold], batch_size)]
    gold_labels = [torch.tensor(g[1]) for g in gold]
    routing = {
        "composite": routing_accuracy(gold_top1, gold_labels, k),
        "single": routing_accuracy(single_top1, single_labels, k),
        "per_task": per_task_routing,
        "per_linear": {"composite": linear_accuracy(gold_top1, gold_labels), "single": linear_accuracy(single_top1, single_labels)},
        "skip_tokens": skip,
        "measure": "fraction of tokens whose majority top-1 gate choice over all gated linears is the token's task "
                   "(a tie counts as wrong); prompt and reference-answer tokens, teacher-forced, leaving out the BOS "
                   f"and the first {skip} tokens of each task part. per_linear: the mean over (token, linear) pairs instead",
        "gated_linears": len(meteora_adapter.paths),
    }

    examples = []
    for r, answers in list(zip(composite, meteora_answers))[:plot_records]:
        ids, labels, starts = part_tokens(tok, r["parts"], answers, t2a, skip=0)
        top1 = route_rows(model, meteora_adapter, [ids], batch_size)[0][:, :, 0]
        examples.append({
            "tokens": [repr(tok.decode([t]))[1:-1] for t in ids],  # newlines and control bytes escaped
            "shares": top1_shares(top1, len(adapter_names)),
            "labels": [labels[1] if lab == IGNORE else lab for lab in labels],  # the BOS: drawn at the first part's task
            "starts": starts,
            "title": " → ".join(f"{suite.TASK_NAMES[p['task']]}: {p['input']!r} ⇒ {a!r}" for p, a in zip(r["parts"], answers)),
        })
    plot = plot_routing(out_dir / PLOT_FILE, examples, adapter_names) if examples else None

    results: dict[str, Any] = {
        "run_dir": str(run_dir), "model": str(model_dir),
        "adapters": {"tasks": dict(zip(suite.TASK_NAMES, map(str, folders["tasks"]))),
                     "mixed": str(folders["mixed"]) if folders["mixed"] else None, "meteora": str(folders["meteora"]),
                     "meteora_adapter_of_task": dict(zip(suite.TASK_NAMES, t2a)), "top_k": meteora_adapter.top_k},
        "records_per_task": min(len(v) for v in by_task.values()),
        "answer": "first line of the generated text, stripped; exact match, case-sensitive",
        "per_task": per_task, "all": all_row,
        "composite": {"records": len(composite), "hand": comp_hand, "mixed": comp_mixed, "meteora": comp_meteora},
        "routing": routing,
        "targets": check_targets(per_task, {"single": routing["single"], "composite": routing["composite"]}),
        "out_dir": str(out_dir),
        "plot": str(plot) if plot else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return results
