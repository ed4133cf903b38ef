"""A synthetic multi-task suite for MeteoRA; `python -m mlora.meteora.suite` rewrites data/.

Eight small tasks over a closed set of short English words, each learnable by a LoRA
adapter on a tiny random frozen model (hidden 64, 4 layers) in a few hundred steps on
a CPU. The task is named by a keyword phrase in the instruction, so a gate can tell the
tasks apart from the prompt's first tokens. Records are Alpaca JSON with a `task`
field (the task's index); with the `plain` template every record is at most 48 tokens
of the tiny models' tokenizer. The same input means different things under different
tasks ("apple" → "elppa", "APPLE", "5", "food", "apple apple"), so one adapter cannot
serve all: routing has to follow the keyword.

Files: <task>_train.jsonl (300) and <task>_test.jsonl (50) per task, mixed_train.jsonl
and mixed_test.jsonl (all tasks, shuffled: the MeteoRA gate-training set), and
composite_test.jsonl: 50 records of three parts from three different tasks, asked in
one context one after another (see `composite_context`), so the model must switch
adapters mid-sequence. chained_train.jsonl: 600 training records of 2-3 parts in a
row (each part tagged with its task), and meteora_train.jsonl: mixed_train and
chained_train shuffled together, the MeteoRA job's training set. Single-word tasks (reverse, upper, length, kind, twice) have only as
many inputs as words, so their test inputs also occur in training: they measure
recall through the right adapter. Multi-word tasks draw test inputs unseen in training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mlora.data.templates import prompt_text

DATA_DIR = Path(__file__).resolve().parent / "data"
N_TRAIN, N_TEST, N_COMPOSITE = 300, 50, 50
N_CHAINED = 600  # training records of 2-3 tasks in a row (the gates learn to switch)
PARTS_PER_COMPOSITE = 3
TEMPLATE = "plain"
MAX_TOKENS = 48

KINDS: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "owl", "ant", "bee", "cow", "fox", "pig", "rat", "yak", "tiger", "zebra"),
    "food": ("apple", "lemon", "bread", "cake", "rice", "egg", "milk", "plum"),
    "object": ("map", "pen", "cup", "box", "hat", "lamp", "door", "ring", "bell", "key"),
    "nature": ("sun", "sky", "sea", "tree", "rain", "snow", "moon", "star", "leaf", "rock"),
    "color": ("red", "blue", "green", "pink", "gray", "gold", "black", "white"),
}
WORDS: tuple[str, ...] = tuple(w for words in KINDS.values() for w in words)
KIND_OF: dict[str, str] = {w: kind for kind, words in KINDS.items() for w in words}

Record = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """A task: its keyword instruction and how to draw (input, output)."""

    name: str
    instruction: str
    draw: Callable[[random.Random], tuple[str, str]]
    single_word: bool


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return w, w[::-1]


def _upper(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return w, w.upper()


def _length(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return w, str(len(w))


def _kind(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return w, KIND_OF[w]


def _twice(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return w, f"{w} {w}"


def _first(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 3, 4)
    return " ".join(ws), ws[0]


def _last(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 3, 4)
    return " ".join(ws), ws[-1]


def _count(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 2, 5)
    return " ".join(ws), str(len(ws))


TASKS: tuple[Task, ...] = (
    Task("reverse", "reverse the word", _reverse, True),
    Task("upper", "uppercase the word", _upper, True),
    Task("length", "length of the word", _length, True),
    Task("kind", "kind of the word", _kind, True),
    Task("twice", "say the word twice", _twice, True),
    Task("first", "first word", _first, False),
    Task("last", "last word", _last, False),
    Task("count", "count the words", _count, False),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)


def make_record(task_index: int, rng: random.Random) -> Record:
    task = TASKS[task_index]
    inp, out = task.draw(rng)
    return {"instruction": task.instruction, "input": inp, "output": out, "task": task_index}


def task_records(task_index: int, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, test) records of one task; multi-word tasks' test inputs are unseen in train."""
    rng = random.Random(seed * 1009 + task_index)
    train = [make_record(task_index, rng) for _ in range(N_TRAIN)]
    seen = {r["input"] for r in train}
    test: list[Record] = []
    while len(test) < N_TEST:
        record = make_record(task_index, rng)
        if TASKS[task_index].single_word or record["input"] not in seen:
            test.append(record)
    return train, test


def composite_records(seed: int = 0) -> list[Record]:
    """Records of three parts from three different tasks, drawn fresh."""
    rng = random.Random(seed * 1009 + 777)
    out = []
    for _ in range(N_COMPOSITE):
        tasks = rng.sample(range(len(TASKS)), PARTS_PER_COMPOSITE)
        out.append({"parts": [make_record(t, rng) for t in tasks], "tasks": tasks})
    return out


def chained_records(seed: int = 0) -> list[Record]:
    """Training records of two or three parts from different tasks, asked in a row."""
    rng = random.Random(seed * 1009 + 555)
    out = []
    for _ in range(N_CHAINED):
        tasks = rng.sample(range(len(TASKS)), rng.randint(2, PARTS_PER_COMPOSITE))
        out.append({"parts": [make_record(t, rng) for t in tasks], "tasks": tasks})
    return out


def composite_context(parts: Sequence[Record], answers: Sequence[str], template: str = TEMPLATE) -> str:
    """The text given to the model for part len(answers): earlier parts with their answers
    (each answer closed by a newline), then the next part's prompt."""
    if len(answers) >= len(parts):
        raise ValueError(f"{len(answers)} answers for {len(parts)} parts: nothing left to ask")
    done = "".join(prompt_text(p, template) + a + "\n" for p, a in zip(parts, answers))
    return done + prompt_text(parts[len(answers)], template)


def exact_match(prediction: str, reference: str) -> bool:
    """Right if equal after stripping surrounding whitespace (case matters: see `upper`)."""
    return prediction.strip() == reference.strip()


def score(predictions: Sequence[str], records: Sequence[Record]) -> dict[str, float]:
    """Exact-match accuracy per task name (tasks present only) and over all records."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    hits: dict[str, list[bool]] = {}
    for pred, record in zip(predictions, records):
        hits.setdefault(TASK_NAMES[record["task"]], []).append(exact_match(pred, record["output"]))
    out = {name: sum(h) / len(h) for name, h in hits.items()}
    out["all"] = sum(sum(h) for h in hits.values()) / max(1, len(records))
    return out


def score_composite(predictions: Sequence[Sequence[str]], records: Sequence[Record]) -> dict[str, float]:
    """'parts': accuracy over every part; 'all': fraction of records with every part right."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} composite records")
    part_hits, whole = [], []
    for preds, record in zip(predictions, records):
        ok = [exact_match(p, part["output"]) for p, part in zip(preds, record["parts"])]
        ok += [False] * (len(record["parts"]) - len(ok))
        part_hits.extend(ok)
        whole.append(all(ok))
    return {"parts": sum(part_hits) / max(1, len(part_hits)), "all": sum(whole) / max(1, len(whole))}


def read_jsonl(path: Path) -> list[Record]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def build_files(seed: int = 0) -> dict[str, list[Record]]:
    """Every data file's name and records, a pure function of the seed."""
    files: dict[str, list[Record]] = {}
    mixed_train: list[Record] = []
    mixed_test: list[Record] = []
    for i, task in enumerate(TASKS):
        train, test = task_records(i, seed)
        files[f"{task.name}_train.jsonl"], files[f"{task.name}_test.jsonl"] = train, test
        mixed_train += train
        mixed_test += test
    rng = random.Random(seed)
    rng.shuffle(mixed_train)
    rng.shuffle(mixed_test)
    files["mixed_train.jsonl"], files["mixed_test.jsonl"] = mixed_train, mixed_test
    files["composite_test.jsonl"] = composite_records(seed)
    files["chained_train.jsonl"] = chained_records(seed)
    meteora_train = mixed_train + files["chained_train.jsonl"]
    random.Random(seed + 1).shuffle(meteora_train)
    files["meteora_train.jsonl"] = meteora_train  # the MeteoRA job's: single tasks and chains
    return files


def write_files(folder: Path = DATA_DIR, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, records in build_files(seed).items():
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_files():
        print(p)
