"""MeteoRA: K trained LoRA adapters as one mixture, a top-k gate in every adapted linear.

`gate` routes tokens, `op` applies the chosen adapters (a loop reference and Triton
kernels behind one autograd Function), `adapter` holds one stage's adapters and gates,
`suite` is the synthetic multi-task data, `generate` runs models with either kind of
adapter folder. See docs/meteora.md.
"""

from mlora.meteora.gate import gate_loss, route, task_labels
from mlora.meteora.op import bmm_delta, meteora_delta, reference_delta

__all__ = ["bmm_delta", "gate_loss", "meteora_delta", "reference_delta", "route", "task_labels"]
