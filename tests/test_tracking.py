"""The MLflow face: stores MLflow cannot use, model-training experiments, cut params, runs left RUNNING by the dead."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import new_store
from mlflow.tracking import MlflowClient

from lora_sweep.errors import UserError
from lora_sweep.tracking import store
from lora_sweep.tracking.logger import RunLogger
from lora_sweep.tracking.stale import close_stale_runs


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one costs seconds); each test uses its own experiment."""
    return new_store(tmp_path_factory.mktemp("store") / "mlflow.db")


@pytest.mark.parametrize("uri", ["file:///tmp/somewhere/mlruns", "./mlruns", "/abs/mlruns"])
def test_a_file_store_is_one_paragraph_naming_the_uri_and_the_fixes(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError) as err:
        store.client(uri)
    text = str(err.value)
    assert uri in text and "MLFLOW_ALLOW_FILE_STORE=true" in text and "sqlite" in text and "\n" not in text
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store.check_store_uri(uri)  # allowed: MLflow's own opt-out
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "maybe")
    with pytest.raises(UserError, match="MLFLOW_ALLOW_FILE_STORE='maybe'"):
        store.check_store_uri(uri)


def test_other_stores_pass_the_check(store_uri):
    for uri in (store_uri, "http://127.0.0.1:5000", "postgresql://u@h/db"):
        store.check_store_uri(uri)


def test_experiments_are_model_training_ones_and_old_ones_get_tagged(store_uri):
    client = store.client(store_uri)
    new = store.experiment_id(client, "fresh")
    assert client.get_experiment(new).tags[store.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment("old")  # made before lora-sweep tagged experiments
    assert store.experiment_id(client, "old") == old
    assert client.get_experiment(old).tags[store.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(old, store.EXPERIMENT_KIND_TAG, "genai_development")  # a user's own choice stays
    store.experiment_id(client, "old")
    assert client.get_experiment(old).tags[store.EXPERIMENT_KIND_TAG] == "genai_development"
    url = store.runs_page_url("http://127.0.0.1:5000/", new)
    assert url == f"http://127.0.0.1:5000/#/experiments/{new}/runs?workflowType=machine_learning"


def test_long_params_are_cut_with_a_marker_and_named_in_a_tag(store_uri):
    client = store.client(store_uri)
    logger = RunLogger.start(client, store.experiment_id(client, "e"), name="r", tags={})
    logger.log_params({"sampling.prompts": ["a long prompt " * 40] * 20, "noise.offset": 0.05})
    logger.log_params({"noise.offset": 0.07})  # logged already: kept as first logged, no refused batch
    logger.end("FINISHED")
    run = client.get_run(logger.run_id)
    value = run.data.params["sampling.prompts"]
    assert len(value) <= 6000 and value.endswith("the whole value is in the run's config.yaml]")
    assert run.data.tags["lora_sweep.cut_params"] == "sampling.prompts"
    assert run.data.params["noise.offset"] == "0.05"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_runs_left_running_by_a_dead_process_are_marked_killed(store_uri):
    client = MlflowClient(store_uri)
    exp = store.experiment_id(client, "stale")
    mine = store.process_tags()
    alive = client.create_run(exp, run_name="alive", tags=mine).info.run_id
    dead = client.create_run(exp, run_name="dead", tags={**mine, store.PID: str(dead_pid())}).info.run_id
    reused = client.create_run(exp, run_name="pid reused", tags={**mine, store.PID_STARTED: "12.0"}).info.run_id
    elsewhere = client.create_run(exp, run_name="other host", tags={
        **mine, store.HOST: socket.gethostname() + "-elsewhere", store.PID: str(dead_pid())}).info.run_id
    untagged = client.create_run(exp, run_name="older lora-sweep").info.run_id

    closed = close_stale_runs(client, exp, by="a test")
    assert sorted(closed) == sorted([dead, reused])
    for run_id in (dead, reused):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert "ended without closing the run" in run.data.tags[store.FAILURE]
        assert "marked KILLED by a test" in run.data.tags[store.FAILURE]
    for run_id in (alive, elsewhere, untagged):
        assert client.get_run(run_id).info.status == "RUNNING"
    assert store.process_alive(int(mine[store.PID]), float(mine[store.PID_STARTED]))


def test_a_dead_runs_pending_end_is_replayed_not_marked_killed(store_uri, tmp_path, caplog):
    """A run that ended "FINISHED here; MLflow still shows RUNNING until replay" (its process is gone, its pending
    file holds 120 train/loss points and the end): the next run's stale-run check replays it, never KILLED."""
    from mlflow.entities import Metric

    from lora_sweep.tracking.replay import PENDING_NAME, spill

    caplog.set_level("INFO")
    client = MlflowClient(store_uri)
    exp = store.experiment_id(client, "pending end")
    run_id = client.create_run(exp, run_name="train.max_steps=120 train.seed=60", tags={
        **store.process_tags(), store.PID: str(dead_pid())}).info.run_id
    pending = tmp_path / "states" / "0123abcd" / run_id / PENDING_NAME
    metrics = [Metric("train/loss", 1.0 / step, 1000 + step, step) for step in range(1, 121)]
    spill(pending, run_id, store_uri, [("metrics", metrics), ("end", ("FINISHED", None))])

    assert close_stale_runs(client, exp, by="a test", state_root=tmp_path / "states") == []
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and store.FAILURE not in run.data.tags
    assert len(client.get_metric_history(run_id, "train/loss")) == 120
    assert not pending.exists()
    assert "marked KILLED" not in caplog.text


def test_a_dead_runs_pending_end_that_will_not_replay_leaves_it_running_and_names_the_command(store_uri, tmp_path,
                                                                                               caplog):
    from lora_sweep.tracking.replay import PENDING_NAME, spill

    client = MlflowClient(store_uri)
    exp = store.experiment_id(client, "pending end refused")
    run_id = client.create_run(exp, tags={**store.process_tags(), store.PID: str(dead_pid())}).info.run_id
    pending = tmp_path / "0123abcd" / run_id / PENDING_NAME
    spill(pending, run_id, store_uri, [("end", ("FINISHED", None))])
    data = json.loads(pending.read_text())
    data["images"] = [{"file": "image00000.png", "key": "sample_0", "step": 120}]  # its copy is gone
    pending.write_text(json.dumps(data))

    assert close_stale_runs(client, exp, by="a test", state_root=tmp_path) == []
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and store.FAILURE not in run.data.tags and pending.exists()
    assert f"stays RUNNING until `python -m lora_sweep replay {pending}`" in caplog.text


def test_make_ui_prints_the_experiments_runs_page(store_uri):
    from lora_sweep.tracking.ui import experiment_page

    client = MlflowClient(store_uri)
    exp = client.create_experiment("printed")  # untagged: tagged when the UI starts
    url = experiment_page(store_uri, "http://127.0.0.1:5000", "printed")
    assert url == f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert client.get_experiment(exp).tags[store.EXPERIMENT_KIND_TAG] == store.EXPERIMENT_KIND
    assert "no experiment 'nope'" in experiment_page(store_uri, "http://127.0.0.1:5000", "nope")


def _open_store(uri: str, go, errors) -> None:
    go.wait()
    try:
        store.experiment_id(store.client(uri), "lora-sweep")
    except Exception as exc:  # noqa: BLE001  (reported to the test)
        errors.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def test_processes_opening_a_new_sqlite_store_at_once_all_get_it(tmp_path):
    """Two single runs started together on a fresh store: MLflow creates the tables as it opens the database, and
    concurrent creations failed ("duplicate column name: step", "table latest_metrics already exists")."""
    import multiprocessing

    uri, ctx = f"sqlite:///{tmp_path / 'mlflow.db'}", multiprocessing.get_context("fork")
    go, errors = ctx.Event(), ctx.Queue()
    processes = [ctx.Process(target=_open_store, args=(uri, go, errors)) for _ in range(2)]
    for p in processes:
        p.start()
    go.set()  # both open the store at the same moment
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert [errors.get() for _ in range(errors.qsize())] == []
    assert [e.name for e in MlflowClient(uri).search_experiments()] == ["lora-sweep", "Default"]


@pytest.mark.parametrize("value", ["a" * 5999, "a" * 6000, "a" * 6001, "é" * 9000])
def test_fit_cuts_with_a_visible_marker(value):
    from lora_sweep.tracking.store import fit

    out = fit(value, 6000, "config.yaml")
    assert len(out) <= 6000
    if len(value) <= 6000:
        assert out == value
    else:
        assert out.endswith("the whole value is in config.yaml]") and f"{len(value)} characters" in out


def hold_exclusive(db: Path, seconds: float) -> subprocess.Popen:
    """Another process writing to the sqlite store: an exclusive transaction held for `seconds`."""
    code = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); c.execute('BEGIN EXCLUSIVE'); "
            "print('locked', flush=True); time.sleep(float(sys.argv[2])); c.rollback()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_sqlite_store_locked_by_another_process_never_stalls_training_nor_prints_sql(store_uri, caplog, capfd):
    """Another process holds the store locked for 3 s while training logs every 2 steps and a sample grid from a
    folder removed right after (as sampling does): no step waits on it, nor a state's flush, the outage is said within
    a second past stall_s (1 s), nothing of MLflow's SQL reaches the console, and every step and the grid arrive once
    the lock is gone."""
    caplog.set_level("WARNING")
    client = store.client(store_uri)
    logger = RunLogger.start(client, store.experiment_id(client, "locked"), name="locked", tags={}, flush_every=2,
                             stall_s=1.0)
    waits, holder, locked_at = [], None, 0.0
    for step in range(1, 81):
        if step == 5:
            holder = hold_exclusive(Path(store_uri.removeprefix("sqlite:///")), 3.0)
            locked_at = time.time()
        started = time.perf_counter()
        logger.log_metrics({"train/loss": 1.0 / step}, step)
        if step == 6:
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "grid_step000006.png").write_bytes(b"png")
                logger.log_artifact(Path(folder) / "grid_step000006.png", "samples")
        if step == 10:  # a training state is saved
            logger.flush()
        waits.append(time.perf_counter() - started)
        time.sleep(0.03)  # the step's own work
    holder.wait()
    assert logger.end("FINISHED") is None
    assert max(waits) < 1.0, max(waits)
    said = [r.created for r in caplog.records if "unreachable" in r.getMessage()]
    assert said and said[0] - locked_at < 2.5, (said, locked_at)
    assert sorted(m.step for m in client.get_metric_history(logger.run_id, "train/loss")) == list(range(1, 81))
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(logger.run_id, "samples")] == ["samples/grid_step000006.png"]
    printed = capfd.readouterr()
    text = printed.out + printed.err + "\n".join(r.getMessage() for r in caplog.records)
    assert "SQL" not in text.replace("SQLAlchemy", "") and "Traceback" not in text, text


def test_a_store_that_refuses_connections_overflows_the_buffer_into_the_pending_file(store_uri, tmp_path, caplog,
                                                                                     monkeypatch):
    """Nothing listens at the store's address: no call waits, what passes max_held (50 metrics) goes to the
    pending file at once with one line saying so, the rest at the end; replayed, the run has all 122 steps."""
    from cluster_fixtures import free_port

    from lora_sweep.tracking.replay import replay

    caplog.set_level("WARNING")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    good = store.client(store_uri)
    run_id = good.create_run(store.experiment_id(good, "refused")).info.run_id
    pending = tmp_path / "mlflow_pending.json"
    logger = RunLogger(store.client(f"http://127.0.0.1:{free_port()}"), run_id, flush_every=10, pending_file=pending,
                       max_held=50)
    waits = []
    for step in range(1, 123):
        started = time.perf_counter()
        logger.log_metrics({"train/loss": 1.0 / step}, step)
        waits.append(time.perf_counter() - started)
    assert max(waits) < 0.5, max(waits)
    assert "held metrics moved to" in caplog.text
    assert logger.end("FINISHED") == pending
    assert replay(pending, good).metrics == 122
    assert sorted(m.step for m in good.get_metric_history(run_id, "train/loss")) == list(range(1, 123))
    assert good.get_run(run_id).info.status == "FINISHED"


def test_a_resumed_run_names_the_steps_whose_metrics_never_reached_the_store(store_uri, caplog):
    """A process killed while the store lagged took steps 3-4's metrics with it; its state is at step 4, so the
    resumed run trains from 5 on: the gap is said and tagged, not left for a reader to find."""
    from lora_sweep.job.run import _say_history_gap

    client = store.client(store_uri)
    logger = RunLogger.start(client, store.experiment_id(client, "gaps"), name="killed", tags={})
    for step in (1, 2):
        logger.log_metrics({"train/loss": 0.5}, step)
    assert logger.end("KILLED") is None
    reopened = RunLogger.reopen(client, logger.run_id, tags={})
    with caplog.at_level("WARNING"):
        _say_history_gap(reopened, 4)
        _say_history_gap(reopened, 2)  # every step up to the state arrived: nothing to say
    assert reopened.end("FINISHED") is None
    assert [r.getMessage() for r in caplog.records if "has no metrics" in r.getMessage()] == [
        f"MLflow run {logger.run_id} has no metrics for steps 3-4: the process that trained them ended before the "
        "store took them; training resumes after step 4"]
    assert client.get_run(logger.run_id).data.tags["lora_sweep.history_gap"] == "3-4"


@pytest.mark.parametrize(("text", "name", "direction"), [
    ("fit/loss", "fit/loss", "min"), ("img/diversity", "img/diversity", "max"),
    ("img/drift:max", "img/drift", "max"), ("fit/loss:max", "fit/loss", "max"),
])
def test_a_metric_spec_takes_its_direction_from_the_table_or_the_suffix(text, name, direction):
    from lora_sweep.tracking.metric_spec import parse_metric_spec

    spec = parse_metric_spec(text, "compare.select")
    assert (spec.name, spec.direction) == (name, direction)
    assert spec.better(0.5, 1.0) == (direction == "min")
    assert not spec.better(float("nan"), 1.0) and spec.better(1.0, float("nan"))


@pytest.mark.parametrize(("text", "words"), [
    ("img/drift", "img/drift has no default direction; write img/drift:max or img/drift:min"),
    ("fit/loss:lowest", "the direction after ':' must be max or min, not 'lowest'"),
    (":min", "names no metric"),
])
def test_a_bad_metric_spec_names_the_setting_and_the_accepted_forms(text, words):
    from lora_sweep.tracking.metric_spec import parse_metric_spec

    with pytest.raises(ValueError, match="sweep.stop_early.metric") as caught:
        parse_metric_spec(text, "sweep.stop_early.metric")
    assert words in str(caught.value)


def test_a_stop_record_reads_the_rules_tag_and_says_why_in_one_line():
    """`lora_sweep.stopped_early` as the training side writes it; a KILLED run without it was a signal's stop."""
    from lora_sweep.tracking.stopped import STOPPED_EARLY, stop_record
    from lora_sweep.training.stop_early import STOPPED_EARLY_TAG, Decision

    assert STOPPED_EARLY_TAG == STOPPED_EARLY and stop_record({"lora_sweep.failure": "stopped by SIGTERM"}) is None
    median = stop_record({STOPPED_EARLY: Decision(4, "median", "img/clip_i", 0.21, 0.25, [0.3, 0.25, 0.2]).record()})
    assert median.describe() == "at step 4: img/clip_i 0.21 < median 0.25"  # higher is better: below the median
    assert median.peers == 3
    diverged = stop_record({STOPPED_EARLY: Decision(2, "diverged", "fit/loss", float("nan"), 0.6).record()})
    assert diverged.describe() == "at step 2: fit/loss is not finite (limit 0.6)"
    assert diverged.as_dict() == {"step": 2, "rule": "diverged", "metric": "fit/loss", "value": None, "finite": False,
                                  "compared_with": 0.6, "peers": 0,
                                  "why": "at step 2: fit/loss is not finite (limit 0.6)"}
    unreadable = stop_record({STOPPED_EARLY: "not json"})
    assert unreadable.describe() == "at an unrecorded step: its metric ? (unrecorded rule)"
