"""The sweep's parent run ends saying what happened to every job (real sqlite store, the status files that jobs
without a run of their own and their launchers leave)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import new_store
from mlflow.tracking import MlflowClient

from hydra_plugins._job_outcome import status_path, write_status
from lora_sweep.callbacks import jobs_line, sweep_summary
from lora_sweep.tracking.stopped import STOPPED_EARLY
from lora_sweep.tracking.store import (
    FAILURE,
    JOB_RUNS_TAG,
    MAX_TAG_CHARS,
    ROLE,
    experiment_id,
    job_runs_tags,
    read_job_runs,
)


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> MlflowClient:
    return MlflowClient(new_store(tmp_path_factory.mktemp("store") / "mlflow.db"))


def make_sweep(client: MlflowClient, tmp_path: Path, name: str) -> tuple[str, str]:
    exp = experiment_id(client, name)
    parent = client.create_run(exp, run_name="sweep", tags={ROLE: "sweep"}).info.run_id
    return exp, parent


def child(client: MlflowClient, exp: str, parent: str, name: str, status: str | None, num: int | None = None,
          reason: str = "") -> str:
    """A job's run under the sweep's parent, as the job leaves it: tagged with its job number, ended (or not)."""
    tags = {"mlflow.parentRunId": parent, **({"lora_sweep.job_num": str(num)} if num is not None else {})}
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    if reason:
        client.set_tag(run_id, FAILURE, reason)
    if status:
        client.set_terminated(run_id, status=status)
    return run_id


def status_file(sweep_dir: Path, num: int, **written) -> None:
    """A job's status file as it is left: live progress, an end the job wrote, or a verdict its launcher wrote."""
    write_status(status_path(sweep_dir, num), {"label": f"j{num}", **written})


def test_failed_jobs_fail_the_parent_and_every_job_is_counted(client, tmp_path):
    exp, parent = make_sweep(client, tmp_path, "mixed")
    done = child(client, exp, parent, "j0", "FINISHED", 0)
    early = child(client, exp, parent, "j1", "FAILED", 1, "loss.huber_c: must be > 0")  # a run made for the reason
    orphan = child(client, exp, parent, "j3", None, 3)  # its process was SIGKILLed: still RUNNING
    status_file(tmp_path, 0, state="running", run_id=done, step=3)
    status_file(tmp_path, 1, state="running", run_id=early)
    status_file(tmp_path, 2, state="skipped", run_id=done, reason="already FINISHED")  # matched job 0's run
    status_file(tmp_path, 3, state="failed", run_id=orphan, reason="died without a result: killed by SIGKILL (9)")
    status_file(tmp_path, 4, state="failed", reason="could not start: OSError: disk full")  # by its launcher

    summary = sweep_summary(client, parent, tmp_path, ended_normally=False)  # Hydra re-raised: no on_multirun_end
    assert summary["status"] == "FAILED"
    assert summary["counts"] == {"total": 5, "finished": 1, "failed": 3, "skipped": 1, "killed": 0, "cancelled": 0,
                                 "stopped_early": 0}
    assert summary["job_runs"] == {0: done, 1: early, 2: done, 3: orphan}  # job 2 skipped: the run it matched
    run = client.get_run(orphan)
    assert run.info.status == "FAILED" and "SIGKILL" in run.data.tags[FAILURE]
    text = summary["failure"]
    assert text.startswith("3 of 5 jobs failed:")
    assert "- loss.huber_c: must be > 0 (#1 j1)" in text and "(#3 j3)" in text and "disk full (#4 j4)" in text
    assert summary["any_finished"]


def test_a_stopped_sweep_ends_killed_and_closes_what_its_jobs_left_running(client, tmp_path):
    exp, parent = make_sweep(client, tmp_path, "stopped")
    stopped = child(client, exp, parent, "j0", "KILLED", 0, "stopped by signal")
    orphan = child(client, exp, parent, "j1", None, 1)
    status_file(tmp_path, 0, state="running", run_id=stopped)
    status_file(tmp_path, 1, state="killed", run_id=orphan, reason="killed (SIGKILL) after the interrupts")
    status_file(tmp_path, 2, state="cancelled", reason="not started: the sweep was interrupted")
    summary = sweep_summary(client, parent, tmp_path, ended_normally=False)
    # job 2 never started: cancelled, not killed (the parent once said "3 killed of 3 jobs")
    assert summary["status"] == "KILLED" and summary["counts"]["killed"] == 2 and summary["counts"]["cancelled"] == 1
    run = client.get_run(orphan)
    assert run.info.status == "KILLED" and run.data.tags[FAILURE] == "killed (SIGKILL) after the interrupts"
    assert summary["failure"].startswith("the sweep was stopped")


def test_jobs_the_rule_stopped_early_finish_the_sweep_and_are_counted_apart_from_killed_and_failed(client, tmp_path):
    """A run sweep.stop_early stopped ends KILLED with its `lora_sweep.stopped_early` tag: the sweep still ends
    FINISHED, and the counts and the closing line say which runs the rule stopped, when and why."""
    exp, parent = make_sweep(client, tmp_path, "stop_early")
    for num in (0, 1):
        child(client, exp, parent, f"v5{num}", "FINISHED", num)
    stopped = child(client, exp, parent, "v57", None, 2)
    client.set_tag(stopped, STOPPED_EARLY, '{"step": 400, "rule": "median", "metric": "fit/loss", "value": 1.234, '
                                           '"compared_with": 1.1, "peers": 2}')
    client.set_terminated(stopped, status="KILLED")
    summary = sweep_summary(client, parent, tmp_path, ended_normally=True)
    assert summary["status"] == "FINISHED" and summary["failure"] == ""
    assert summary["counts"] == {"total": 3, "finished": 2, "stopped_early": 1, "failed": 0, "skipped": 0,
                                 "killed": 0, "cancelled": 0}
    assert summary["stopped_early"] == [{"job": 2, "label": "v57", "run_id": stopped,
                                         "why": "at step 400: fit/loss 1.234 > median 1.1"}]
    assert jobs_line(summary) == "3 jobs: 2 finished, 1 stopped early (v57 at step 400: fit/loss 1.234 > median 1.1)"
    child(client, exp, parent, "v58", "FAILED", 3, "NonFiniteLoss: train/loss is nan")
    child(client, exp, parent, "v59", "KILLED", 4, "stopped by SIGTERM")  # a signal's stop: no tag
    summary = sweep_summary(client, parent, tmp_path, ended_normally=True)
    assert summary["status"] == "KILLED" and summary["failure"].startswith("the sweep was stopped")
    assert jobs_line(summary) == ("5 jobs: 2 finished, 1 stopped early (v57 at step 400: fit/loss 1.234 > median "
                                  "1.1), 1 failed, 1 killed")


def test_clean_sweeps_finish_and_a_sweep_that_broke_off_does_not(client, tmp_path):
    exp, parent = make_sweep(client, tmp_path, "clean")
    run_id = child(client, exp, parent, "j0", "FINISHED", 0)
    status_file(tmp_path, 0, state="running", run_id=run_id)
    summary = sweep_summary(client, parent, tmp_path, ended_normally=True)
    assert summary["status"] == "FINISHED" and summary["failure"] == ""
    assert summary["counts"] == {"total": 1, "finished": 1, "failed": 0, "skipped": 0, "killed": 0, "cancelled": 0,
                                 "stopped_early": 0}
    broke = sweep_summary(client, parent, tmp_path, ended_normally=False)  # e.g. the launcher itself raised
    assert broke["status"] == "FAILED" and "before its launcher returned" in broke["failure"]


def test_without_status_files_or_job_numbers_the_child_runs_still_count(client, tmp_path):
    """Runs without a job number, no status file: the children's own statuses are what is known."""
    exp, parent = make_sweep(client, tmp_path, "bare")
    child(client, exp, parent, "a", "FINISHED")
    child(client, exp, parent, "b", "FAILED", reason="NonFiniteLoss: train/loss is nan")
    orphan = child(client, exp, parent, "c", None)
    summary = sweep_summary(client, parent, tmp_path, ended_normally=False)
    assert summary["status"] == "FAILED" and summary["counts"]["failed"] == 2 and summary["counts"]["total"] == 3
    assert "NonFiniteLoss: train/loss is nan" in summary["failure"]
    assert client.get_run(orphan).data.tags[FAILURE].startswith("its job process ended without closing the run")


def test_a_job_that_ended_without_a_word_counts_as_failed(client, tmp_path):
    """A status file still "running" and no run: its process ended before it could record anything (under Ray, no
    launcher writes a verdict for it)."""
    exp, parent = make_sweep(client, tmp_path, "silent")
    child(client, exp, parent, "j0", "FINISHED", 0)
    status_file(tmp_path, 1, state="running")
    summary = sweep_summary(client, parent, tmp_path, ended_normally=True)
    assert summary["counts"] == {"total": 2, "finished": 1, "failed": 1, "skipped": 0, "killed": 0, "cancelled": 0,
                                 "stopped_early": 0}
    assert "its job process ended without a result (#1 j1)" in summary["failure"]


def test_a_sweep_whose_jobs_were_all_skipped_still_has_results(client, tmp_path):
    """A rerun: no child run, yet the FINISHED runs its jobs matched are its results (the report is written)."""
    exp, earlier = make_sweep(client, tmp_path, "rerun")
    done = [child(client, exp, earlier, f"j{i}", "FINISHED") for i in range(2)]
    _, parent = make_sweep(client, tmp_path, "rerun")
    for i, run_id in enumerate(done):
        status_file(tmp_path, i, state="skipped", run_id=run_id, reason="already FINISHED")
    summary = sweep_summary(client, parent, tmp_path, ended_normally=True)
    assert summary["status"] == "FINISHED" and summary["any_finished"] and summary["counts"]["skipped"] == 2
    assert read_job_runs(job_runs_tags(summary["job_runs"])) == {0: done[0], 1: done[1]}


def test_job_runs_tags_stay_within_mlflows_limit_and_read_back_whole():
    runs = {i: f"{i:032x}" for i in range(600)}  # ~22,000 characters: three tags
    tags = job_runs_tags(runs)
    assert len(tags) == 3 and all(len(v) <= MAX_TAG_CHARS for v in tags.values())
    assert tags[JOB_RUNS_TAG].startswith(f"0={runs[0]} 1={runs[1]}")
    assert read_job_runs({**tags, "other": "x"}) == runs
    assert job_runs_tags({}) == {} and read_job_runs({}) == {}


def test_compare_takes_the_newest_sweep_with_runs_including_the_ones_its_skipped_jobs_matched(client, tmp_path):
    """`compare` without --sweep: a newer sweep that ran no job (refused by sbatch, stopped at once) is passed over;
    a rerun whose jobs were all skipped shows the runs they matched, in its own job order."""
    import time

    from lora_sweep.compare.runs import find_runs

    exp, first = make_sweep(client, tmp_path, "select")
    runs = [child(client, exp, first, f"j{i}", "FINISHED") for i in range(2)]
    time.sleep(0.01)
    _, empty = make_sweep(client, tmp_path, "select")
    assert find_runs(client, experiment="select", sweep_run_id=None)[0].info.run_id == first
    time.sleep(0.01)
    _, rerun = make_sweep(client, tmp_path, "select")
    for key, value in job_runs_tags({0: runs[1], 1: runs[0]}).items():  # its job 0 matched j1
        client.set_tag(rerun, key, value)
    parent, found = find_runs(client, experiment="select", sweep_run_id=None)
    assert parent.info.run_id == rerun and {r.info.run_id for r in found} == set(runs)
    assert {r.info.run_id: r.data.tags["lora_sweep.job_num"] for r in found} == {runs[1]: "0", runs[0]: "1"}
