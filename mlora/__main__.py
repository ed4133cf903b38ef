"""`python -m mlora …` and `torchrun … -m mlora …`."""

import sys

from mlora.cli import run

sys.exit(run())
