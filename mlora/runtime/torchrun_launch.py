"""torchrun, ending quietly when stopped: `python -m mlora.runtime.torchrun_launch ARGS`.

Ctrl-C or SIGTERM makes torchrun's agent pass the signal to every rank and then raise
from its own main loop, printing a traceback below the ranks' clean stop (rank 0 has
already saved the run as interrupted and printed the `--resume` command). This runs the
same torchrun (same arguments, same behaviour otherwise) and exits 128 + the signal's
number instead, as a shell reports a process the signal ended. `launch/torchrun.sh` uses it.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except SignalException as exc:
        print(f"torchrun: stopped by {exc.sigval.name}", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
