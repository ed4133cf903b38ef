"""Datasets, templates and label masks: the loss is on response tokens only."""

from __future__ import annotations

import json
import sys
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


def test_sharegpt_conversations_read_as_the_same_chat(tmp_path, tokenizer):
    """LLaMA-Factory's ShareGPT layout (`conversations` of from/value, a top-level
    `system`) gives the tokens and labels of the same chat written as `messages`; other
    keys (a MeteoRA `task`) stay."""
    messages = [{"messages": [
        {"role": "system", "content": "be loud"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "HI"}, {"role": "user", "content": "yo"}, {"role": "assistant", "content": "YO"},
    ], "task": 1}]
    sharegpt = [{"system": "be loud", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "HI"}, {"from": "human", "value": "yo"},
        {"from": "gpt", "value": "YO"},
    ], "task": 1}]
    want = JobData.build(write(tmp_path / "m.jsonl", messages), "auto", "chatml", tokenizer, 512, 0, 0)
    for fmt in ("auto", "sharegpt"):
        got = JobData.build(write(tmp_path / "s.jsonl", sharegpt), fmt, "chatml", tokenizer, 512, 0, 0)
        assert [(e.input_ids, e.labels) for e in got.train] == [(e.input_ids, e.labels) for e in want.train]
    assert load_records(tmp_path / "s.jsonl")[0]["task"] == 1


def test_several_files_are_one_dataset(tmp_path, tokenizer):
    """A job's files, read in order, split and shuffled together: the same examples,
    eval split and epoch order as one file holding all their records; each file has its
    own format."""
    rows = [{"instruction": "n", "input": str(i), "output": str(i)} for i in range(30)]
    whole = JobData.build(write(tmp_path / "all.jsonl", rows), "auto", "plain", tokenizer, 64, 5, 3)
    first, second = write(tmp_path / "a.jsonl", rows[:20]), tmp_path / "b.json"
    second.write_text(json.dumps(rows[20:]))
    split = JobData.build([first, second], "auto", "plain", tokenizer, 64, 5, 3)
    assert [e.input_ids for e in split.train] == [e.input_ids for e in whole.train]
    assert [e.input_ids for e in split.eval] == [e.input_ids for e in whole.eval] and len(split.eval) == 5
    assert split.epoch_order(1) == whole.epoch_order(1)
    chat = write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": f"a{i}"}]} for i in range(12)])
    assert len(JobData.build([first, chat], "auto", "plain", tokenizer, 64, 0, 3).train) == 32
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 1: lacks `output`"):
        JobData.build([first, tmp_path / "bad.jsonl"], "auto", "plain", tokenizer, 64, 0, 3)


def test_batched_tokenisation_and_a_shared_cache_give_the_examples_of_one_call_per_text(tmp_path, tokenizer):
    """One batched call over each distinct text gives the ids of one call per text; jobs of
    a sweep over one file tokenise it once and still get their own splits."""
    from mlora.data.tokenize import encode_texts

    texts = ["Reverse the word.", "", "lemon", "Reverse the word.", " spaced  out ", "ünïcode 数字\n"]
    assert encode_texts(tokenizer, texts) == {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts}

    class Counting:  # the tokenizer, counting its calls
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return tokenizer(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    rows = [{"instruction": "n", "input": str(i % 7), "output": str(i)} for i in range(40)]
    path = write(tmp_path / "d.jsonl", rows)
    counting, cache = Counting(), {}
    for seed, split in ((1, 5), (2, 0.25), (3, 0)):
        shared = JobData.build(path, "auto", "alpaca", counting, 64, split, seed, cache=cache)
        alone = JobData.build(path, "auto", "alpaca", tokenizer, 64, split, seed)
        assert [(e.input_ids, e.labels) for e in shared.train] == [(e.input_ids, e.labels) for e in alone.train]
        assert [e.input_ids for e in shared.eval] == [e.input_ids for e in alone.eval]
    assert counting.calls == 1
    JobData.build(path, "auto", "plain", counting, 64, 0, 1, cache=cache)  # another template: its own
    assert counting.calls == 2
    one_by_one = [tokenize_pieces(tokenizer, render(r, "alpaca"), 64) for r in rows]
    assert [(e.input_ids, e.labels) for e in alone.train] == [(e.input_ids, e.labels) for e in one_by_one]


def test_cutoff_truncates_and_drops_examples_without_a_response(tmp_path, tokenizer):
    rows = [{"instruction": "x " * 60, "output": "late"}, {"instruction": "short", "output": "a b c d e f g h"}]
    data = JobData.build(write(tmp_path / "d.jsonl", rows), "auto", "plain", tokenizer, 12, 0, 0)
    assert data.dropped == 1 and len(data.train) == 1
    assert len(data.train[0].input_ids) == 12 and data.train[0].cut and data.cut == 1
    assert data.cutoff_note(12) == ("1 of 2 examples dropped (no response token within cutoff_len=12); "
                                    "1 of 2 cut to 12 tokens (their response's end not trained)")
    roomy = JobData.build(tmp_path / "d.jsonl", "auto", "plain", tokenizer, 512, 0, 0)
    assert (roomy.dropped, roomy.cut, roomy.cutoff_note(512)) == (0, 0, "")


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
    assert other_seed.epoch_order(0) != a.epoch_order(0)
    assert len(JobData.build(path, "auto", "plain", tokenizer, 64, 0, 7).eval) == 0
    assert len(JobData.build(path, "auto", "plain", tokenizer, 64, 500, 7).train) == 1  # one always trains
    train_ids = {tuple(e.input_ids) for e in a.train}
    assert not train_ids & {tuple(e.input_ids) for e in a.eval} and len(train_ids) == 40


def test_json_list_format_and_byte_order_mark(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert load_records(path) == [{"instruction": "a", "output": "b"}]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"instruction": "a", "output": "b"}).encode() + b"\n\n")
    assert load_records(bom, "alpaca") == [{"instruction": "a", "output": "b"}]


def test_spreadsheet_and_parquet_files_read_as_the_same_records(tmp_path, tokenizer):
    """CSV / TSV exports with Alpaca columns (quoted commas and newlines, an empty input,
    a column of other data kept), and Parquet tables of Alpaca or chat records, give the
    examples of the same records in JSONL."""
    import csv

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"instruction": "Say, then stop.", "input": "", "output": "a, b\nc", "source": "x"},
            {"instruction": "Reverse.", "input": "lemon", "output": "nomel", "source": "y"}]
    want = JobData.build(write(tmp_path / "d.jsonl", rows), "auto", "alpaca", tokenizer, 512, 0, 0)
    for name, delimiter in (("d.csv", ","), ("d.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            out = csv.DictWriter(f, ["instruction", "input", "output", "source"], delimiter=delimiter)
            out.writeheader()
            out.writerows(rows)
        assert load_records(tmp_path / name) == rows
        got = JobData.build(tmp_path / name, "auto", "alpaca", tokenizer, 512, 0, 0)
        assert [(e.input_ids, e.labels) for e in got.train] == [(e.input_ids, e.labels) for e in want.train]
    # a MeteoRA job's task column: an adapter's name, or its index as text
    (tmp_path / "t.csv").write_text("instruction,output,task\nr,a,rev\nu,b,1\n")
    tasked = JobData.build(tmp_path / "t.csv", "auto", "plain", tokenizer, 64, 0, 0, task_names=["rev", "up"])
    assert sorted(e.tasks()[0] for e in tasked.train) == [0, 1]
    (tmp_path / "t.csv").write_text("instruction,output,task\nr,a,7\n")
    with pytest.raises(DataError, match=r"task '7' is neither an adapter \(rev, up\) nor an index 0..1"):
        JobData.build(tmp_path / "t.csv", "auto", "plain", tokenizer, 64, 0, 0, task_names=["rev", "up"])
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    for records in (rows, chats):
        pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
        assert load_records(tmp_path / "d.parquet") == records
    # a null cell (a table whose `input` column is empty in some rows) is a field left out
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "input": None, "output": "b"}]), tmp_path / "n.parquet")
    assert load_records(tmp_path / "n.parquet") == [{"instruction": "a", "output": "b"}]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("noout.csv", "instruction,input\nhi,\n", "noout.csv: line 2: lacks `output`"),
        # a blank line and a cell over two lines before it: the line the record starts on
        ("late.csv", 'instruction,output\na,b\n\nc,"d\ne"\n,\nf,g,h\n', "late.csv: line 7: 3 cells, and the header has 2 columns"),
        ("twice.tsv", "output\toutput\na\tb\n", "twice.tsv: line 1: a column name appears twice"),
        ("header.csv", "\ninstruction,output\n,\n", "header.csv: empty dataset"),
        ("bad.parquet", "not parquet", "bad.parquet: not a readable Parquet file"),
    ],
)
def test_broken_spreadsheets_and_tables_name_file_and_row(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    with pytest.raises(DataError) as info:
        load_records(tmp_path / name)
    assert message in str(info.value)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"d\.parquet: reading Parquet needs pyarrow \(pip install pyarrow"):
        load_records(tmp_path / "d.parquet")


def test_demo_data_loads_in_its_formats():
    from mlora.demo.tasks import DATA_DIR

    for path in sorted(DATA_DIR.glob("*.jsonl")):
        records = load_records(path)
        assert len(records) == 400 and ("messages" in records[0]) == path.name.endswith("_chat.jsonl")
        assert path.stat().st_size < 100_000


def test_demo_files_are_what_the_generators_write(tmp_path, tokenizer):
    from mlora.demo.tasks import DATA_DIR, TASKS, write_all

    written = write_all(tmp_path)
    assert {p.name for p in written} == {p.name for p in DATA_DIR.glob("*.jsonl")} == {f"{t}.jsonl" for t in TASKS} | {"upper_chat.jsonl"}
    for path in written:
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), f"rerun python -m mlora.demo.tasks ({path.name})"
        data = JobData.build(path, "auto", "chatml" if "chat" in path.name else "plain", tokenizer, 48, 0, 0)
        assert data.dropped == 0 and max(len(e.input_ids) for e in data.train) <= 24


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
        ("late.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', "late.jsonl: line 3: lacks `output`"),
        ("bad.json", '[{"instruction": "a",\n "output": }]', "bad.json: not valid JSON (line 2)"),
        ("rec.json", '[{"instruction": "a", "output": "b"}, {"output": "c"}]', "rec.json: record 2: lacks `instruction`"),
        ("nomsg.jsonl", '{"messages": []}\n', "nomsg.jsonl: line 1: `messages` must be a non-empty list"),
        ("norole.jsonl", '{"messages": [{"content": "x"}]}\n', "norole.jsonl: line 1: messages[0] needs `role`"),
        ("absent.jsonl", None, "absent.jsonl: file not found"),
        ("tool.jsonl", '{"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f"}]}\n',
         "tool.jsonl: line 1: conversations[1]: unknown speaker 'function_call'"),
        ("novalue.json", '[{"conversations": [{"from": "human"}]}]', "novalue.json: record 1: conversations[0] needs `from`"),
        ("nogpt.jsonl", '{"conversations": [{"from": "human", "value": "x"}]}\n',
         "nogpt.jsonl: line 1: no assistant message"),
    ],
)
def test_broken_datasets_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert message in str(info.value) and isinstance(info.value, ValueError)


def test_format_given_explicitly_is_checked(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="d.jsonl: line 1: `messages` must be a non-empty list"):
        load_records(path, "messages")
    with pytest.raises(DataError, match="unknown dataset format 'csv'"):
        load_records(path, "csv")


def test_render_marks_only_responses(tmp_path):
    pieces = render({"instruction": "i", "input": "x", "output": "o"}, "alpaca")
    assert [p.train for p in pieces] == [False, True] and pieces[1].text == "o"
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        render({"instruction": "i", "output": "o"}, "nope")


def test_no_trained_token_gives_none(tokenizer):
    from mlora.data import Piece

    assert tokenize_pieces(tokenizer, [Piece("only a prompt", False)], 64) is None


def test_tokenize_pieces_exact_layout(tokenizer):
    from mlora.data import Piece

    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pieces = [Piece("Add the numbers.\n12+30\n", False), Piece("42", True)]
    ex = tokenize_pieces(tokenizer, pieces, 64)
    prompt, answer = ids(pieces[0].text), ids("42") + [tokenizer.eos_token_id]
    assert ex.input_ids == [tokenizer.bos_token_id, *prompt, *answer]
    assert ex.labels == [-100] * (1 + len(prompt)) + answer
    no_bos = tokenize_pieces(tokenizer, pieces, 64, add_bos=False)
    assert no_bos.input_ids == ex.input_ids[1:] and no_bos.labels == ex.labels[1:]
    cut = tokenize_pieces(tokenizer, pieces, len(ex.input_ids) - 1)
    assert cut.input_ids == ex.input_ids[:-1] and tokenizer.eos_token_id not in cut.input_ids  # cut from the end


def test_chat_render_pieces():
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    pieces = render(record, "chatml")
    assert [(p.text, p.train) for p in pieces] == [
        ("<|im_start|>system\ns<|im_end|>\n", False), ("<|im_start|>user\nu<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("a<|im_end|>\n", True),
    ]
    assert [p.text for p in render({"instruction": "i", "output": "o"}, "plain")] == ["i\n", "o"]


def test_chained_records_tag_each_token_with_its_parts_task(tmp_path, tokenizer):
    """Several tasks in a row in one sequence: each token carries its part's task, the
    answers (and the newline closing each but the last) are trained."""
    parts = [{"instruction": "reverse", "input": "abc", "output": "cba", "task": "rev"},
             {"instruction": "upper", "input": "abc", "output": "ABC", "task": 1}]
    path = tmp_path / "chain.jsonl"
    path.write_text(json.dumps({"parts": parts}) + "\n" + json.dumps({**parts[1], "task": 0}) + "\n")
    data = JobData.build(path, "auto", "plain", tokenizer, 256, 0, 0, task_names=["rev", "up"])
    chain, single = data.train
    first = tokenize_pieces(tokenizer, [*render(parts[0], "plain")], 256)
    n_first = len(first.input_ids) - 1 + len(tokenizer("\n", add_special_tokens=False)["input_ids"])  # its EOS is not there
    assert chain.tasks() == [0] * n_first + [1] * (len(chain.input_ids) - n_first)
    assert single.token_tasks is None and single.tasks() == [0] * len(single.input_ids)
    trained = tokenizer.decode([t for t, label in zip(chain.input_ids, chain.labels) if label != -100])
    assert trained.replace(" ", "").startswith("cba\nABC")
    with pytest.raises(DataError, match=r"bad.jsonl: record 1: task 'x' is neither an adapter"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"parts": [{**parts[0], "task": "x"}]}) + "\n")
        JobData.build(bad, "auto", "plain", tokenizer, 256, 0, 0, task_names=["rev", "up"])
    with pytest.raises(DataError, match=r"line 1: parts\[0\]: lacks `output`"):
        bad.write_text(json.dumps({"parts": [{"instruction": "a"}]}) + "\n")
        load_records(bad)


def test_token_task_labels_pad_and_untagged():
    from mlora.meteora.gate import token_task_labels

    got = token_task_labels([[0, 0, 1], [2, -1]], 4).view(2, 4).tolist()
    assert got == [[0, 0, 1, -100], [2, -100, -100, -100]]
    with pytest.raises(ValueError, match="longer than seq_len"):
        token_task_labels([[0] * 5], 4)
