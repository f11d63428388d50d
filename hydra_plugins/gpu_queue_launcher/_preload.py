"""Import the launcher's `preload` list in the fork server, so forked jobs start with those modules loaded.

Forking is only safe for what was imported, never for what was *run*: a process that initialised CUDA cannot hand
a working CUDA to a forked child, and a libgomp (OpenMP) thread pool that ran once hangs the child at its first
parallel region. So the list is imported, nothing is executed, and the report says which entry, if any, initialised
CUDA or left threads behind; the launcher then refuses to fork from that process (see launcher.py).

An entry is a module name (`torch`) or `module:attribute` (`diffusers:StableDiffusionXLPipeline`), the latter for
packages that import lazily on attribute access. An entry that fails to import is reported and skipped.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from typing import Any


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False


def _load(entry: str) -> None:
    module_name, _, attr_path = entry.partition(":")
    obj: Any = importlib.import_module(module_name.strip())
    for attr in filter(None, attr_path.strip().split(".")):
        obj = getattr(obj, attr)


def preload(entries: list[str]) -> dict[str, Any]:
    """Import every entry; return {loaded, failed: {entry: error}, seconds, cuda_initialized_by, threads}."""
    report: dict[str, Any] = {"loaded": [], "failed": {}, "seconds": 0.0, "cuda_initialized_by": None, "threads": []}
    # torch.cuda.is_available() during an import would otherwise create a CUDA driver context here; the NVML
    # check answers the same question without one (documented as fork-safe by PyTorch).
    nvml_was = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    start = time.perf_counter()
    try:
        for entry in entries:
            try:
                _load(entry)
                report["loaded"].append(entry)
            except BaseException as exc:  # an import may even call sys.exit; a bad entry must not stop the sweep
                if isinstance(exc, KeyboardInterrupt):
                    raise
                report["failed"][entry] = f"{type(exc).__name__}: {exc}"
            if report["cuda_initialized_by"] is None and _cuda_initialized():
                report["cuda_initialized_by"] = entry
    finally:
        if nvml_was is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml_was
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["threads"] = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    return report
