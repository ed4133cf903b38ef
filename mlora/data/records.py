"""Reading datasets: Alpaca (instruction, input, output), chat `messages`, or ShareGPT
`conversations` (LLaMA-Factory's and axolotl's other chat layout, read as messages), from
JSONL, JSON, Parquet (chat records too), or CSV / TSV (Alpaca columns).

Errors name the file, the line (or record) and the field, so a broken line in a
100k-line file is found at once.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

FORMATS = ("auto", "alpaca", "messages", "sharegpt")
RECORD_FILES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")  # file kinds read as records (others: JSONL too)
ROLES = ("system", "user", "assistant")
# ShareGPT's speakers ("from") as chat roles; tool turns (function_call, observation) have no
# place in the templates' one-user-one-assistant turns, so they are refused by name
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A dataset that cannot be used, with the file and the place in it."""


def detect_format(record: dict[str, Any]) -> str | None:
    """`messages`, `sharegpt` (`conversations`), `parts` (Alpaca records asked one after
    another in one sequence), `alpaca` (either of its keys, so a missing one is reported
    by name), or None."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "parts" in record:
        return "parts"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def read_raw(path: Path) -> tuple[list[tuple[int, Any]], str]:
    """(place, parsed object) for every record, and what a place is called in messages:
    the line a record starts on in a .jsonl, .csv or .tsv file (the header is line 1),
    its number in a .json list or a .parquet table. Any other name is JSONL."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [(i + 1, item) for i, item in enumerate(_read_parquet(path))], "record"
    text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    if suffix in (".csv", ".tsv"):
        return _read_table(path, text, "\t" if suffix == ".tsv" else ","), "line"
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json dataset must be a list of records")
        return [(i + 1, item) for i, item in enumerate(data)], "record"
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: not valid JSON: {exc.msg}") from exc
    return out, "line"


def _read_table(path: Path, text: str, delimiter: str) -> list[tuple[int, Any]]:
    """A spreadsheet export: one record a row, named by the header row, every value a
    string (an empty or missing cell is ""), so Alpaca columns read as Alpaca records.
    A record's place is the line it starts on (a quoted cell may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows = []
    start = 1
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue  # a blank line, or a row of empty cells
        if header is None:
            header = cells
            if len(set(header)) != len(header):
                raise DataError(f"{path}: line {line}: a column name appears twice: {header}")
            continue
        if len(cells) > len(header):
            raise DataError(f"{path}: line {line}: {len(cells)} cells, and the header has {len(header)} columns")
        rows.append((line, dict(zip(header, cells + [""] * (len(header) - len(cells))))))
    return rows


def _read_parquet(path: Path) -> list[Any]:
    """A Parquet table's rows as records (nested lists and structs as lists and dicts:
    chat `messages` read as in JSONL; a null cell as a field left out, as a missing
    `input` is in JSONL). Needs pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow, or 'mlora[parquet]')") from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's errors are of several kinds: name the file either way
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    return [{k: v for k, v in row.items() if v is not None} for row in rows]


def load_records(path: Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """Every record of the file, checked against its format."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown dataset format {fmt!r} (use {', '.join(FORMATS)})")
    rows, where = read_raw(path)
    if not rows:
        raise DataError(f"{path}: empty dataset")
    if fmt == "auto":
        first = rows[0][1]
        detected = detect_format(first) if isinstance(first, dict) else None
        if detected is None:
            raise DataError(f"{path}: {where} {rows[0][0]}: neither Alpaca (instruction/output) nor chat "
                            "(messages, or ShareGPT conversations)")
        fmt = detected
    out = []
    for number, record in rows:
        if not isinstance(record, dict):
            raise DataError(f"{path}: {where} {number}: a record must be a JSON object")
        # Alpaca files may mix single records and chained ones (`parts`)
        kind = "parts" if fmt in ("alpaca", "parts") and "parts" in record else fmt
        kind = "alpaca" if kind == "parts" and "parts" not in record else kind
        if kind == "sharegpt":
            record = sharegpt_as_messages(record, f"{path}: {where} {number}")
            kind = "messages"
        CHECKS[kind](record, f"{path}: {where} {number}")
        out.append(record)
    return out


def sharegpt_as_messages(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A ShareGPT record (`conversations` of {"from", "value"}, optionally a top-level
    `system`) as a `messages` record; its other keys (a MeteoRA `task`) are kept."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: `conversations` must be a non-empty list")
    messages = []
    if "system" in record:
        if not isinstance(record["system"], str):
            raise DataError(f"{where}: `system` must be a string")
        messages.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] needs `from` and `value`")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}]: unknown speaker {turn['from']!r} "
                            f"(use {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    rest = {k: v for k, v in record.items() if k not in ("conversations", "system")}
    return {**rest, "messages": messages}


def _check_alpaca(record: dict[str, Any], where: str) -> None:
    for field in ("instruction", "output"):
        if field not in record:
            raise DataError(f"{where}: lacks `{field}`")
    for field in ("instruction", "input", "output"):
        if field in record and not isinstance(record[field], str):
            raise DataError(f"{where}: `{field}` must be a string")


def _check_parts(record: dict[str, Any], where: str) -> None:
    parts = record.get("parts")
    if not isinstance(parts, list) or not parts:
        raise DataError(f"{where}: `parts` must be a non-empty list of Alpaca records")
    for i, part in enumerate(parts):
        if not isinstance(part, dict):
            raise DataError(f"{where}: parts[{i}] must be a JSON object")
        _check_alpaca(part, f"{where}: parts[{i}]")


def _check_messages(record: dict[str, Any], where: str) -> None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{i}] needs `role` and `content`")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}]: unknown role {message['role']!r} (use {', '.join(ROLES)})")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: messages[{i}]: `content` must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")


CHECKS = {"alpaca": _check_alpaca, "parts": _check_parts, "messages": _check_messages}
