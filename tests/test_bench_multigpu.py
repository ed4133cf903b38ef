"""bench/multigpu/bench_multigpu.py: its data, its figures from a real 1-process run, its table.

The full CPU proof (2-stage gloo pipeline and PEFT under FSDP) is
`python bench/multigpu/bench_multigpu.py --small` (about a minute); here only the
pieces, in well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_multigpu", ROOT / "bench" / "multigpu" / "bench_multigpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_multigpu"] = module
    spec.loader.exec_module(module)
    return module


def test_defaults_and_small(bench):
    a = bench.parse_args([])
    assert (a.gpus, a.shapes, a.jobs, a.rank, a.micro, a.seq, a.dtype) == ([2, 4], ["7b", "13b"], 8, 16, 4, 512, "bfloat16")
    assert a.two_job_shape == "13b" and not a.trace_sync and bench.parse_args(["--trace-sync"]).trace_sync
    s = bench.parse_args(["--small"])
    assert (s.gpus, s.shapes, s.dtype, s.two_job_shape) == ([2], ["small"], "float32", "small")
    assert bench.SHAPES["13b"]["hidden_size"] == 5120 and bench.SHAPES["7b"]["num_hidden_layers"] == 32


def test_one_process_run_gives_full_length_rows_and_figures(bench, tmp_path, tiny_models):
    """Every record is cut at exactly --seq tokens; the figures come from the run's summary."""
    args = bench.parse_args(["--small", "--steps", "3", "--seq", "32", "--jobs", "2"])
    args.device = "cpu"
    b = bench.Bench(args, tmp_path)
    model = tiny_models["llama"]
    data = b.write_data(model, 2)
    res = b.run_mlora(model, data, 1, "one")
    assert res["tokens"] == res["tokens_logged"] == 2 * 3 * 4 * 32
    assert len(res["completion_s"]) == 2 and all(0 < c <= res["total_s"] + 1e-9 for c in res["completion_s"])
    assert res["tokens_per_s"] > 0 and res["steady_tokens_per_s"] > 0 and res["peak_memory_bytes"][0] > 0
    assert "bubble_fraction" not in res  # one process: no pipeline


def test_trace_sync_patch(bench, monkeypatch):
    from mlora.runtime import stage_worker

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    for name in ("_forward", "_backward", "_optimizer_step"):
        monkeypatch.setattr(stage_worker.StageWorker, name, lambda self, action, n=name: calls.append(n))
    bench.workers.patch_trace_sync()
    worker = object.__new__(stage_worker.StageWorker)
    worker._forward("a")
    worker._backward("a")
    worker._optimizer_step("a")
    assert calls == ["_forward", "sync", "_backward", "sync", "_optimizer_step", "sync"]


def _run(tps, steady, jct, bubble=None, peaks=(2**30,)):
    r = {"tokens_per_s": tps, "steady_tokens_per_s": steady, "completion_s": jct, "peak_memory_bytes": list(peaks)}
    if bubble is not None:
        r["bubble_fraction"] = bubble
    return r


def test_table_verdicts(bench):
    settings = {"dtype": "bfloat16", "rank": 16, "micro": 4, "seq": 512, "steps": 20, "warmup": 4,
                "max_tokens": 8192, "trace_sync": True, "device": "cuda"}
    good = {"shape": "7b", "jobs": 8, "gpus": 2, "mlora_1": _run(1000, 1000, [10, 10]),
            "mlora_p": _run(1850, 1900, [5, 5], 0.03, (2**31, 2**31)), "fsdp_p": _run(900, 950, [8, 16])}
    bad = {"shape": "13b", "jobs": 2, "gpus": 2, "mlora_1": _run(1000, 1000, [10, 10]),
           "mlora_p": _run(1500, 1600, [8, 8], 0.2), "fsdp_p": _run(900, 950, [8, 16])}
    text = bench.table({"date": "2026-12-02", "device": "H200", "n_devices": 4, "versions": {}, "settings": settings,
                        "configs": [good, bad]})
    assert "7b 8 jobs P=2: scaling 1.90 (steady) / 1.85 (run) vs target 1.8 met; bubble 3.0% met; avg JCT 58% below FSDP met" in text
    assert "13b 2 jobs P=2: scaling 1.60 (steady) / 1.50 (run) vs target 1.8 MISSED; bubble 20.0% MISSED" in text
    assert "avg JCT 33% below FSDP MISSED" in text
    assert "2.0/2.0" in text and "mlora, 1 GPU" in text
    json.dumps(good)  # the per-configuration records are plain JSON
