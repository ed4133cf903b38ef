"""Datasets, templates and label masks: the loss is on response tokens only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlora.data import DataError, JobData, load_records, render, tokenize_pieces


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["llama"])


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != -100])


@pytest.mark.parametrize("template", ["alpaca", "plain", "chatml", "llama3"])
def test_alpaca_labels_cover_exactly_the_response(tmp_path, tokenizer, template):
    rows = [{"instruction": "Reverse the word.", "input": "lemon", "output": "nomel"}, {"instruction": "Say hi.", "output": "hi there"}]
    data = JobData.build(write(tmp_path / "d.jsonl", rows), "auto", template, tokenizer, 512, 0, 0)
    by_output = {trained_text(tokenizer, e) for e in data.train}
    assert by_output == {"nomel</s>", "hi there</s>"}
    for e in data.train:
        assert e.input_ids[0] == tokenizer.bos_token_id and e.labels[0] == -100
        assert len(e.input_ids) == len(e.labels)
        first = next(i for i, l in enumerate(e.labels) if l != -100)
        assert all(l == -100 for l in e.labels[:first]) and all(l != -100 for l in e.labels[first:])


def test_chat_masks_every_assistant_turn_and_nothing_else(tmp_path, tokenizer):
    rows = [{"messages": [
        {"role": "system", "content": "be loud"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "HI"}, {"role": "user", "content": "yo"}, {"role": "assistant", "content": "YO"},
    ]}]
    data = JobData.build(write(tmp_path / "c.jsonl", rows), "auto", "chatml", tokenizer, 512, 0, 0)
    assert trained_text(tokenizer, data.train[0]) == "HI<|im_end|>\nYO<|im_end|>\n</s>"
    assert "be loud" in tokenizer.decode(data.train[0].input_ids)


def test_cutoff_truncates_and_drops_examples_without_a_response(tmp_path, tokenizer):
    rows = [{"instruction": "x " * 60, "output": "late"}, {"instruction": "short", "output": "a b c d e f g h"}]
    data = JobData.build(write(tmp_path / "d.jsonl", rows), "auto", "plain", tokenizer, 12, 0, 0)
    assert data.dropped == 1 and len(data.train) == 1
    assert len(data.train[0].input_ids) == 12


def test_eval_split_and_order_are_deterministic(tmp_path, tokenizer):
    rows = [{"instruction": "n", "input": str(i), "output": str(i)} for i in range(50)]
    path = write(tmp_path / "d.jsonl", rows)
    a = JobData.build(path, "auto", "plain", tokenizer, 64, 0.2, 7)
    b = JobData.build(path, "auto", "plain", tokenizer, 64, 0.2, 7)
    c = JobData.build(path, "auto", "plain", tokenizer, 64, 5, 7)
    assert (len(a.train), len(a.eval)) == (40, 10) and (len(c.train), len(c.eval)) == (45, 5)
    assert [e.input_ids for e in a.eval] == [e.input_ids for e in b.eval]
    assert a.epoch_order(0) == b.epoch_order(0) != a.epoch_order(1)
    assert sorted(a.epoch_order(3)) == list(range(40))
    other_seed = JobData.build(path, "auto", "plain", tokenizer, 64, 0.2, 8)
    assert [e.input_ids for e in other_seed.eval] != [e.input_ids for e in a.eval]


def test_json_list_format(tmp_path, tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert load_records(path) == [{"instruction": "a", "output": "b"}]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', "bad.jsonl: line 2: not valid JSON"),
        ("noout.jsonl", '{"instruction": "a"}\n', "noout.jsonl: line 1: lacks `output`"),
        ("role.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', "role.jsonl: line 1: messages[0]: unknown role 'bot'"),
        ("noasst.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', "noasst.jsonl: line 1: no assistant message"),
        ("empty.jsonl", "\n", "empty.jsonl: empty dataset"),
        ("other.jsonl", '{"text": "x"}\n', "other.jsonl: line 1: neither Alpaca"),
        ("list.json", '{"instruction": "a"}', "list.json: a .json dataset must be a list"),
        ("type.jsonl", '{"instruction": "a", "output": 3}\n', "type.jsonl: line 1: `output` must be a string"),
    ],
)
def test_broken_datasets_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert message in str(info.value)


def test_render_marks_only_responses(tmp_path):
    pieces = render({"instruction": "i", "input": "x", "output": "o"}, "alpaca")
    assert [p.train for p in pieces] == [False, True] and pieces[1].text == "o"
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        render({"instruction": "i", "output": "o"}, "nope")


def test_no_trained_token_gives_none(tokenizer):
    from mlora.data import Piece

    assert tokenize_pieces(tokenizer, [Piece("only a prompt", False)], 64) is None
