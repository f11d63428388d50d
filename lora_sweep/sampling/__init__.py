"""What a training draws and measures so that variants can be compared: prompt files (kohya's format), sample
images with the LoRA being trained, and the per-sample image metrics. Runs during training; the report reads back
what it logged.
"""
