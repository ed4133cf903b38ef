"""Pieces of text → token ids and labels, with the loss on trained pieces only.

Each piece is tokenised on its own (no special tokens) and the ids concatenated, so
the boundary between prompt and response is exact: labels are the ids of trained
pieces and -100 everywhere else. An end-of-sequence token closes the last trained
piece, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from mlora.data.templates import Piece

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken
    task: int = -1  # the record's task index, when its dataset tags one (MeteoRA)
    token_tasks: tuple[int, ...] | None = None  # per token, for records of several tasks in a row
    cut: bool = False  # longer than cutoff_len: its tail (part of its response) was dropped

    def tasks(self) -> list[int]:
        """Each token's task index (-1: none)."""
        return list(self.token_tasks) if self.token_tasks is not None else [self.task] * len(self.input_ids)


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> dict[str, list[int]]:
    """Each distinct text's token ids (no special tokens), from one batched call: the same
    ids as one call per text, at a fraction of the time for a large dataset."""
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return {}
    return dict(zip(distinct, tokenizer(distinct, add_special_tokens=False)["input_ids"]))


def tokenize_pieces(
    tokenizer: Any, pieces: Sequence[Piece], cutoff_len: int, add_bos: bool = True, task: int = -1,
    piece_tasks: Sequence[int] | None = None, encoded: Mapping[str, list[int]] | None = None,
) -> Example | None:
    """Token ids and labels, cut to `cutoff_len`; None if no trained token survives.

    `piece_tasks` (one per piece) tags every token with its piece's task: a record of
    several tasks in a row (the BOS takes the first piece's). `encoded` holds the pieces'
    ids already (`encode_texts`); else each piece is tokenised here.
    """
    ids: list[int] = []
    labels: list[int] = []
    tasks: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE)
        tasks.append(piece_tasks[0] if piece_tasks else task)
    last_trained = max((i for i, p in enumerate(pieces) if p.train), default=-1)
    for i, piece in enumerate(pieces):
        piece_ids = encoded[piece.text] if encoded is not None else tokenizer(piece.text, add_special_tokens=False)["input_ids"]
        if i == last_trained and tokenizer.eos_token_id is not None:
            piece_ids = [*piece_ids, tokenizer.eos_token_id]
        ids.extend(piece_ids)
        labels.extend(piece_ids if piece.train else [IGNORE] * len(piece_ids))
        tasks.extend([piece_tasks[i] if piece_tasks else task] * len(piece_ids))
    cut = len(ids) > cutoff_len
    ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Example(ids, labels, task, tuple(tasks[:cutoff_len]) if piece_tasks else None, cut)
