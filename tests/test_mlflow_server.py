"""The shared `mlflow_server` fixture (tests/cluster_fixtures.py) and lora-sweep's tracking against a server over
HTTP, the store a cluster uses. The server starts once per test session (the Slurm test shares it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest

from lora_sweep.__main__ import main
from lora_sweep.tracking import store
from lora_sweep.tracking.logger import RunLogger
from lora_sweep.tracking.replay import pending_files, replay_quietly


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


def test_what_a_stopped_server_did_not_take_is_replayed_once_by_the_command(stoppable, quick_http, tmp_path,
                                                                          monkeypatch, capsys):
    """Down at the end of the run: `end` returns in seconds with everything in the pending file, end status
    included; `python -m lora_sweep replay` sends it without MLflow's URL lines, and replaying it again sends nothing
    twice."""
    client = store.client(stoppable.uri)
    pending = tmp_path / "states" / "cfg" / "run" / "mlflow_pending.json"
    logger = RunLogger.start(client, store.experiment_id(client, "spilled"), name="spilled", tags={}, flush_every=50,
                             pending_file=pending)
    os.killpg(stoppable.pgid, signal.SIGSTOP)
    for step in range(1, 123):
        logger.log_metrics({"train/loss": 1.0 / step}, step)
    logger.set_tags({"late": "tag"})
    started = time.perf_counter()
    assert logger.end("FINISHED") == pending
    assert time.perf_counter() - started < 5
    os.killpg(stoppable.pgid, signal.SIGCONT)
    data = json.loads(pending.read_text())
    assert data["status"] == "FINISHED" and data["tags"] == {"late": "tag"}
    assert client.get_run(logger.run_id).info.status == "RUNNING"
    copy = tmp_path / "copy" / "mlflow_pending.json"
    copy.parent.mkdir()
    shutil.copy(pending, copy)

    monkeypatch.setenv("LORA_SWEEP_CACHE_DIR", str(tmp_path))
    assert main(["replay"]) == 0  # the default: every pending file under the state root
    printed = capsys.readouterr().out
    assert f"run {logger.run_id}: sent 122 metrics" in printed and "status FINISHED" in printed
    assert "View run" not in printed and "View experiment" not in printed, printed  # MLflow's own URL lines
    assert not pending.exists() and main(["replay"]) == 0 and "nothing to replay" in capsys.readouterr().out
    assert [r.metrics for r in replay_quietly([copy])] == [122]  # as a replay cut short would be rerun
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["late"] == "tag"
    assert sorted(m.step for m in client.get_metric_history(logger.run_id, "train/loss")) == list(range(1, 123))


def test_the_next_run_of_a_config_replays_what_the_last_one_could_not_send(stoppable, quick_http, tmp_path,
                                                                          monkeypatch, caplog):
    """The server stops once the job's run exists: the job trains anyway, its closing line says MLflow still shows
    RUNNING and how to fix that. The next run of the same config, with the server back, first replays the file:
    the run gets every train/loss step and FINISHED, and is then skipped as finished."""
    from conftest import compose_config

    from lora_sweep.job.run import run_job

    caplog.set_level("INFO", logger="lora_sweep")
    monkeypatch.chdir(tmp_path)
    args = ("train.max_steps=4", "train.device=cpu", f"train.state_dir={tmp_path / 'states'}",
            f"tracking.uri={stoppable.uri}", "tracking.experiment=replayed-by-the-next-run")

    def stop_once_the_run_exists():
        while not (tmp_path / "out1" / "config.yaml").exists():
            time.sleep(0.01)
        os.killpg(stoppable.pgid, signal.SIGSTOP)

    stopper = threading.Thread(target=stop_once_the_run_exists, daemon=True)
    stopper.start()
    first = run_job(compose_config(*args), output_dir=tmp_path / "out1")
    stopper.join()
    os.killpg(stoppable.pgid, signal.SIGCONT)
    assert first.status == "FINISHED"
    (pending,) = (tmp_path / "states").rglob("mlflow_pending.json")
    assert f"FINISHED here; MLflow run {first.run_id}" in caplog.text
    assert f"MLflow still shows RUNNING until `python -m lora_sweep replay {pending}`" in caplog.text
    client = store.client(stoppable.uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"

    again = run_job(compose_config(*args), output_dir=tmp_path / "out2")
    assert again.status == "SKIPPED" and again.run_id == first.run_id
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train/loss")) == [1, 2, 3, 4]
    assert client.get_run(first.run_id).info.status == "FINISHED" and not pending.exists()


def test_a_sweeps_parent_run_that_a_stopped_server_did_not_take_is_replayed(stoppable, quick_http, tmp_path):
    """The sweep's end (tags, status) meets a stopped server: one error line, a pending file in the sweep folder,
    and the replay gives the parent its tags and status."""
    from lora_sweep.callbacks import MlflowSweepCallback

    client = store.client(stoppable.uri)
    run_id = client.create_run(store.experiment_id(client, "parent-spilled"), run_name="sweep").info.run_id
    callback = MlflowSweepCallback()
    callback.client, callback.sweep_dir = client, tmp_path
    tags = {"lora_sweep.jobs_total": "2", store.FAILURE: "1 of 2 jobs failed"}
    os.killpg(stoppable.pgid, signal.SIGSTOP)
    started = time.perf_counter()
    assert not callback._end_parent(run_id, tags, {"status": "FAILED", "any_finished": False})
    assert time.perf_counter() - started < 5
    os.killpg(stoppable.pgid, signal.SIGCONT)
    assert [r.status for r in replay_quietly(pending_files(tmp_path))] == ["FAILED"]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and {k: run.data.tags[k] for k in tags} == tags
