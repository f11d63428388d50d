"""The one writer of BENCHMARKS.md blocks and benchmarks/results/*.json, shared by the three suites.

Each suite owns the block of BENCHMARKS.md between `<!-- <name>:begin -->` and `<!-- <name>:end -->`; `publish`
rewrites only that block, so the hand-written text around it stays. Nothing it writes names a folder of the machine
that measured: `portable` makes paths in the repository relative to it and shortens every other absolute path.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "diffusers", "peft", "transformers", "mlflow", "hydra-core")
ANY_ABSOLUTE_PATH = re.compile(r"(?<![\w.~>])/+(?:[\w.+-]+/)+([\w.+-]+)")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict:
    """Where and with what a figure was measured (the caller adds `load_average_end` and, on CUDA, `gpu`)."""
    import psutil

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    script = Path(sys.argv[0]).resolve()  # `python -m benchmarks.cpu` runs benchmarks/cpu.py
    head = ["-m", f"benchmarks.{script.stem}"] if script.parent == ROOT / "benchmarks" else sys.argv[:1]
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                    platform.machine()),
        "cores": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "versions": {p: getattr(next(metadata.distributions(name=p), None), "version", "-") for p in PACKAGES},
        "git_commit": (_git("rev-parse", "--short", "HEAD") or "unknown") + ("+uncommitted changes" if dirty else ""),
        "command": shlex.join(["python", *head, *sys.argv[1:]]), "load_average_start": load_average(),
    }


def machine_lines(info: dict) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [f"- Measured {info['date_utc']} on {info['host']}, {info['cpu']} ({info['cores']} cores, "
             f"{info['memory_gib']:.0f} GiB).",
             *([f"- GPU: {info['gpu']}."] if info.get("gpu") else []),
             f"- Python {info['python']}; {versions}; lora-sweep {info['git_commit']}.",
             f"- Command: `{info['command']}`."]
    if info.get("load_average_start"):
        loads = [*info["load_average_start"], *(info.get("load_average_end") or [])]
        shared = " (above the core count: other processes shared the machine)" if max(loads) > info["cores"] else ""
        lines.append(f"- Load average (1/5/15 min) at start {info['load_average_start']}, at end "
                     f"{info.get('load_average_end')}{shared}.")
    return lines


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def _prefixes() -> list[tuple[str, str]]:
    """Absolute folders and what they are written as, longest first."""
    named = {str(ROOT): ".", tempfile.gettempdir(): "<tmp>", str(Path.home()): "~"}
    if os.environ.get("LORA_SWEEP_CACHE_DIR"):
        named[os.environ["LORA_SWEEP_CACHE_DIR"]] = "<cache>"
    named |= {os.path.realpath(folder): name for folder, name in list(named.items())}
    return sorted(named.items(), key=lambda pair: -len(pair[0]))


def portable(value):
    """`value` (JSON-like) with each absolute path in its strings made machine-independent: relative inside the
    repository, `<cache>/...`, `<tmp>/...` or `~/...` for those folders, `.../<last part>` for any other."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str):
        return value
    for folder, name in _prefixes():
        pattern = r"(?<![\w.+-])" + re.escape(folder) + r"(?![\w.+-])(/?)"
        value = re.sub(pattern, lambda m, name=name: "" if name == "." and m.group(1) else name + m.group(1), value)
    return ANY_ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(1), value)


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the block between name's markers replaced by `body` (appended if the markers are missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + block + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish(name: str, title: str, results: dict, lines: list[str], *, out: Path | None,
            markdown: Path | None) -> str:
    """Print a suite's block, write its results to `out` and the block into `markdown` (None: not written)."""
    results = portable(results)
    body = portable("\n".join([f"### {title}", "", *machine_lines(results["machine"]), "", *lines]).rstrip() + "\n")
    print(body, flush=True)
    if out:
        _write(Path(out), json.dumps(results, indent=1, default=str) + "\n")
    if markdown:
        text = Path(markdown).read_text() if Path(markdown).exists() else "# Benchmarks\n"
        _write(Path(markdown), replace_block(text, name, body))
    return body
