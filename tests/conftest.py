"""Shared fixtures: tiny real models (written once per session) and small datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random llama and qwen2 (q/k/v bias), each with a real tokenizer."""
    from mlora.model.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(root / arch, arch) for arch in ("llama", "qwen2")}


def make_dataset(path: Path, task: str, n: int, seed: int) -> Path:
    """Small learnable alpaca records: copy, reverse or count a few letters."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        out = {"copy": word, "reverse": word[::-1], "count": str(len(word))}[task]
        rows.append({"instruction": f"{task} the letters", "input": word, "output": out})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def datasets(tmp_path: Path) -> dict[str, Path]:
    return {t: make_dataset(tmp_path / f"{t}.jsonl", t, 24, i) for i, t in enumerate(("copy", "reverse", "count"))}


def write_run(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
