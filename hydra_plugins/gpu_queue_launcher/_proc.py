"""Process plumbing for the fork server and job processes (POSIX; the parent-death signal is Linux-only). Each
function changes process-wide state, and runs only in a process the launcher created.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence

_PR_SET_PDEATHSIG = 1

# a fresh interpreter gets the launcher's sys.path, so modules resolve as in the sweep process
SYS_PATH_ENV = "GPU_QUEUE_SYS_PATH"
BOOTSTRAP = (
    "import json, os, sys; sys.path[:] = json.loads(os.environ.pop({env!r})); "
    "from hydra_plugins.gpu_queue_launcher.{module} import main; sys.exit(main(sys.argv[1:]))"
)


def python_command(module: str, args: Sequence[str]) -> list[str]:
    """argv that runs `hydra_plugins.gpu_queue_launcher.<module>.main(args)` in a fresh interpreter."""
    return [sys.executable, "-c", BOOTSTRAP.format(env=SYS_PATH_ENV, module=module), *args]


def env_with_sys_path(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus this process's sys.path for the bootstrap above."""
    return {**env, SYS_PATH_ENV: json.dumps(sys.path)}


def die_with_parent(sig: int, parent: int) -> None:
    """Ask the kernel to send `sig` to this process when its parent (pid `parent`) dies (Linux only); exit if it
    already has. Called here, not in Popen's preexec_fn, which is unsafe in a multi-threaded parent."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            return
    if os.getppid() != parent:
        os._exit(1)


def reset_signals_for_job() -> None:
    """Give a job the signal dispositions of a fresh Python, but SIGTERM raises KeyboardInterrupt as SIGINT does:
    the queue forwards either, and a job stopped before its own handler is set unwinds the same way."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def redirect_output(log_path: str) -> None:
    """Send fd 1 and 2 (so also C libraries, subprocesses and crash dumps) to `log_path`, line-buffered."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)


def replace_environ(env: Mapping[str, str]) -> None:
    """Make os.environ (and the C environment, through os.environ's putenv) exactly `env`."""
    os.environ.clear()
    os.environ.update(env)


def kill_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
