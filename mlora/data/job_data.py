"""A job's data: tokenised examples, a held-out eval split, and the order of each epoch.

Everything is a pure function of the dataset, the tokenizer and the job's seed, so the
job sees the same examples in the same order whether it trains alone or with others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mlora.data.records import DataError, load_records
from mlora.data.templates import Piece, render
from mlora.data.tokenize import Example, encode_texts, tokenize_pieces


def split_sizes(n: int, eval_split: float | int) -> int:
    """How many of n records go to eval: a fraction in (0, 1) or a count; 0 → none.

    At least one record stays for training, so a large split is capped at n - 1.
    """
    if eval_split <= 0:
        return 0
    count = int(eval_split) if eval_split >= 1 else max(1, round(n * eval_split))
    return min(count, n - 1) if n > 1 else 0


@dataclass(frozen=True)
class JobData:
    """A job's examples after templating, tokenisation, cutoff and the eval split."""

    train: list[Example]
    eval: list[Example]
    dropped: int  # examples with no trained token left after cutoff_len
    seed: int

    @property
    def cut(self) -> int:
        """Examples kept, but cut to cutoff_len (part of their response not trained)."""
        return sum(e.cut for e in (*self.train, *self.eval))

    def cutoff_note(self, cutoff_len: int) -> str:
        """What cutoff_len did to the data, for `mlora validate` and the start of a run
        ("" when nothing was lost): examples dropped whole and examples cut short."""
        total = len(self.train) + len(self.eval) + self.dropped
        parts = []
        if self.dropped:
            parts.append(f"{self.dropped} of {total} examples dropped (no response token within cutoff_len={cutoff_len})")
        if self.cut:
            parts.append(f"{self.cut} of {total} cut to {cutoff_len} tokens (their response's end not trained)")
        return "; ".join(parts)

    @classmethod
    def build(
        cls,
        path: Path | Sequence[Path],
        fmt: str,
        template: str,
        tokenizer: Any,
        cutoff_len: int,
        eval_split: float | int,
        seed: int,
        task_names: Sequence[str] | None = None,
        force_task: int | None = None,
        cache: dict[Any, list[Example | None]] | None = None,
    ) -> "JobData":
        """Read, render, tokenise and split; the split is over records, fixed by `seed`.

        Several files are one dataset: their records in file order, split and shuffled
        together (an eval split of N records takes N in all, not N a file). MeteoRA jobs
        pass `task_names` (their adapters): then every record must say its task, by
        `force_task` (a file per task) or by its own `task` field (an adapter name or
        index). Jobs of one run that read the same files the same way (a sweep) share
        one tokenisation through `cache`; only their splits and orders differ.
        """
        paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
        key = (tuple(str(p) for p in paths), fmt, template, cutoff_len,
               tuple(task_names) if task_names is not None else None, force_task)
        examples = cache.get(key) if cache is not None else None
        if examples is None:
            examples = tokenized_records(paths, fmt, template, tokenizer, cutoff_len, task_names, force_task)
            if cache is not None:
                cache[key] = examples
        n_eval = split_sizes(len(examples), eval_split)
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        eval_ids = set(order[:n_eval])
        train = [e for k, e in enumerate(examples) if e is not None and k not in eval_ids]
        evals = [e for k, e in enumerate(examples) if e is not None and k in eval_ids]
        if not train:
            names = ", ".join(str(file) for file in paths)
            raise DataError(f"{names}: no training example has a response token within cutoff_len={cutoff_len}")
        return cls(train, evals, sum(e is None for e in examples), seed)

    @classmethod
    def concat(cls, parts: Sequence["JobData"], seed: int) -> "JobData":
        """One job's data from several files (a MeteoRA job's file per task), in order."""
        return cls(
            [e for p in parts for e in p.train], [e for p in parts for e in p.eval], sum(p.dropped for p in parts), seed
        )

    def epoch_order(self, epoch: int) -> list[int]:
        """A permutation of the training examples, fixed by (seed, epoch)."""
        order = list(range(len(self.train)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order


def record_task(record: dict[str, Any], task_names: Sequence[str], path: Path, index: int) -> int:
    """A record's task index from its `task` field: an adapter's name or its index (as a
    number, or as text where no adapter has that name)."""
    value = record.get("task")
    if isinstance(value, bool) or value is None:
        raise DataError(f"{path}: record {index + 1}: no `task` field (a MeteoRA job needs each record's adapter)")
    if isinstance(value, int) and 0 <= value < len(task_names):
        return value
    if isinstance(value, str) and value in task_names:
        return list(task_names).index(value)
    if isinstance(value, str) and value.strip().isdigit() and int(value) < len(task_names):
        return int(value)  # an index written as text (a CSV cell)
    raise DataError(
        f"{path}: record {index + 1}: task {value!r} is neither an adapter ({', '.join(task_names)}) "
        f"nor an index 0..{len(task_names) - 1}"
    )


def tokenized_records(
    paths: Sequence[Path], fmt: str, template: str, tokenizer: Any, cutoff_len: int,
    task_names: Sequence[str] | None = None, force_task: int | None = None,
) -> list[Example | None]:
    """Every record of the files, in order, as an Example (None: no response token
    within cutoff_len). Records are rendered first and their texts tokenised in one
    batched call, each distinct text once (a fast tokenizer spreads it over the cores)."""
    rendered: list[tuple[list[Piece], int, list[int] | None]] = []
    for file in paths:
        for i, record in enumerate(load_records(file, fmt)):
            if "parts" in record:
                rendered.append(chained_pieces(record, template, task_names, force_task, file, i))
                continue
            if task_names is None:
                task = int(record.get("task", -1)) if isinstance(record.get("task", -1), int) else -1
            else:
                task = force_task if force_task is not None else record_task(record, task_names, file, i)
            rendered.append((render(record, template), task, None))
    encoded = encode_texts(tokenizer, [piece.text for pieces, _, _ in rendered for piece in pieces])
    return [tokenize_pieces(tokenizer, pieces, cutoff_len, task=task, piece_tasks=tasks, encoded=encoded)
            for pieces, task, tasks in rendered]


def chained_pieces(
    record: dict[str, Any], template: str, task_names: Sequence[str] | None, force_task: int | None,
    path: Path, index: int,
) -> tuple[list[Piece], int, list[int]]:
    """A record of several parts asked one after another in one sequence, each answer
    followed by a newline, with every piece's task (MeteoRA gates learn to switch
    adapters where the task changes): (pieces, first task, task per piece)."""
    pieces, tasks = [], []
    parts = record["parts"]
    for k, part in enumerate(parts):
        if task_names is None:
            task = -1
        else:
            task = force_task if force_task is not None else record_task(part, task_names, path, index)
        part_pieces = render(part, template)
        if k < len(parts) - 1:
            part_pieces = [*part_pieces, Piece("\n", True)]
        pieces += part_pieces
        tasks += [task] * len(part_pieces)
    return pieces, tasks[0], tasks
