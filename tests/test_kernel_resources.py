"""Every Triton kernel config the multi-LoRA operator can launch fits in a Hopper block's
shared memory, in bf16 and fp32 (true fp32 and TF32 products), and the bf16 kernels do
not spill registers.

Compiled for sm_90 on the CPU (tests/kernel_smem.py), in a fresh process: no GPU needed,
so CI catches what on an H200 was an OutOfResources at the first fp32 launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HOPPER_SMEM = 232_448


def _compiled_rows(triton_dir: str | None = None) -> list[dict]:
    """tests/kernel_smem.py's records, in a fresh process, with this environment's Triton
    or the one installed under `triton_dir` (pip install --target)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*([triton_dir] if triton_dir else []), str(root)])
    proc = subprocess.run([sys.executable, str(root / "tests" / "kernel_smem.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _narrow_b_reads(rows: list[dict]) -> list[dict]:
    """bf16 forward GEMMs reading many single 2-byte elements: B's columns no longer 16
    bytes at a time (docs/kernels.md, "Reading B"); the bias's one load is allowed."""
    return [r for r in rows if r["kernel"] in ("fused_gemm", "fused_gemm_persistent") and r["dtype"] == "bf16"
            and not r["w_kn"] and r["narrow_loads"] > 2]


def test_every_gemm_and_reduction_config_fits_hopper_shared_memory() -> None:
    rows = _compiled_rows()
    kinds = {(r["kernel"], r["dtype"], r["precision"]) for r in rows}
    # 3 precisions × (GEMM configs + 2 at R = 128 + the shared-input dx (3 products, R = 64) + 2 shrinks
    # (h, g) × 4 ranks + 2 reductions × 4 ranks + the dy pass with g as partials at R = 16): 6 GEMM
    # configs (3 tiles × forward, dx) in bf16 and TF32, 2 in true fp32 (its one tile); and the bf16
    # dy pass with g in pairs at R = 32 and in 256 columns at R = 16 (a wide dy: `narrow_dy`, the
    # other rows' 4096 columns take 128), and the persistent GEMM: forward and dx at R = 32, with
    # the segment loop after the pair and without, and at R = 64; its dx with dropout at R = 32
    # and 64, and summing two (R = 32) and three (R = 64) products
    assert len(kinds) == 10 and len(rows) == 86
    too_big = [r for r in rows if not 0 < r["shared"] <= HOPPER_SMEM]
    assert not too_big, too_big
    # The persistent GEMM's expand reads stay plain loads after the K loop: pipelined into
    # a flattened loop they were 26 cp.async copies, and the GEMMs took 13-39 % longer
    # (bench/README.md, 2026-12-04, fifth session)
    persistent = [r for r in rows if r["kernel"] == "fused_gemm_persistent"]
    assert len(persistent) == 10 and all(r["async_copies"] == 0 for r in persistent), persistent
    # and the host's estimate of its shared memory (whether it fits a device, `persistent_launch`)
    # is what the compiler asked for, less at most the slack it allows for barriers
    from mlora.ops.kernels import fused_gemm

    off = [r for r in persistent if not 0 <= r["shared"] - r["estimate"] <= fused_gemm.SMEM_SLACK]
    assert not off, off
    # Every bf16 kernel keeps (nearly) all its registers. The dx GEMM with dropout once
    # had its masked expand in a second accumulator after the K loop, ptxas spilled and on
    # an H200 it ran 6x slower (bench/README.md): 880-3,600 bytes of stack per thread.
    # The forward GEMM at R = 128 gathered B 2 bytes at a time (1.2-1.3 KB; 1.6-2.4x
    # slower). Now 0-16 bytes under Triton 3.9, 0 under 3.6 (the GPU image's).
    spilling = [r for r in rows if r["dtype"] == "bf16" and r["stack"] > 1024]
    assert not spilling, spilling
    assert not _narrow_b_reads(rows), _narrow_b_reads(rows)
    # True fp32 takes FMAs for its products: with the tensor-core tiles the GEMMs spilled
    # 23-50 KB a thread (and compiled for ~18 s each); its own tile spills nothing.
    ieee_gemms = [r for r in rows if r["kernel"] == "fused_gemm" and r["precision"] == "ieee"]
    assert len(ieee_gemms) == 5 and all(r["stack"] == 0 for r in ieee_gemms), ieee_gemms
    # and its dA pass narrows its columns with the rank (128 columns spilled 5-11 KB at R >= 64)
    ieee_spilling = [r for r in rows if r["precision"] == "ieee" and r["stack"] > 1024]
    assert not ieee_spilling, ieee_spilling
    # fp32 needed fewer stages: the bf16 counts would not fit (the H200's OutOfResources)
    tf32_first = next(r for r in rows if r["kernel"] == "fused_gemm" and r["precision"] == "tf32"
                      and r["dtype"] == "fp32")
    assert tf32_first["config"].endswith("/2")


@pytest.mark.skipif(not os.environ.get("MLORA_TRITON_ALSO"),
                    reason="MLORA_TRITON_ALSO names a directory holding another Triton (the GPU image's)")
def test_another_triton_compiles_them_as_well() -> None:
    """The GPU image's Triton (3.6 when written) compiles these kernels with its own
    ptxas, differently from CI's: a `tl.multiple_of` on a helper's result that 3.9 kept,
    3.6 dropped, and the forward GEMM read B 2 bytes at a time there (spilling 1.3 KB at
    R = 128) while CI saw nothing. With `pip install --target DIR triton==3.6.0` and
    MLORA_TRITON_ALSO=DIR: the same shared memory in every config, no bf16 kernel
    spilling, B read 16 bytes at a time (docs/kernels.md, "Testing on CPU")."""
    mine, other = _compiled_rows(), _compiled_rows(os.environ["MLORA_TRITON_ALSO"])
    assert [r["shared"] for r in other] == [r["shared"] for r in mine]
    spilling = [r for r in other if r["dtype"] == "bf16" and r["stack"] > 0]
    assert not spilling, spilling
    assert not _narrow_b_reads(other), _narrow_b_reads(other)


def test_the_autotuner_tries_configs_fitted_to_the_dtype() -> None:
    import torch

    from mlora.ops.kernels import fused_gemm

    for dtype, stages in ((torch.bfloat16, [3, 4, 3]), (torch.float32, [2, 3, 2])):
        configs = fused_gemm._fit_stages(fused_gemm._configs(), {"out_ptr": torch.empty(1, dtype=dtype)},
                                         PRECISION="tf32")
        assert [c.num_stages for c in configs] == stages
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs] == [(s[0], s[1]) for s in fused_gemm.SHAPES]
        assert all(c.pre_hook is fused_gemm._set_block_shapes for c in configs)  # TMA block shapes still set
    ieee = fused_gemm._fit_stages(fused_gemm._configs(), {"out_ptr": torch.empty(1, dtype=torch.float32)},
                                  PRECISION="ieee")
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps) for c in ieee] \
        == [fused_gemm.IEEE_SHAPE]
    assert fused_gemm.fixed_config(4, precision="ieee")[0]["BLOCK_N"] == fused_gemm.IEEE_SHAPE[1]


def test_a_smaller_shared_memory_gets_fewer_stages() -> None:
    """An A100 allows 163 KiB a block: fp32 then runs one stage of the widest tiles, bf16 is unchanged."""
    import torch

    from mlora.ops.kernels import fused_gemm

    a100 = 166_912 - fused_gemm.SMEM_HEADROOM
    assert [stages for _, stages, _ in fused_gemm.fitted(4, a100)] == [1, 2, 1]
    assert [stages for _, stages, _ in fused_gemm.fitted(2, a100)] == [3, 4, 3]
    for size in (2, 4):
        for meta, stages, _ in fused_gemm.fitted(size, a100):
            assert stages * (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * size <= a100
    assert fused_gemm.smem_budget(torch.device("cpu")) == fused_gemm.SMEM_BYTES  # Hopper's budget off CUDA


def test_the_shrink_fits_its_stages_to_the_budget() -> None:
    """Its shape grows with the rank; fp32 at R = 128 once had 4 stages of 80 KiB (more
    than a Hopper block has)."""
    from mlora.ops.kernels import fused_gemm, shrink

    a100 = 166_912 - fused_gemm.SMEM_HEADROOM
    for budget in (fused_gemm.SMEM_BYTES, a100):
        for size in (2, 4):
            for rank_pad in (16, 32, 64, 128):
                cfg = shrink.config(rank_pad, size, budget)
                assert cfg.block_m == shrink.config(rank_pad, 2).block_m  # the plan's tiles: by rank alone
                assert cfg.stages * (cfg.block_m + rank_pad) * cfg.block_k * size <= budget
    assert [shrink.config(r, 2).stages for r in (16, 64, 128)] == [4, 3, 4]
    assert shrink.config(128, 4, a100).stages == 3
