"""Launcher-side handles on the processes that run jobs: the fork server, or one fresh interpreter per job.

Both offer submit, events, signal and close, with the same events ({"ev": "started"|"exited", "idx", "pid",
"returncode", "t"}).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from hydra_plugins._job_outcome import describe_exit

from . import _proc


def base_modules() -> list[str]:
    """Modules unpickling a job needs, as loaded here (Hydra, OmegaConf, cloudpickle, hydra_plugins): preloaded,
    they save about 1 s per job."""
    roots = {"hydra", "omegaconf", "cloudpickle", "yaml", "antlr4", "hydra_plugins"}
    return sorted(name for name in list(sys.modules) if name.split(".")[0] in roots)


class PoolDied(RuntimeError):
    """The fork server exited while jobs were queued or running."""


class ForkServerPool:
    """One fork server (see _forkserver.py), started in its own session so a terminal's Ctrl-C skips it."""

    start_method = "forkserver"

    def __init__(self, preload: list[str], log_path: Path, wait: bool = True):
        """Start the server and send it `preload`; `wait`: also wait until it is ready (else `wait_ready`)."""
        self.log_path = log_path
        self.report: dict[str, Any] = {}
        ours, theirs = socket.socketpair()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                _proc.python_command("_forkserver", [str(theirs.fileno()), str(os.getpid())]),
                pass_fds=[theirs.fileno()], start_new_session=True, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, env=_proc.env_with_sys_path(os.environ),
            )
        theirs.close()
        self.conn = Connection(ours.detach())
        try:
            self.conn.send({"base": base_modules(), "preload": list(preload)})
        except BaseException:
            self._kill()
            raise
        if wait:
            self.wait_ready()

    def wait_ready(self) -> dict[str, Any]:
        """Wait for the server's "ready" and return its preload report (also `self.report`)."""
        try:
            while not self.conn.poll(0.2):
                if self.proc.poll() is not None:
                    break
            self.report = self.conn.recv()["report"]
            return self.report
        except (EOFError, OSError):
            raise PoolDied(f"the fork server exited ({describe_exit(self.proc.wait())}) before it was "
                           f"ready; its output is in {self.log_path}") from None
        except BaseException:  # e.g. Ctrl-C while it preloads: no jobs yet, just kill it
            self._kill()
            raise

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, idx: int, spec_path: str, log_path: str, env: dict[str, str]) -> None:
        self._send({"cmd": "run", "idx": idx, "spec": spec_path})

    def signal(self, idx: int, sig: int) -> None:
        self._send({"cmd": "signal", "idx": idx, "sig": int(sig)})

    def events(self, timeout: float) -> list[dict[str, Any]]:
        try:
            if not self.conn.poll(timeout):
                return []
            out = [self.conn.recv()]
            while self.conn.poll(0):
                out.append(self.conn.recv())
            return out
        except (EOFError, OSError):
            raise self._died() from None

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self.conn.send(msg)
        except OSError:
            raise self._died() from None

    def _died(self) -> PoolDied:
        return PoolDied(f"the fork server died ({describe_exit(self.proc.wait())}); see {self.log_path}")

    def close(self) -> None:
        """Stop the server (it kills any job still running) and wait for it; safe to call twice."""
        if self.proc.poll() is None:
            try:
                self.conn.send({"cmd": "quit"})
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.conn.close()


class SpawnPool:
    """A fresh interpreter per job (`start_method: spawn`): pays the imports every time; no fork involved."""

    start_method = "spawn"

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen] = {}
        self.pending: list[dict[str, Any]] = []
        self.report: dict[str, Any] = {"loaded": [], "failed": {}, "seconds": 0.0, "threads": []}

    def alive(self) -> bool:
        return True

    def submit(self, idx: int, spec_path: str, log_path: str, env: dict[str, str]) -> None:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                _proc.python_command("_child", [spec_path, str(os.getpid())]), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_proc.env_with_sys_path(env),
            )
        self.procs[idx] = proc
        self.pending.append({"ev": "started", "idx": idx, "pid": proc.pid, "t": time.time()})

    def signal(self, idx: int, sig: int) -> None:
        proc = self.procs.get(idx)
        if proc is not None and proc.poll() is None:
            _proc.kill_group(proc.pid, sig)

    def events(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            out, self.pending = self.pending, []
            for idx, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    del self.procs[idx]
                    _proc.kill_group(proc.pid, signal.SIGKILL)  # leftovers in the job's group
                    out.append({"ev": "exited", "idx": idx, "pid": proc.pid, "returncode": proc.returncode,
                                "t": time.time()})
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(0.02)

    def close(self) -> None:
        for proc in self.procs.values():
            _proc.kill_group(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()
        self.procs.clear()
