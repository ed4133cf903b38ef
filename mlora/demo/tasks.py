"""Generators of the demo's small tasks; `python -m mlora.demo.tasks` rewrites data/*.jsonl.

Each task is learnable by LoRA adapters alone on a tiny random frozen model (hidden 64,
4 layers) within a few hundred steps on a CPU: short inputs (≤ 16 tokens with the
`plain` template), short deterministic outputs over a small closed set of tokens, so
the answer is a lookup, a reordering or a small table the adapters can fit. With
`configs/demo.yaml` on the seed-0 tiny Llama, greedy answers to 40 held-out records:
reverse 40/40, sort 40/40, upper (chat) 25/40, add 19/40 at rank 4 (27-31/40 at rank
8 over three model seeds). Two-digit sums and sorting the letters of one word were
tried and are not learnt at this size (0/40): they need arithmetic on multi-digit
tokens or the spelling inside a BPE token.

`TASKS` is the registry: a name and a function `random.Random -> record`. A record is
Alpaca JSON; `CHAT_FILES` names the files written as chat `messages` instead.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import Callable

DATA_DIR = Path(__file__).resolve().parent / "data"
N_RECORDS = 400

WORDS = (
    "cat dog sun map pen cup box hat red sky sea owl ant bee cow fox pig rat yak elk "
    "tree bird fish lamp road door king ring song wind rain snow moon star leaf rock "
    "apple river stone cloud bread house light green plant water tiger zebra lemon"
).split()
UPPER_WORDS = WORDS[:24]  # fewer words, more repeats of each: the phrase task learns them
LETTERS = "abcdef"

Record = dict[str, str]
Generator = Callable[[random.Random], Record]


def reverse(rng: random.Random) -> Record:
    """A word spelt backwards: one token in, one token out (a lookup over 49 words)."""
    word = rng.choice(WORDS)
    return {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}


def upper(rng: random.Random) -> Record:
    """One or two words in capitals, in order: a lookup per word plus copying the order."""
    text = " ".join(rng.sample(UPPER_WORDS, rng.randint(1, 2)))
    return {"instruction": "Uppercase the text.", "input": text, "output": text.upper()}


def add(rng: random.Random) -> Record:
    """The sum of two single digits: the answer depends on both input tokens."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return {"instruction": "Add the numbers.", "input": f"{a}+{b}", "output": str(a + b)}


def sort_letters(rng: random.Random) -> Record:
    """Three or four distinct letters, space-separated so each is one token, in order."""
    letters = rng.sample(LETTERS, rng.randint(3, 4))
    return {"instruction": "Sort the letters.", "input": " ".join(letters), "output": " ".join(sorted(letters))}


TASKS: dict[str, Generator] = {"reverse": reverse, "upper": upper, "add": add, "sort": sort_letters}
CHAT_FILES: dict[str, str] = {"upper_chat": "upper"}  # file stem → task, in chat `messages` format


def task_seed(name: str) -> int:
    """A fixed seed per file name, so adding a task leaves the other files as they are."""
    return zlib.crc32(name.encode())


def generate(task: str, n: int, seed: int) -> list[Record]:
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}: use one of {', '.join(TASKS)}")
    rng = random.Random(seed)
    return [TASKS[task](rng) for _ in range(n)]


def as_chat(record: Record) -> dict:
    """The same example as a chat: the user asks, the assistant answers.

    No system turn: on the tiny frozen model a constant system prompt dilutes attention
    and the chat job learns far less (13/40 exact answers against 25/40 without it).
    """
    return {"messages": [
        {"role": "user", "content": f"{record['instruction']} {record['input']}"},
        {"role": "assistant", "content": record["output"]},
    ]}


def write_all(folder: Path = DATA_DIR, n: int = N_RECORDS) -> list[Path]:
    """Write <task>.jsonl for every task and the chat files; the same bytes every time."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in TASKS:
        rows: list[dict] = list(generate(task, n, task_seed(task)))
        written.append(_write(folder / f"{task}.jsonl", rows))
    for stem, task in CHAT_FILES.items():
        rows = [as_chat(r) for r in generate(task, n, task_seed(stem))]
        written.append(_write(folder / f"{stem}.jsonl", rows))
    return written


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


if __name__ == "__main__":
    for path in write_all():
        print(f"wrote {path} ({path.stat().st_size} bytes)")
