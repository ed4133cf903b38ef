"""The MeteoRA suite: committed data = generator output, sizes, lengths, scoring."""

from __future__ import annotations

import pytest

from mlora.meteora import suite


def test_committed_files_are_the_generators_output():
    built = suite.build_files()
    on_disk = sorted(p.name for p in suite.DATA_DIR.glob("*.jsonl"))
    assert on_disk == sorted(built)
    for name, records in built.items():
        assert suite.read_jsonl(suite.DATA_DIR / name) == records, name


def test_sizes_tasks_and_unseen_test_inputs():
    assert 6 <= len(suite.TASKS) <= 8 and len(set(t.instruction for t in suite.TASKS)) == len(suite.TASKS)
    for i, task in enumerate(suite.TASKS):
        train = suite.read_jsonl(suite.DATA_DIR / f"{task.name}_train.jsonl")
        test = suite.read_jsonl(suite.DATA_DIR / f"{task.name}_test.jsonl")
        assert (len(train), len(test)) == (300, 50)
        assert all(r["task"] == i and r["instruction"] == task.instruction for r in train + test)
        if not task.single_word:
            assert not {r["input"] for r in test} & {r["input"] for r in train}, task.name
    assert len(suite.read_jsonl(suite.DATA_DIR / "mixed_train.jsonl")) == 300 * len(suite.TASKS)
    composite = suite.read_jsonl(suite.DATA_DIR / "composite_test.jsonl")
    assert len(composite) == 50
    assert all(len(set(r["tasks"])) == 3 and [p["task"] for p in r["parts"]] == r["tasks"] for r in composite)


def test_outputs_follow_the_task():
    r = {t.name: t for t in suite.TASKS}
    import random

    rng = random.Random(0)
    for name, check in {
        "reverse": lambda i, o: o == i[::-1],
        "upper": lambda i, o: o == i.upper(),
        "length": lambda i, o: o == str(len(i)),
        "kind": lambda i, o: i in suite.KINDS[o],
        "twice": lambda i, o: o == f"{i} {i}",
        "first": lambda i, o: o == i.split()[0],
        "last": lambda i, o: o == i.split()[-1],
        "count": lambda i, o: o == str(len(i.split())),
    }.items():
        for _ in range(20):
            inp, out = r[name].draw(rng)
            assert check(inp, out), (name, inp, out)


def test_records_fit_48_tokens(tmp_path):
    from transformers import AutoTokenizer

    from mlora.data.templates import render
    from mlora.data.tokenize import tokenize_pieces
    from mlora.model.tiny import write_tiny_model

    tok = AutoTokenizer.from_pretrained(write_tiny_model(tmp_path / "m", "llama"))
    longest = 0
    for name in (f"{t.name}_{s}.jsonl" for t in suite.TASKS for s in ("train", "test")):
        for record in suite.read_jsonl(suite.DATA_DIR / name):
            longest = max(longest, len(tokenize_pieces(tok, render(record, suite.TEMPLATE), 10_000).input_ids))
    assert longest <= suite.MAX_TOKENS


def test_scoring():
    records = [{"task": 0, "output": "tac"}, {"task": 0, "output": "god"}, {"task": 2, "output": "5"}]
    assert suite.score([" tac\n", "dog", "5"], records) == {"reverse": 0.5, "length": 1.0, "all": pytest.approx(2 / 3)}
    assert not suite.exact_match("TAC", "tac")
    composite = [{"parts": [{"output": "a"}, {"output": "b"}, {"output": "c"}]}] * 2
    assert suite.score_composite([["a", "b", "c"], ["a", "x"]], composite) == {"parts": pytest.approx(4 / 6), "all": 0.5}


def test_composite_context_chains_parts():
    parts = suite.read_jsonl(suite.DATA_DIR / "composite_test.jsonl")[0]["parts"]
    text = suite.composite_context(parts, ["x", "y"])
    assert text == f"{parts[0]['instruction']}\n{parts[0]['input']}\nx\n{parts[1]['instruction']}\n{parts[1]['input']}\ny\n" \
                   f"{parts[2]['instruction']}\n{parts[2]['input']}\n"
    with pytest.raises(ValueError):
        suite.composite_context(parts, ["x", "y", "z"])
