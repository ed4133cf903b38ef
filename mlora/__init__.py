"""mlora: train many LoRA adapters at once over one shared, frozen base model."""

__version__ = "0.1.0"
