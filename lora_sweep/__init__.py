"""lora-sweep: an experiment-matrix runner for SDXL LoRA training with kohya sd-scripts v0.8.7 semantics."""

__version__ = "0.1.0"
