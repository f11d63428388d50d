"""Folder and store checks: every folder a job writes, and the MLflow store it logs to.

The pre-flight's checks leave nothing behind: a folder not yet there is judged by its nearest existing parent, by
writing and removing a probe file (`os.access` says yes to root even on a read-only mount). A store is checked
without MLflow: its scheme, a sqlite file's folder, a server's TCP port (MLflow's client retries for ~4 minutes).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from lora_sweep.errors import UserError
from lora_sweep.paths import cache_root, state_root

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
# MLflow 3's tracking-store schemes (a database's may carry a driver: postgresql+psycopg2)
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "file", "")


def check_writable(path: Path, what: str) -> Path:
    """Create `path` if needed and prove a file can be written there; a UserError naming `what` and the path if not."""
    path = Path(path).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lora-sweep-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"{what}: cannot write to '{path}' ({exc.strerror or exc}). Make the folder writable, or point {what} at "
            "a folder on a disk with space (nothing was trained)."
        ) from exc
    return path


def sqlite_store_folder(uri: str) -> Path | None:
    """The folder holding a local MLflow store (sqlite file or file store), None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:")).expanduser().resolve()
    if "://" not in uri:
        return Path(uri).expanduser().resolve()
    return None


def folder_problems(cfg, hydra_dir: tuple[str, Path] | None = None, scans=()) -> list[str]:
    """One message per folder a job writes that cannot be created or written, then its MLflow store's problems, then
    a disk without room for what the job writes before the model loads (`space_needs` of `scans`)."""
    from lora_sweep.tracking.store import tracking_uri
    from lora_sweep.training.failures import free_space_problem
    folders = [("train.output_dir", cfg.train.output_dir), hydra_dir or ("hydra.run.dir", None),
               ("train.state_dir", state_root(cfg)),
               ("data.cache_dir", cache_root(cfg))]
    uri = tracking_uri(cfg.tracking.uri)
    problems = store_problems(uri)
    if not problems:
        folders.append((f"tracking.uri ({uri})", sqlite_store_folder(uri)))
    problems = [p for setting, folder in folders if folder is not None and (p := _unwritable(Path(folder), setting))] \
        + problems
    output_dir = cfg.train.output_dir or (hydra_dir[1] if hydra_dir else None)  # null: in the Hydra job folder
    if problems or output_dir is None:
        return problems
    space = free_space_problem(space_needs(cfg, Path(output_dir), uri, scans))
    return [space] if space is not None else []


def _unwritable(folder: Path, setting: str) -> str | None:
    folder = folder.expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{setting}: cannot create the folder '{folder}': '{existing}' is a file, not a folder."
    reason = None if os.access(existing, os.W_OK | os.X_OK) else "not writable"
    if reason is None:
        try:  # root passes os.access everywhere: only a real write tells
            fd, probe = tempfile.mkstemp(prefix=".lora-sweep-write-test-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            reason = f"cannot write there: {error.strerror or error}"
    if reason is None:
        return None
    return (f"{setting}: cannot write to '{folder}' ('{existing}' is {reason}). Make it writable, or point "
            f"{setting.split(' ')[0]} at a folder you can write to.")


def store_problems(uri: str) -> list[str]:
    """Problems of the MLflow store `uri` found without MLflow (a refused file store, an unknown scheme, a server
    that does not accept a connection), one paragraph each naming the URI and the fixes."""
    from lora_sweep.tracking.store import check_store_uri

    try:
        check_store_uri(uri)
    except UserError as error:
        return [str(error)]
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    scheme = "" if len(scheme) == 1 else scheme  # a Windows drive letter
    fixes = ("Unset tracking.uri and MLFLOW_TRACKING_URI for sqlite:///<cwd>/mlflow.db, or set one of them to "
             "sqlite:////absolute/path/mlflow.db or the address of a running MLflow server (http://host:port).")
    if scheme.split("+", 1)[0] not in STORE_SCHEMES:
        return [f"tracking.uri / MLFLOW_TRACKING_URI: '{uri}' has the scheme '{scheme}', for which MLflow has no "
                f"tracking store (accepted: {', '.join(s + '://' for s in STORE_SCHEMES if s)}). {fixes}"]
    if scheme not in ("http", "https"):
        return []
    host, port = parsed.hostname, parsed.port or (443 if scheme == "https" else 80)
    if not host:
        return [f"tracking.uri / MLFLOW_TRACKING_URI: '{uri}' names no host. {fixes}"]
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return []
    except OSError as error:
        why = "no answer" if isinstance(error, socket.timeout) else (error.strerror or type(error).__name__)
        return [f"tracking.uri / MLFLOW_TRACKING_URI: the MLflow server at '{uri}' does not accept a connection on "
                f"{host}:{port} ({why}, checked for {CONNECT_TIMEOUT_S:g} s). Start the server (mlflow server "
                f"--host {host} --port {port}) or check its address. {fixes}"]


def space_needs(cfg, output_dir: Path, uri: str, scans=()) -> dict[Path, tuple[str, int | None]]:
    """Folder -> (setting, bytes a job writes there; None: known once the model loads), from the config and `scans`
    before anything is made: states and LoRA files (`planned_bytes`), the tiny model and photos not built yet and one
    image's cache entries."""
    from lora_sweep.training.failures import cache_bytes, first_use_bytes, planned_bytes
    from lora_sweep.training.session import encodes_text_in_step

    planned = planned_bytes(cfg)
    states, outputs = planned if planned is not None else (None, None)
    resolved = {Path(p).expanduser().resolve() for p in (output_dir, state_root(cfg))}
    needs = {Path(output_dir).expanduser().resolve(): ("train.output_dir", outputs),
             state_root(cfg).expanduser().resolve(): ("train.state_dir", states)}
    if len(resolved) == 1:  # one folder for both
        needs = {next(iter(resolved)): ("train.output_dir and train.state_dir", (states or 0) + (outputs or 0) or None)}
    store = sqlite_store_folder(uri)
    if store is not None:
        needs.setdefault(store, (f"tracking.uri ({uri})", 0))
    items = sum(len(scan.items) for scan in scans)
    entries = cache_bytes(scans, cfg.data, text=not encodes_text_in_step(cfg))
    cache = cache_root(cfg).expanduser().resolve()
    needs.setdefault(cache, ("data.cache_dir", first_use_bytes(cfg) + (entries // items if items else 0)))
    return needs


def check_job_folders(cfg, output_dir: Path, uri: str, scans=()) -> Path:
    """Create every folder this job writes and prove it writable with free space (the cache: room for one image's
    entries; a warning when `scans`' entries may not all fit); returns the state root. Raises UserError naming the
    setting and the path."""
    from lora_sweep.training.failures import HEADROOM_BYTES, cache_bytes, check_free_space
    from lora_sweep.training.session import encodes_text_in_step

    check_free_space(space_needs(cfg, Path(output_dir), uri, scans))  # before making any folder: a refusal leaves none
    check_writable(output_dir, "train.output_dir")
    root = check_writable(state_root(cfg), "train.state_dir")
    cache = check_writable(cache_root(cfg), "data.cache_dir")
    store = sqlite_store_folder(uri)
    if store is not None:
        check_writable(store, f"tracking.uri ({uri})")
    items = sum(len(scan.items) for scan in scans)
    entries = cache_bytes(scans, cfg.data, text=not encodes_text_in_step(cfg))
    free = shutil.disk_usage(cache).free
    if free < entries + HEADROOM_BYTES:
        log.warning("data.cache_dir: '%s' has %.1f MiB free, and the cache entries of this dataset's %d images take "
                    "up to %.1f MiB where they are not cached yet: encoding may fill the disk (the run then stops, "
                    "naming the file). Free some space or point data.cache_dir at another disk.",
                    cache, free / 2**20, items, entries / 2**20)
    return root
