"""On a machine with several GPUs: a P-stage NCCL pipeline gives the 1-GPU adapters.

    python bench/multigpu/pipeline_check.py --stages 2 [--steps 30]

Runs the demo run file (4 jobs, fp32) on one GPU, then with torchrun over P GPUs, and
prints the largest adapter difference, both runs' tokens/s and the measured bubble.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mlora_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlora", *args]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1", "OMP_NUM_THREADS": "1"}
    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run(mlora_cmd("tiny-model", str(root / "model")), check=True, cwd=ROOT, env=env, capture_output=True)
        common = [f"model.path={root / 'model'}", "model.device=cuda", "model.dtype=float32", f"max_steps={args.steps}",
                  f"jobs.add.max_steps={args.steps}", "learning_rate=1e-3", "eval_split=0"]
        t = time.time()
        one = subprocess.run(mlora_cmd("train", "configs/demo.yaml", "--plain", f"output_dir={root / 'one'}", *common),
                             cwd=ROOT, env=env, capture_output=True, text=True)
        t_one = time.time() - t
        if one.returncode:
            sys.exit(one.stderr[-3000:])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t = time.time()
        pipe = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.stages}", f"--master-port={port}",
             "-m", "mlora", "train", "configs/demo.yaml", "--plain", f"output_dir={root / 'pipe'}", *common],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )
        t_pipe = time.time() - t
        if pipe.returncode:
            sys.exit(pipe.stdout[-2000:] + pipe.stderr[-3000:])
        worst = 0.0
        for job in ("reverse", "upper", "add", "sort"):
            a = load_file(str(root / "one" / job / "adapter_model.safetensors"))
            b = load_file(str(root / "pipe" / job / "adapter_model.safetensors"))
            worst = max(worst, max((a[k] - b[k]).abs().max().item() for k in a))
        summary = json.loads((root / "pipe" / "run_summary.json").read_text())
        print(pipe.stdout.splitlines()[1:1 + args.stages])
        print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}: 1 GPU {t_one:.1f} s, "
              f"{args.stages}-stage NCCL pipeline {t_pipe:.1f} s (wall, process start included)")
        print(f"largest adapter difference 1 GPU vs {args.stages} stages: {worst:.2e} (fp32)")
        print(f"measured bubble {100 * summary['run']['bubble_fraction']:.1f}%, peak memory per stage "
              f"{[round(p / 2**20) for p in summary['run']['peak_memory_per_stage']]} MiB")


if __name__ == "__main__":
    main()
