"""lora-sweep: an experiment-matrix runner for SDXL LoRA training with kohya sd-scripts v0.8.7 semantics.

The packages (`checks`, `job`, `tracking`, `training`, `data`, `model`, `sampling`, `compare`) and the rules
between them are in docs/architecture.md. Importing the package changes nothing; every entry point calls `setup()`.
"""

__version__ = "0.1.0"


# (logger, text) of library messages a user cannot act on, dropped
LIBRARY_NOISE = (
    # image processors lora-sweep never uses fall back from torchvision to PIL
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
    # a CPU kernel for 4-bit layers, which lora-sweep does not have
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # MLflow's HTTP client retrying a store that is down: the run logger says so in one line (tracking.logger)
    ("urllib3.connectionpool", "Retrying ("),
    # a locked or failing sqlite store: the SQL statement and a traceback; the run logger says so in one line
    ("mlflow.store.db.utils", "SQLAlchemy database error"),
    # a new sqlite store's tables being made: nothing to act on
    ("mlflow.store.db.utils", "Creating initial MLflow database tables"),
    ("mlflow.store.db.utils", "Updating database tables"),
)


def setup() -> None:
    """Register the Hydra resolvers conf/ uses, drop LIBRARY_NOISE from the logs, and log Python warnings as one
    line each. Idempotent; called by every entry point (sweep.py and its `main`, `python -m lora_sweep`)."""
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
    """`warnings.showwarning`: a warning as one log line, `UserWarning: <message>`, without file and source line.
    Python's filters still decide what is shown."""
    import logging

    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)
