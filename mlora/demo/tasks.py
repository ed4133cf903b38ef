"""Generators of the demo's small tasks; `python -m mlora.demo.tasks` rewrites data/*.jsonl.

Each task is learnable by LoRA adapters on a tiny random frozen model within a few
hundred steps on a CPU: short inputs, short deterministic outputs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

WORDS = (
    "cat dog sun map pen cup box hat red sky sea owl ant bee cow fox pig rat yak elk "
    "tree bird fish lamp road door king ring song wind rain snow moon star leaf rock "
    "apple river stone cloud bread house light green plant water tiger zebra lemon"
).split()

Record = dict[str, str]
DATA_DIR = Path(__file__).resolve().parent / "data"


def reverse(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}


def upper(rng: random.Random) -> Record:
    text = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return {"instruction": "Uppercase the text.", "input": text, "output": text.upper()}


def add(rng: random.Random) -> Record:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return {"instruction": "Add the numbers.", "input": f"{a}+{b}", "output": str(a + b)}


def sort_letters(rng: random.Random) -> Record:
    letters = rng.sample("abcdefghij", rng.randint(3, 6))
    return {"instruction": "Sort the letters.", "input": "".join(letters), "output": "".join(sorted(letters))}


TASKS: dict[str, Callable[[random.Random], Record]] = {"reverse": reverse, "upper": upper, "add": add, "sort": sort_letters}


def as_chat(record: Record) -> dict:
    return {"messages": [
        {"role": "user", "content": f"{record['instruction']} {record['input']}"},
        {"role": "assistant", "content": record["output"]},
    ]}


def generate(task: str, n: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    return [TASKS[task](rng) for _ in range(n)]


def write_all(folder: Path, n: int = 400) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, task in enumerate(TASKS):
        rows = generate(task, n, seed=1000 + i)
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = [as_chat(r) for r in generate("upper", n, seed=2000)]
    (folder / "upper_chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))


if __name__ == "__main__":
    write_all(DATA_DIR)
