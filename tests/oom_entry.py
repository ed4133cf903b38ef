"""torchrun entry for a test: `mlora train` where rank MLORA_TEST_OOM_RANK runs out of
GPU memory at its MLORA_TEST_OOM_AT-th stage forward (torch raises the error itself;
there is no GPU to fill on a CPU test machine)."""

from __future__ import annotations

import os
import sys

import torch

from mlora.cli import main
from mlora.model.stage import StageModel

if __name__ == "__main__":
    if os.environ["RANK"] == os.environ["MLORA_TEST_OOM_RANK"]:
        real, calls = StageModel.forward, [0]

        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == int(os.environ["MLORA_TEST_OOM_AT"]):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(self, *args, **kwargs)

        StageModel.forward = forward  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
