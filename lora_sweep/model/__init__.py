"""SDXL's parts: loading (a diffusers folder or one .safetensors), the tiny models (random weights; trained on a
synthetic world, and the script that trains it), LoRA on kohya's targets with its file formats, and text/image
encoding. Knows nothing of training.
"""
