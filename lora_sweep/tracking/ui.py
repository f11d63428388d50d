"""`make ui` / `python -m lora_sweep ui`: the MLflow web UI over this project's store, on loopback only.

`mlflow server` spawns workers that a plain Ctrl-C can leave holding the port and the sqlite file, so it runs in
its own process group and the whole group is stopped. Loopback by default: the store holds paths and run details.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from lora_sweep.errors import UserError

DEFAULT_EXPERIMENT = "lora-sweep"


def browse_command(store_uri: str, experiment: str = DEFAULT_EXPERIMENT, experiment_id: str | None = None) -> str:
    """What to type to see `experiment`'s runs in `store_uri`: an MLflow server's runs page, else
    `python -m lora_sweep ui --tracking-uri <store>` (`make ui` serves another store than the run's, maybe).
    """
    import shlex

    if urlparse(store_uri).scheme in ("http", "https"):
        from lora_sweep.tracking.store import runs_page_url

        return runs_page_url(store_uri.rstrip("/"), experiment_id) if experiment_id else store_uri
    command = f"python -m lora_sweep ui --tracking-uri {shlex.quote(store_uri)}"
    return command + (f" --experiment {shlex.quote(experiment)}" if experiment != DEFAULT_EXPERIMENT else "")


def default_store_uri() -> str:
    from lora_sweep.tracking.store import tracking_uri

    return tracking_uri(None)


def sqlite_path(store_uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores). `sqlite:////abs` is absolute."""
    if not store_uri.startswith("sqlite:///"):
        return None
    return Path(unquote(store_uri[len("sqlite:///"):])).resolve()


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def server_command(store_uri: str, host: str, port: int) -> list[str]:
    """`mlflow server` with one worker; artifacts of experiments created from the UI go beside the database."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    database = sqlite_path(store_uri)
    if database is not None:
        command += ["--artifacts-destination", (database.parent / "mlruns").as_uri()]
    return command


def stop_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the server's whole process group, wait, then SIGKILL whatever is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone: no worker of its group may survive it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        break


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    """Poll `/health` until it answers 200; fail early with the server's log if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise UserError(f"mlflow server exited with code {process.returncode} before it was ready.\n{tail}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.3)
    raise UserError(f"mlflow server did not answer on {url} within {timeout_s:.0f} s (log: {log_path}).")


@dataclasses.dataclass(frozen=True)
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path


@contextlib.contextmanager
def running_server(store_uri: str, host: str = "127.0.0.1", port: int = 5000, *, timeout_s: float = 120.0,
                   log_path: Path | None = None) -> Iterator[Server]:
    """Start `mlflow server` in its own process group, yield it once it answers, stop the whole group on exit."""
    if urlparse(store_uri).scheme in ("http", "https"):
        raise UserError(f"The tracking store '{store_uri}' is already an MLflow server: open it in a browser "
                        "instead, or unset MLFLOW_TRACKING_URI to serve the project's ./mlflow.db.")
    if not port_is_free(host, port):
        raise UserError(f"Port {port} on {host} is in use (another MLflow UI?). Stop it or pick another port: "
                        "`make ui PORT=5001` / `python -m lora_sweep ui --port 5001`.")
    database = sqlite_path(store_uri)
    if database is not None and not database.exists():
        print(f"note: {database} does not exist yet; the UI starts with an empty store. A run keeps its store in "
              "the folder it was started from (its last line says which): pass that one with --tracking-uri.")
    log_path = log_path or Path(tempfile.mkstemp(prefix="mlflow-server-", suffix=".log")[1])
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(server_command(store_uri, host, port), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        wait_ready(url, process, timeout_s, log_path)
        yield Server(url, process, log_path)
    finally:
        stop_group(process)


def experiment_page(store_uri: str, base_url: str, experiment: str) -> str:
    """The URL of `experiment`'s runs table (tagging it model-training if needed), or a line saying it does not exist.
    """
    from lora_sweep.tracking import store
    from lora_sweep.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, runs_page_url

    try:
        client = store.client(store_uri)
        found = client.get_experiment_by_name(experiment)
    except Exception as exc:  # the UI still serves whatever the store holds
        return f"(could not look up experiment '{experiment}': {str(exc).splitlines()[0][:200]})"
    if found is None:
        return f"(no experiment '{experiment}' in this store yet: run a sweep, then reload {base_url})"
    if EXPERIMENT_KIND_TAG not in (found.tags or {}):
        with contextlib.suppress(Exception):
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return runs_page_url(base_url, found.experiment_id)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(store_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000,
          experiment: str = DEFAULT_EXPERIMENT) -> int:
    """Run the UI until Ctrl-C or SIGTERM, printing the runs table's URL when ready; returns the exit code."""
    store_uri = store_uri or default_store_uri()
    # Explicit handlers: a background process of a non-interactive shell inherits SIGINT as ignored.
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with running_server(store_uri, host, port) as server:
            runs = experiment_page(store_uri, server.url, experiment)
            print(f"MLflow UI for {store_uri}\n  {server.url}\nruns of experiment '{experiment}':\n  {runs}\n"
                  "(Ctrl-C to stop)", flush=True)
            code = server.process.wait()  # until it dies on its own, or Ctrl-C / SIGTERM interrupts the wait
            print(f"mlflow server exited on its own (code {code}); its log: {server.log_path}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("\nstopped the MLflow UI.")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", "--store", dest="store",
                        help="MLflow tracking store URI, as `compare --tracking-uri` and tracking.uri take it "
                             "(default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db); --store is the old name")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                        help="experiment whose runs page URL is printed (default: lora-sweep, tracking.experiment's "
                             "default)")
    args = parser.parse_args(argv)
    try:
        return serve(args.store, args.host, args.port, args.experiment)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
