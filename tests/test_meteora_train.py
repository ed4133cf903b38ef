"""The single-job gate trainer: gates learn to route a tiny model's tokens by task."""

from __future__ import annotations

import torch

from mlora.meteora import suite
from mlora.meteora.adapter import MeteoraAdapter, linear_shapes
from mlora.meteora.generate import load_model
from mlora.meteora.train import collate, examples, train_gates
from mlora.model.peft_io import AdapterMeta, save_adapter


def test_gates_learn_the_task_of_each_token(tmp_path):
    from mlora.model.tiny import write_tiny_model

    torch.manual_seed(0)
    model, tok = load_model(write_tiny_model(tmp_path / "m", "llama"))
    shapes, layers = linear_shapes(model)
    folders = []
    for k in range(3):
        gen = torch.Generator().manual_seed(k)
        weights = {p: (torch.randn(4, d_in, generator=gen) * 0.1, torch.randn(d_out, 4, generator=gen) * 0.1)
                   for p, (d_in, d_out) in shapes.items() if p.endswith(("q_proj", "v_proj"))}
        folders.append(save_adapter(tmp_path / f"lora{k}", AdapterMeta(4, 8.0, 0.0, False, ("q_proj", "v_proj"), "tiny"), weights))
    adapter = MeteoraAdapter.from_adapters(folders, shapes, n_layers=layers, backend="loop")
    records = [r for r in suite.read_jsonl(suite.DATA_DIR / "mixed_train.jsonl") if r["task"] in (0, 3, 5)][:240]
    for r in records:
        r["task"] = {0: 0, 3: 1, 5: 2}[r["task"]]  # three tasks → adapters 0..2
    data = examples(tok, records, suite.TEMPLATE)
    gates_before = {p: g.detach().clone() for p, g in adapter.gates.items()}
    logs = train_gates(model, tok, adapter, data, steps=40, batch_size=16, lr=1e-2, log_every=10)
    assert [l.step for l in logs] == [10, 20, 30, 40]
    assert logs[-1].gate_loss < 0.8 * logs[0].gate_loss, logs
    assert logs[-1].route_acc > 0.6  # chance is 1/3
    assert all(not torch.equal(gates_before[p], g.detach()) for p, g in adapter.gates.items())
    assert all(a.grad is None for a in adapter.lora_a[adapter.paths[0]])  # adapters stay frozen
    ids, _, tasks = collate(data[:2], tok.pad_token_id)
    assert tasks.shape == (ids.numel(),) and int((tasks == -100).sum()) == int((ids == tok.pad_token_id).sum())
