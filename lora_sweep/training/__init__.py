"""The loop and the pure math it composes: noise (noise.py), loss (loss.py), optimizers (optim.py), precision
(precision.py), checkpoints and failure handling. The math modules know no config objects and no MLflow.
"""
