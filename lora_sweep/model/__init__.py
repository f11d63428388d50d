"""SDXL's parts: loading (a diffusers folder or one .safetensors), the tiny random-weight model, LoRA on
kohya's targets with its file formats, and text/image encoding. Knows nothing of training.
"""
