"""The writer thread on its own: a pipeline stage's checkpoint slice, written from a
snapshot while the originals move on, a failed write named by job and folder, and the
lock its device work holds (graph recordings take it too)."""

from __future__ import annotations

import pytest
import torch

from mlora.runtime.background_writer import BackgroundWriter, WriteError, snapshot
from mlora.runtime.checkpoint import read_stage_slice


def test_a_stage_slice_is_the_snapshot_not_the_later_state(tmp_path):
    state = {"step": 3, "tensors": {"exp_avg": torch.randn(4, 5)}, "flat": [torch.arange(6.0)]}
    want = snapshot(state)
    writer = BackgroundWriter(torch.device("cpu"))
    try:
        writer.submit_stage_slice("copy", tmp_path / "step-000003", 1, snapshot(state))
        state["tensors"]["exp_avg"].add_(1.0)  # the job's next step, in place
        state["flat"][0].mul_(2.0)
        assert writer.collect(block=True) == []  # checkpoints are not finished adapters
    finally:
        writer.close()
    got = read_stage_slice(tmp_path / "step-000003", 1)
    assert got["step"] == 3 and torch.equal(got["tensors"]["exp_avg"], want["tensors"]["exp_avg"])
    assert torch.equal(got["flat"][0], want["flat"][0])
    assert not list((tmp_path / "step-000003").glob(".*"))  # no temporary file left


def test_a_failed_slice_write_names_the_job_and_folder(tmp_path):
    blocker = tmp_path / "step-000006"
    blocker.write_text("a file where the checkpoint folder should be")
    writer = BackgroundWriter(torch.device("cpu"))
    try:
        writer.submit_stage_slice("reverse", blocker, 0, {"x": torch.ones(2)})
        with pytest.raises(WriteError, match=r"job 'reverse': writing its checkpoint under .*step-000006 failed"):
            writer.collect(block=True)
    finally:
        writer.close()


def test_a_folder_write_holds_the_device_lock_and_leaves_it_free(tmp_path):
    """A MeteoRA folder's save function copies its tensors off the GPU itself, so it runs
    holding `device_lock`, which CUDA graph recordings take (tests/test_step_graphs.py)."""
    writer = BackgroundWriter(torch.device("cpu"))
    held = []
    try:
        writer.submit_folder("m", tmp_path / "m", lambda: held.append(writer.device_lock.locked()))
        assert [w.job for w in writer.collect(block=True)] == ["m"]
    finally:
        writer.close()
    assert held == [True] and not writer.device_lock.locked()
