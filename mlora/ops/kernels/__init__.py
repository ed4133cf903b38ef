"""Triton kernels behind the fused multi-LoRA operator (see docs/kernels.md).

- plan:        host-built device tables for one segment layout (cached per layout)
- shrink:      h = drop(x_seg)·A_slotᵀ, segment-grouped
- fused_gemm:  out = a·W(ᵀ) + Σ_segments s·u·V_slot, the LoRA expand as extra reduction steps
- seg_grads:   per-slot token reductions for dA and dB (and g = dy·B on the way)
- interpret:   what makes the kernels run under TRITON_INTERPRET=1 on CPU
"""
