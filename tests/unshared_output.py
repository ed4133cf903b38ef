"""torchrun entry for a test: `mlora train` on ranks that do not share the output folder
(as on hosts without a shared file system), so rank 0 writes every adapter at the end
from slices gathered over torch.distributed."""

from __future__ import annotations

import sys

import mlora.runtime.pipeline as pipeline
from mlora.cli import main

seen_by_all = pipeline.output_is_shared


def not_shared(*args: object) -> bool:
    seen_by_all(*args)  # the same collective on every rank, then the other answer
    return False


if __name__ == "__main__":
    pipeline.output_is_shared = not_shared
    sys.exit(main(sys.argv[1:]))
