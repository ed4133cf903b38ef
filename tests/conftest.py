"""Shared fixtures: tiny real models (written once per session) and small datasets."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Triton reads TRITON_INTERPRET when it is first imported, and the CPU kernel tests need
# its interpreter: switch it on before any test module imports triton (the kernel test
# modules also do, but a module collected before them may import triton first). Compiled
# GPU checks run in fresh processes that set one of these markers.
if "MLORA_COMPILED_RERUN" not in os.environ and os.environ.get("MLORA_TRITON_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port() -> int:
    """A TCP port nobody listens on now (a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel(a, b) -> float:  # type: ignore[no-untyped-def]
    """Relative error ‖a − b‖ / ‖b‖ of two tensors, in fp32 (the kernel tests' measure)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


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


def rerun_compiled(request: pytest.FixtureRequest) -> bool:
    """Run this test again in a fresh pytest process without TRITON_INTERPRET; True if it did (and passed).

    Collecting the kernel test modules switches Triton's interpreter on for the whole
    process (it must be set before triton is imported), and interpreted kernels copy
    tensors through the host, which a CUDA graph cannot record. A GPU test that needs
    compiled kernels calls this first and returns when it answers True.
    """
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    assert "MLORA_COMPILED_RERUN" not in os.environ, "the re-run still has Triton's interpreter on"
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MLORA_COMPILED_RERUN"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, f"{request.node.nodeid} without the interpreter:\n{proc.stdout[-6000:]}{proc.stderr[-4000:]}"
    return True
