"""The shared `mlflow_server` fixture (tests/cluster_fixtures.py) and lora-sweep's tracking against a server over
HTTP, the store a cluster uses. The server starts once per test session (the Slurm test shares it)."""

from __future__ import annotations

import psutil

from lora_sweep.tracking import store


def test_server_is_http_on_loopback_only(mlflow_server):
    assert mlflow_server.uri.startswith("http://127.0.0.1:")
    group = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == mlflow_server.pgid]
    listeners = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in {p.pid for p in group}]
    assert listeners and all(c.laddr.ip == "127.0.0.1" for c in listeners), listeners


def test_proxied_artifacts_are_not_mistaken_for_a_local_folder(mlflow_server, tmp_path, monkeypatch):
    """The server's experiments keep artifacts at `mlflow-artifacts:/<id>`; the job's pre-flight must not take that
    for a relative folder (not `./mlflow-artifacts:/1` in the working directory)."""
    monkeypatch.chdir(tmp_path)
    client = store.client(store.tracking_uri(mlflow_server.uri))
    exp_id = store.experiment_id(client, "proxied-artifacts")
    assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
    assert store.local_artifact_folder(client, exp_id) is None
    assert list(tmp_path.iterdir()) == []


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
