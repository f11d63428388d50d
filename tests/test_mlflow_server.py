"""The shared `mlflow_server` fixture (tests/cluster_fixtures.py) and lora-sweep's tracking against a server over
HTTP, the store a cluster uses. The server starts once per test session (the Slurm test shares it)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from lora_sweep.tracking import store
from lora_sweep.tracking.logger import RunLogger


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


@pytest.fixture
def stoppable(mlflow_server):
    """The shared server, which a test may stop (SIGSTOP: connections open, nothing answers, as a hung or dying
    server) and continue (SIGCONT); continued after the test whatever happens."""
    yield mlflow_server
    os.killpg(mlflow_server.pgid, signal.SIGCONT)


@pytest.fixture
def quick_http(monkeypatch):
    """MLflow's HTTP client gives up after 1 s, so a stopped server costs the tests seconds, not minutes."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_a_server_stopped_mid_run_never_stalls_training_and_gets_every_step_when_back(stoppable, quick_http,
                                                                                    tmp_path, caplog):
    """The server stops at step 20 and answers again at step 60: no step waits on it, the console has one line
    for each change and no MLflow retry line, and all 122 steps and the end status arrive."""
    caplog.set_level("WARNING")
    client = store.client(stoppable.uri)
    logger = RunLogger.start(client, store.experiment_id(client, "outage"), name="outage", tags={}, flush_every=5,
                             pending_file=tmp_path / "mlflow_pending.json", retry_s=0.5)
    waits = []
    for step in range(1, 123):
        if step == 20:
            os.killpg(stoppable.pgid, signal.SIGSTOP)
        if step == 60:
            os.killpg(stoppable.pgid, signal.SIGCONT)
        started = time.perf_counter()
        logger.log_metrics({"train/loss": 1.0 / step}, step)
        if step % 40 == 0:
            logger.flush()  # as before each training state
        waits.append(time.perf_counter() - started)
        time.sleep(0.03)  # the step's own work
    assert logger.end("FINISHED") is None
    assert max(waits) < 1.2, max(waits)
    history = client.get_metric_history(logger.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 123))
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in line for line in lines) == 1 and sum("reachable again" in line for line in lines) == 1
    assert not any("Retrying" in line for line in lines), lines

