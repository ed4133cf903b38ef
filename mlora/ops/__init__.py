"""Operators: the multi-LoRA linear (PyTorch reference and Triton kernels behind one Function)."""

from mlora.ops.multi_lora import LoraCall, Segment, multi_lora_linear, reference_backward, reference_forward

__all__ = ["LoraCall", "Segment", "multi_lora_linear", "reference_backward", "reference_forward"]
