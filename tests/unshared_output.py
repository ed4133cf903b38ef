"""torchrun entry for a test: `mlora train` on ranks that do not share the output folder
(as on hosts without a shared file system).

By default every rank is told the folder is not shared, so rank 0 writes every adapter
at the end from slices gathered over torch.distributed. With MLORA_TEST_RANK_DIRS=DIR
each rank works in DIR/rank<k> instead, so a relative `output_dir` is a folder of its
own that no other rank sees, as on separate hosts (model and data paths stay absolute).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlora.runtime.pipeline as pipeline
from mlora.cli import main

seen_by_all = pipeline.output_is_shared


def not_shared(*args: object) -> bool:
    seen_by_all(*args)  # the same collective on every rank, then the other answer
    return False


if __name__ == "__main__":
    rank_dirs = os.environ.get("MLORA_TEST_RANK_DIRS")
    if rank_dirs:
        own = Path(rank_dirs) / f"rank{os.environ['RANK']}"
        own.mkdir(parents=True, exist_ok=True)
        os.chdir(own)
    else:
        pipeline.output_is_shared = not_shared
    sys.exit(main(sys.argv[1:]))
