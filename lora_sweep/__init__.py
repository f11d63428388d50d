"""lora-sweep: an experiment-matrix runner for SDXL LoRA training with kohya sd-scripts v0.8.7 semantics.

Where things live (imports flow one way, top to bottom; see README's Layout):
- top level: compose and check a config (`config`, `validate`), one job's life in MLflow (`run`, `tracking`,
  `callbacks`), shared helpers (`errors`, `atomic`, `paths`), and `python -m lora_sweep` (`__main__`);
- `training/`: the loop and the pure math it composes (`noise`, `loss`, `optim`, `precision`, checkpoints);
- `data/`: folder -> bucketed, cached examples (`dataset`, `captions`, `buckets`, `cache`, `prepare`);
- `model/`: SDXL loading, the tiny model, LoRA on kohya's targets and its file formats, encoders;
- `compare/`: sampling, image metrics, the report, the article's table, the MLflow UI.
"""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """Hydra resolvers conf/ uses, in every process that imports lora_sweep (see jobs.register_resolver)."""
    from lora_sweep import jobs, paths

    jobs.register_resolver()
    paths.register_resolver()


_register_resolvers()
