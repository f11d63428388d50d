"""The loop and the pure math it composes (noise, loss, optim, precision), checkpoints and failure handling.

The math modules know no config objects and no MLflow.
"""
