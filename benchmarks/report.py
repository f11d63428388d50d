"""What every benchmark result carries (machine, versions, command, load) and how it lands in BENCHMARKS.md.

Each benchmark owns one block of BENCHMARKS.md between `<!-- <name>:begin -->` and `<!-- <name>:end -->` and
rewrites only that block, so the hand-written text around it stays.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks.common import ROOT

PACKAGES = ("torch", "diffusers", "peft", "transformers", "mlflow", "hydra-core")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """Where and with what a figure was measured."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
        "python": platform.python_version(), "versions": {p: _version(p) for p in PACKAGES},
        "git_commit": commit + ("+uncommitted changes" if dirty else ""),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "load_average_start": load_average(),
    }


def machine_lines(info: dict) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    mem = f", {info['memory_gib']:.0f} GiB" if info.get("memory_gib") else ""
    lines = [f"- Measured {info['date_utc']} on {info['host']}, {info['cpu']} ({info['cores']} cores{mem}).",
             f"- Python {info['python']}; {versions}; lora-sweep {info['git_commit']}.",
             f"- Command: `{info['command']}`."]
    if info.get("gpu"):
        lines.insert(1, f"- GPU: {info['gpu']}.")
    if info.get("load_average_start") is not None:
        end = info.get("load_average_end")
        lines.append(f"- Load average (1/5/15 min) at start {info['load_average_start']}"
                     + (f", at end {end}" if end else "") + ": other processes shared the machine when this is "
                     "above the core count; the ratios are measured side by side for that reason.")
    return lines


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the block between name's markers replaced by `body` (appended at the end if the markers are
    missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + block + "\n"


def update_markdown(path: Path, name: str, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(replace_block(text, name, body))
    os.replace(tmp, path)


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"
