"""MeteoRA: K trained LoRA adapters as one mixture, a top-k gate in every adapted linear.

`gate` routes tokens, `op` applies the chosen adapters (a loop reference and Triton
kernels behind one autograd Function), `adapter` holds one stage's adapters and gates,
`suite` is the synthetic multi-task data, `generate` runs models with either kind of
adapter folder. See docs/meteora.md. Nothing is imported here, so that the suite and
its data can be read without torch.
"""
