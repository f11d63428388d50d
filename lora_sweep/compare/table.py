"""The article's table, rebuilt from the composed experiment configs (never from a copy of the table).

Rows use the article's names, columns are the experiments, "x" means off: the table checks the experiment files.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
OPTIMIZER_ABBREVIATIONS = {"dadapt_adam_preprint": "DAP", "lion8bit": "L8", "prodigy": "Pg"}  # the article's legend
PRECISION_NAMES = {"fp8": "fp8", "fp8_bf16": "fp8", "fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


def _off(value) -> str:
    """The article writes "x" for an option that is off (None, 0, False)."""
    if value is None or value is False or value == 0:
        return "x"
    if value is True:
        return "v"
    return f"{value:g}" if isinstance(value, float) else str(value)


ROWS: list[tuple[str, Callable]] = [
    ("precision", lambda c: PRECISION_NAMES.get(c.precision.name, c.precision.name)),
    ("optimizer", lambda c: OPTIMIZER_ABBREVIATIONS.get(c.optimizer.name, c.optimizer.name)),
    ("min-SNR gamma", lambda c: _off(c.loss.min_snr_gamma)),
    ("debiased estimation loss", lambda c: _off(c.loss.debiased)),
    ("noise offset", lambda c: _off(c.noise.offset)),
    ("multires noise iterations", lambda c: _off(c.noise.multires_iterations)),
    ("IP noise gamma", lambda c: _off(c.noise.ip_gamma)),
    ("huber_c", lambda c: _off(c.loss.huber_c) if c.loss.type == "huber" else "x"),
    ("BS", lambda c: str(c.train.batch_size)),
    ("gradient accumulation", lambda c: str(c.train.grad_accum)),
]


def experiment_names(pattern: str = "v*") -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob(f"{pattern}.yaml"))


def compose_experiment(name: str, overrides: tuple[str, ...] = ()):
    from hydra import compose, initialize_config_dir

    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("config", overrides=[f"experiment={name}", *overrides])


def build_table(names: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header (parameter, v53, ...) and one row per article parameter."""
    names = names or experiment_names()
    configs = [compose_experiment(n) for n in names]
    return ["parameter", *names], [[label, *(get(c) for c in configs)] for label, get in ROWS]


def render(header: list[str], rows: list[list[str]], fmt: str = "text") -> str:
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([header, *rows])
        return out.getvalue()
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    if fmt == "markdown":
        return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]) + "\n"
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines) + "\n"
