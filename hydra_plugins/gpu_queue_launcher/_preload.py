"""Import the launcher's `preload` list in the fork server, so forked jobs start with those modules loaded.

Only importing is fork-safe: a child cannot inherit a working CUDA, and an OpenMP pool that ran once hangs it. The
report names an entry that initialised CUDA or left threads, and the launcher then will not fork (launcher.py).
An entry is `module` or `module:attribute` (for lazy packages); one that fails to import is reported and skipped.
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
    # the NVML check answers torch.cuda.is_available() without a CUDA context (fork-safe, per PyTorch)
    nvml_was = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    start = time.perf_counter()
    try:
        for entry in entries:
            try:
                _load(entry)
                report["loaded"].append(entry)
            except BaseException as exc:  # even sys.exit: a bad entry must not stop the sweep
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
