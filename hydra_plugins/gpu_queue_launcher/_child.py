"""One job in a process of its own: set the process up, run Hydra's `run_job`, leave a result file, exit.

Run by a forked child (`run_forked`) or a fresh interpreter (`main`, `start_method: spawn`). A spec file holds a
plain-pickled header (environment, paths) and a cloudpickled payload; the header is applied first, because
unpickling the task function imports user modules whose import-time code must see the job's environment.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import signal
import sys
import time
import traceback
from typing import Any

from . import _proc


def write_spec(path: str, header: dict[str, Any], payload: bytes) -> None:
    """`payload` is the cloudpickled {hydra_context, task_function, sweep_config, singleton_state}."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:  # it holds the environment
        pickle.dump({"header": header, "payload": payload}, f, protocol=pickle.HIGHEST_PROTOCOL)


def _load_header(path: str) -> tuple[dict[str, Any], bytes]:
    with open(path, "rb") as f:
        spec = pickle.load(f)
    return spec["header"], spec["payload"]


def _prepare(header: dict[str, Any]) -> None:
    """Environment, output and working directory of the job, before any user code runs."""
    _proc.replace_environ(header["env"])
    _proc.redirect_output(header["log_path"])
    faulthandler.enable(file=sys.stderr)  # a segfault leaves its Python traceback in the job's log
    sys.argv = list(header["argv"])
    os.chdir(header["cwd"])


def _picklable(value: Any) -> Any:
    import cloudpickle

    try:
        cloudpickle.dumps(value)
        return value
    except Exception:
        if isinstance(value, BaseException):
            return RuntimeError(f"{type(value).__name__}: {value}")
        return repr(value)


def _restore_filenames(task_function: Any, filename: str | None) -> None:
    """Give `__main__` functions shipped by value (file "<dynamic-code>") their file back, for tracebacks' lines."""
    if not filename:
        return
    for fn in [task_function, *getattr(task_function, "__globals__", {}).values()]:
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_filename == "<dynamic-code>" and getattr(fn, "__module__", "") == "__main__":
            fn.__code__ = code.replace(co_filename=filename)


def _run(payload: bytes) -> tuple[Any, str | None]:
    """Run the Hydra job; return (JobReturn, traceback text of a failure or None)."""
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
    from hydra.errors import CompactHydraException

    job = cloudpickle.loads(payload)
    _restore_filenames(job["task_function"], job.get("task_filename"))
    setup_globals()
    Singleton.set_state(job["singleton_state"])
    context = job["hydra_context"]
    if context is None:  # the callbacks could not be pickled: build fresh ones
        from hydra._internal.callbacks import Callbacks
        from hydra.types import HydraContext

        context = HydraContext(config_loader=job["config_loader"], callbacks=Callbacks(job["sweep_config"]))
    try:
        ret = run_job(
            hydra_context=context,
            task_function=job["task_function"],
            config=job["sweep_config"],
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: run_job only catches Exception
        ret = JobReturn(overrides=list(job["sweep_config"].hydra.overrides.task), status=JobStatus.FAILED)
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            ret.status, exc = JobStatus.COMPLETED, None  # type: ignore[assignment]
        ret.return_value = exc
    failure = ret._return_value if ret.status == JobStatus.FAILED else None
    tb = "".join(traceback.format_exception(failure)) if isinstance(failure, BaseException) else None
    if isinstance(failure, CompactHydraException):  # Hydra's convention: the message is the whole story
        sys.stderr.write(f"gpu_queue: the job did not finish: {failure}\n")
    elif tb:
        sys.stderr.write(f"gpu_queue: the job failed:\n{tb}")
    ret.return_value = _picklable(ret._return_value)
    return ret, tb


def _finish(result_path: str, job_return: Any, tb: str | None) -> None:
    import cloudpickle

    tmp = f"{result_path}.tmp"
    with open(tmp, "wb") as f:
        f.write(cloudpickle.dumps({"job_return": job_return, "traceback": tb, "ended_at": time.time()}))
    os.replace(tmp, result_path)


def _flush() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def run_forked(spec_path: str, parent: int) -> int:
    """Body of a job the fork server just forked (already in its own process group). Returns the exit code."""
    _proc.die_with_parent(signal.SIGKILL, parent)
    _proc.reset_signals_for_job()
    header, payload = _load_header(spec_path)
    _prepare(header)
    job_return, tb = _run(payload)
    _finish(header["result_path"], job_return, tb)
    _flush()
    return 0


def main(argv: list[str]) -> int:
    """`start_method: spawn`: a fresh interpreter per job (argv: spec path, launcher pid)."""
    spec_path, parent = argv[0], int(argv[1])
    _proc.die_with_parent(signal.SIGKILL, parent)
    header, payload = _load_header(spec_path)
    from ._preload import preload

    preload(header["preload"])  # what a fresh process pays per job; the fork server pays it once
    _prepare(header)
    job_return, tb = _run(payload)
    _finish(header["result_path"], job_return, tb)
    _flush()
    return 0
