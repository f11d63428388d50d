"""The fork server: a fresh interpreter that imports the heavy modules once and forks one child per job.

Not the sweep process: its callbacks' threads and sqlite connections must not reach a job. This one has only
imported `preload`, with no CUDA and no thread pool, so its forks are clean.

Protocol, over one socket (multiprocessing.connection framing, pickled dicts):
  launcher -> server  {"base": [...], "preload": [...]}          once, first
  server -> launcher  {"ev": "ready", "pid", "report": {...}}   once (see _preload.preload)
  launcher -> server  {"cmd": "run", "idx", "spec"} | {"cmd": "signal", "idx", "sig"} | {"cmd": "quit"}
  server -> launcher  {"ev": "started", "idx", "pid", "t"} | {"ev": "exited", "idx", "pid", "returncode", "t"}
Each job leads its own process group, killed when the job exits. If the launcher goes away (socket EOF, or SIGTERM
at its death) every job group is killed and the server exits.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from . import _proc
from ._child import run_forked
from ._preload import preload


def main(argv: list[str]) -> int:
    """Entry point (argv: socket fd, launcher pid); see _proc.python_command."""
    fd, parent = int(argv[0]), int(argv[1])
    _proc.die_with_parent(signal.SIGTERM, parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the launcher's to interpret
    conn = Connection(fd)
    hello = conn.recv()
    base = preload(list(hello["base"]))  # what unpickling a job needs (Hydra, OmegaConf, the scanned plugins)
    report = preload(list(hello["preload"]))
    # so a child's collections do not touch (and copy-on-write) every preloaded page
    gc.collect()
    gc.freeze()
    conn.send({"ev": "ready", "pid": os.getpid(), "report": {**report, "base_failed": base["failed"]}})
    return _serve(conn)


def _serve(conn: Connection) -> int:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select() through the wakeup fd
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    children: dict[int, int] = {}  # pid (= process group id) -> job index
    try:
        while not stopping:
            ready, _, _ = select.select([conn.fileno(), wake_r], [], [], 1.0)
            if wake_r in ready:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
            _reap(conn, children)
            if conn.fileno() in ready and not _handle(conn, conn.recv(), children, (wake_r, wake_w)):
                break
    except (EOFError, OSError):
        pass  # the launcher is gone: kill every job
    finally:
        for pid in children:
            _proc.kill_group(pid, signal.SIGKILL)
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    return 0


def _handle(conn: Connection, msg: dict[str, Any], children: dict[int, int], wake: tuple[int, int]) -> bool:
    """Act on one launcher message; False means stop serving."""
    if msg["cmd"] == "run":
        pid = _fork_job(conn, msg["spec"], wake)
        children[pid] = msg["idx"]
        conn.send({"ev": "started", "idx": msg["idx"], "pid": pid, "t": time.time()})
    elif msg["cmd"] == "signal":
        for pid, idx in children.items():
            if idx == msg["idx"]:
                _proc.kill_group(pid, msg["sig"])
    elif msg["cmd"] == "quit":
        return False
    return True


def _fork_job(conn: Connection, spec_path: str, wake: tuple[int, int]) -> int:
    server = os.getpid()
    pid = os.fork()
    if pid == 0:  # the job: never returns into the server loop
        code = 70
        try:
            os.setpgid(0, 0)
            _proc.reset_signals_for_job()
            for fd in wake:
                os.close(fd)
            os.close(conn.fileno())
            code = run_forked(spec_path, server)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # also here: the launcher may signal the group as soon as it hears "started"
    except (PermissionError, ProcessLookupError):
        pass
    return pid


def _reap(conn: Connection, children: dict[int, int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        idx = children.pop(pid, None)
        _proc.kill_group(pid, signal.SIGKILL)  # whatever the job left running in its group
        if idx is not None:
            conn.send({"ev": "exited", "idx": idx, "pid": pid, "returncode": os.waitstatus_to_exitcode(status),
                       "t": time.time()})
