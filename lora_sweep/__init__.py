"""lora-sweep: an experiment-matrix runner for SDXL LoRA training with kohya sd-scripts v0.8.7 semantics.

Where things live (imports flow one way, top to bottom; see docs/architecture.md):
- top level: the config schema (`config`), the sweep's parent run (`callbacks`), shared helpers (`errors`,
  `atomic`, `paths`), and `python -m lora_sweep` (`__main__`);
- `checks/`: the command line, the config's values and the pre-flight of files, before anything heavy loads;
- `job/`: one job's life in MLflow (`run`), its names, what it reports (`status`), skip-finished;
- `tracking/`: the MLflow store, a run's logger, the UI server;
- `training/`: the loop and the pure math it composes (`noise`, `loss`, `optim`, `precision`, checkpoints);
- `data/`: folder -> bucketed, cached examples (`dataset`, `captions`, `buckets`, `cache`, `prepare`);
- `model/`: SDXL loading, the tiny model, LoRA on kohya's targets and its file formats, encoders;
- `sampling/`: prompt files, sample images during training, per-sample image metrics;
- `compare/`: the report and the article's table.

Importing the package changes nothing in the process; every entry point calls `setup()` first.
"""

__version__ = "0.1.0"


# Library messages that say nothing a lora-sweep user can act on, dropped by (logger, text). Nothing of ours is here.
LIBRARY_NOISE = (
    # transformers: the pipelines' image processors (safety checker, IP-Adapter), which lora-sweep never uses, fall
    # back from torchvision to PIL
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    # bitsandbytes: an optional CPU kernel for 4-bit layers (lora-sweep has none; its 8-bit optimizers need none)
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)


def setup() -> None:
    """Make this process ready for lora-sweep: register the Hydra resolvers conf/ uses (`lora_sweep_job_dir`,
    `lora_sweep_project`), drop LIBRARY_NOISE from the logs, and log Python warnings as one clean line each.
    Idempotent. Called by every entry point: sweep.py (as it starts, and in `main`, the task function a launcher's
    job process runs), `python -m lora_sweep`. A job process has the resolvers before `main` runs, when Hydra
    resolves the job's folder: every launcher hands its jobs Hydra's singleton state, which holds them."""
    import logging
    import warnings

    from lora_sweep import paths
    from lora_sweep.job import names

    names.register_resolver()
    paths.register_resolver()
    for logger_name, text in LIBRARY_NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))
    warnings.showwarning = _log_python_warning


class _DropText:
    """A logging filter dropping the records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


def _log_python_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning`: a Python warning (a library's, or ours such as the optimizer's low-lr advice) as one
    log line, `UserWarning: <message>`, without the file name and the source line Python prints. Python's own
    filters still decide what is shown (by default once per place that warns)."""
    import logging

    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)
