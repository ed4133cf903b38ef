"""`mlora generate`, `mlora eval` and the routing/scoring functions behind them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mlora.cli import main
from mlora.meteora import evaluate as ev
from mlora.meteora import suite
from mlora.meteora.adapter import MeteoraAdapter, linear_shapes
from mlora.meteora.generate import generate, load_model, open_adapter, trace_path
from mlora.model.peft_io import AdapterMeta, save_adapter

TARGETS = ("q_proj", "v_proj", "down_proj")
PROMPT = "reverse the word\\napple"  # as typed on a command line: \n is a newline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from mlora.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("eval") / "llama", "llama")


@pytest.fixture(scope="module")
def model_tok(tiny):
    return load_model(tiny)


def random_lora(folder: Path, shapes: dict, seed: int, widen: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    weights = {p: (torch.randn(4, d_in + widen, generator=gen) * 0.3, torch.randn(d_out, 4, generator=gen) * 0.3)
               for p, (d_in, d_out) in shapes.items() if p.rsplit(".", 1)[1] in TARGETS}
    return save_adapter(folder, AdapterMeta(4, 8.0, 0.0, False, TARGETS, "tiny"), weights)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_tok) -> Path:
    """A run's output as `mlora eval` reads it: a LoRA per task, a mixed LoRA, a MeteoRA folder."""
    model, _ = model_tok
    shapes, layers = linear_shapes(model)
    run = tmp_path_factory.mktemp("run") / "out"
    folders = [random_lora(run / name, shapes, i) for i, name in enumerate(suite.TASK_NAMES)]
    random_lora(run / "mixed", shapes, 99)
    meteora = MeteoraAdapter.from_adapters(folders, shapes, names=list(suite.TASK_NAMES), n_layers=layers, top_k=2, backend="loop")
    with torch.no_grad():
        for g in meteora.gates.values():
            g.normal_()
    meteora.save(run / "meteora")
    return run


# ---------------------------------------------------------------- pure functions, known answers


def test_token_choice_and_routing_accuracy_on_known_inputs():
    # 3 linears × 4 tokens; adapters 0..2
    top1 = torch.tensor([[0, 1, 2, 1],
                         [0, 1, 1, 2],
                         [1, 2, 0, 0]])
    assert ev.token_choice(top1, 3).tolist() == [0, 1, -1, -1]  # tokens 2 and 3 tie three ways / 1-1-1
    labels = torch.tensor([0, 1, 1, ev.IGNORE])
    # token 0 right, token 1 right, token 2 tied (wrong), token 3 left out
    assert ev.routing_accuracy([top1], [labels], 3) == pytest.approx(2 / 3)
    # per (token, linear): token 0: 2/3, token 1: 2/3, token 2: 1/3 → 5 of 9
    assert ev.linear_accuracy([top1], [labels]) == pytest.approx(5 / 9)
    # two rows pool their tokens, not their row means
    other = torch.tensor([[2, 2], [2, 2], [2, 2]])
    assert ev.routing_accuracy([top1, other], [labels, torch.tensor([2, 0])], 3) == pytest.approx(3 / 5)
    shares = ev.top1_shares(top1, 3)
    assert shares.shape == (4, 3) and torch.allclose(shares.sum(-1), torch.ones(4))
    assert shares[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    with pytest.raises(ValueError):
        ev.routing_accuracy([top1], [labels[:3]], 3)
    assert torch.isnan(torch.tensor(ev.routing_accuracy([top1], [torch.full((4,), ev.IGNORE)], 3)))


def test_part_tokens_labels_each_part_and_skips_its_first_tokens(model_tok):
    _, tok = model_tok
    parts = suite.read_jsonl(suite.DATA_DIR / "composite_test.jsonl")[0]["parts"]
    answers = [p["output"] for p in parts]
    t2a = [7 - i for i in range(8)]  # adapters in reverse task order
    ids, labels, starts = ev.part_tokens(tok, parts, answers, t2a, skip=2)
    assert len(ids) == len(labels) and ids[0] == tok.bos_token_id and labels[0] == ev.IGNORE
    # the ids are the composite text, part by part
    assert tok.decode(ids[1:]) == suite.composite_context(parts, answers[:2]) + answers[2] + "\n"
    ends = starts[1:] + [len(ids)]
    for part, s, e in zip(parts, starts, ends):
        assert labels[s : s + 2] == [ev.IGNORE, ev.IGNORE]
        assert set(labels[s + 2 : e]) == {7 - part["task"]}
    assert starts[0] == 1 and starts == sorted(starts)


def test_check_targets_and_table_flags():
    per_task = {"a": {"hand": 0.9, "mixed": 0.5, "meteora": 0.86}, "b": {"hand": 0.8, "mixed": 0.2, "meteora": 0.74}}
    t = ev.check_targets(per_task, {"single": 0.96, "composite": 0.949})
    assert t["routing_single"]["met"] and not t["routing_composite"]["met"] and not t["meteora_vs_hand"]["met"]
    assert t["meteora_vs_hand"]["worst_task"] == "b" and t["meteora_vs_hand"]["worst_gap"] == pytest.approx(0.06)
    assert ev.check_targets({"a": per_task["a"]}, {})["meteora_vs_hand"]["met"]
    # exactly 5 points below is within 5 points
    assert ev.check_targets({"a": {"hand": 0.9, "meteora": 0.85}}, {})["meteora_vs_hand"]["met"]


def test_first_line_and_prompt_files(tmp_path):
    assert ev.first_line("  elppa\nreverse the word\n") == "elppa"
    assert ev.templated(PROMPT, "plain") == "reverse the word\napple\n"
    assert ev.templated("hi", "chatml") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"instruction": "count the words", "input": "cat dog"}\n\n{"instruction": "last word"}\n')
    assert ev.read_prompts(jsonl, "plain") == ["count the words\ncat dog\n", "last word\n"]
    plain = tmp_path / "p.txt"
    plain.write_text("first word\\nsun sky\nuppercase the word\n")
    assert ev.read_prompts(plain, "plain") == ["first word\nsun sky\n", "uppercase the word\n"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ev.MeteoraError, match=r"bad\.jsonl: line 1: needs `instruction`"):
        ev.read_prompts(tmp_path / "bad.jsonl", "plain")
    chat = tmp_path / "chat.jsonl"  # ShareGPT and messages records prompt the same
    chat.write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n')
    first, second = ev.read_prompts(chat, "chatml")
    assert first == second and "hi" in first
    (tmp_path / "who.jsonl").write_text('{"conversations": [{"from": "bot", "value": "x"}]}\n')
    with pytest.raises(ev.MeteoraError, match=r"who\.jsonl: line 1: conversations\[0\]: unknown speaker 'bot'"):
        ev.read_prompts(tmp_path / "who.jsonl", "plain")
    # the other record files of training data: a .json list, a spreadsheet, a Parquet table
    (tmp_path / "p.json").write_text('[{"instruction": "count the words", "input": "cat dog"}]')
    (tmp_path / "p.csv").write_text('instruction,input\n"count the words","cat dog"\n')
    assert ev.read_prompts(tmp_path / "p.json", "plain") == ev.read_prompts(tmp_path / "p.csv", "plain") == [
        "count the words\ncat dog\n"]
    (tmp_path / "bad.csv").write_text("prompt\nx\n")
    with pytest.raises(ev.MeteoraError, match=r"bad\.csv: line 2: needs `instruction`"):
        ev.read_prompts(tmp_path / "bad.csv", "plain")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "hi"}]}]), tmp_path / "p.parquet")
    assert ev.read_prompts(tmp_path / "p.parquet", "chatml") == [second]


def test_task_to_adapter_by_name(run_dir, tmp_path):
    assert ev.task_to_adapter(run_dir / "meteora", suite.TASK_NAMES, []) == list(range(8))
    cfg = json.loads((run_dir / "meteora" / "meteora_config.json").read_text())
    cfg["adapters"] = cfg["adapters"][::-1]
    shuffled = tmp_path / "m"
    shutil.copytree(run_dir / "meteora", shuffled)
    (shuffled / "meteora_config.json").write_text(json.dumps(cfg))
    assert ev.task_to_adapter(shuffled, suite.TASK_NAMES, []) == [7 - i for i in range(8)]


# ---------------------------------------------------------------- mlora generate


def test_cli_generate_with_a_lora_matches_the_library(tiny, model_tok, run_dir, capsys):
    model, tok = model_tok
    assert main(["generate", str(tiny), "--adapter", str(run_dir / "reverse"), "--prompt", PROMPT,
                 "--prompt", "count the words\\ncat dog", "--max-new-tokens", "5", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    want = generate(model, tok, ["reverse the word\napple\n", "count the words\ncat dog\n"],
                    adapter=open_adapter(run_dir / "reverse", model), max_new_tokens=5)
    assert out[0] == "=== [1] 'reverse the word\\napple\\n'"
    assert out[1] == want[0].text and out[3] == want[1].text and len(out) == 4
    # sampling is seeded: the same seed gives the same text
    args = ["generate", str(tiny), "--prompt", PROMPT, "--do-sample", "--temperature", "1.5", "--top-p", "0.9",
            "--max-new-tokens", "6", "--seed", "4"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == first


def test_cli_generate_show_routing(tiny, model_tok, run_dir, capsys):
    model, tok = model_tok
    folder = run_dir / "meteora"
    assert main(["generate", str(tiny), "--adapter", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6",
                 "--show-routing"]) == 0
    lines = capsys.readouterr().out.splitlines()
    meteora = open_adapter(folder, model, backend="loop")
    gen = generate(model, tok, ["reverse the word\napple\n"], adapter=meteora, max_new_tokens=6, trace="last")[0]
    assert lines[1] == gen.text and lines[2].startswith("--- routing") and "each of the 12 gated linears" in lines[2]
    routed = lines[3:]
    assert len(routed) == len(gen.token_ids) >= 1
    # the teacher-forced routing of each generated token is the one generation used (same linear, same step)
    top1 = ev.generated_routing(tok, model, meteora, ["reverse the word\napple\n"], [gen])[0]
    col = meteora.paths.index(trace_path(meteora.paths))
    assert top1[:, col].tolist() == [a[0] for a in gen.adapters]
    names = list(suite.TASK_NAMES)
    for line, tok_id, choices in zip(routed, gen.token_ids, top1):
        assert line.strip().startswith(repr(tok.decode([tok_id])))
        counts = torch.bincount(choices, minlength=8)
        best = int(counts.argmax())
        assert f"{names[best]} {100 * int(counts[best]) / len(choices):.0f}%" in line


@pytest.mark.parametrize("case", ["missing", "empty", "other_base", "meteora_other_base", "routing_with_lora", "no_model"])
def test_cli_generate_errors_name_the_path(case, tiny, model_tok, run_dir, tmp_path, capsys):
    model, _ = model_tok
    shapes, layers = linear_shapes(model)
    model_dir, adapter, extra = str(tiny), tmp_path / "nothing", []
    if case == "empty":
        adapter.mkdir()
    elif case == "other_base":
        random_lora(adapter, shapes, 0, widen=8)
    elif case == "meteora_other_base":
        wide = random_lora(tmp_path / "wide", shapes, 0, widen=8)
        cfg = json.loads((run_dir / "meteora" / "meteora_config.json").read_text())
        cfg["adapters"][3]["folder"] = str(wide)
        shutil.copytree(run_dir / "meteora", adapter)
        (adapter / "meteora_config.json").write_text(json.dumps(cfg))
    elif case == "routing_with_lora":
        adapter, extra = run_dir / "kind", ["--show-routing"]
    elif case == "no_model":
        model_dir, adapter = str(tmp_path / "no-model"), run_dir / "kind"
    code = main(["generate", model_dir, "--adapter", str(adapter), "--prompt", "x", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("mlora generate: error: ")
    named = {"meteora_other_base": tmp_path / "wide", "no_model": model_dir}.get(case, adapter)
    assert str(named) in err
    if case == "other_base":
        assert "the base linear" in err
    if case == "meteora_other_base":
        assert "trained on another base" in err


# ---------------------------------------------------------------- mlora eval


def test_cli_eval_writes_results_and_plot(tiny, run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", str(run_dir), "--model", str(tiny), "--limit", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "eval.json").read_text())
    assert list(results["per_task"]) == list(suite.TASK_NAMES)
    assert results["records_per_task"] == 2 and results["composite"]["records"] == 2
    for row in results["per_task"].values():
        assert set(row) == {"hand", "mixed", "meteora"} and all(0.0 <= v <= 1.0 for v in row.values())
        assert row["hand"] in (0.0, 0.5, 1.0)  # two records per task
    r = results["routing"]
    assert 0.0 <= r["composite"] <= 1.0 and 0.0 <= r["single"] <= 1.0 and r["gated_linears"] == 12
    assert set(r["per_task"]) == set(suite.TASK_NAMES) and r["skip_tokens"] == ev.SKIP_TOKENS
    t = results["targets"]
    assert t["routing_composite"]["met"] == (r["composite"] >= 0.95) and t["routing_single"]["value"] == r["single"]
    gaps = {k: v["hand"] - v["meteora"] for k, v in results["per_task"].items()}
    assert t["meteora_vs_hand"]["gaps"] == pytest.approx(gaps)
    assert t["meteora_vs_hand"]["met"] == all(g <= 0.05 + 1e-9 for g in gaps.values())
    assert results["adapters"]["meteora_adapter_of_task"] == {n: i for i, n in enumerate(suite.TASK_NAMES)}
    assert (out / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "target MeteoRA within 5 points of hand on every task: " in printed
    met = [t[k]["met"] for k in ("routing_single", "routing_composite", "meteora_vs_hand")]
    assert printed.count("NOT MET") == met.count(False) and printed.count(": MET") == met.count(True)
    for name in suite.TASK_NAMES:
        assert any(line.startswith(name) for line in printed.splitlines())


def test_cli_eval_errors(tiny, run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir), "--model", str(tiny), "--meteora", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run_dir / "nope") in err
    assert main(["eval", str(run_dir), "--model", str(tiny), "--tasks-adapters", "reverse", "upper"]) == 2
    assert "2 names for the suite's 8 tasks" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--model", str(tiny), "--mixed", "kind_of_missing"]) == 2
    assert str(run_dir / "kind_of_missing") in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--model", str(tiny), "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
