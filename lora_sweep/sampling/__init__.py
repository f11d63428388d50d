"""What a training draws and measures so that variants can be compared: prompt files (kohya's format), sample
images with the LoRA being trained, per-sample image metrics and the fitting speed of the fit/loss curve. Runs
during training; the report reads back what it logged.
"""
