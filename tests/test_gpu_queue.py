"""The gpu_queue launcher: slots, verdicts and rendering as units; then real sweeps of the toy app (tests/apps/toy)
as subprocesses, on two fake GPU slots, with jobs that finish, fail in four ways, get skipped, and get interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps" / "toy"))
import toy_harness as toy  # noqa: E402

from hydra_plugins._job_outcome import JobNotFinished, JobOutcome, to_job_return, verdict  # noqa: E402
from hydra_plugins.gpu_queue_launcher._console import event_line, slot_line, summary  # noqa: E402
from hydra_plugins.gpu_queue_launcher._outcome import Job, JobRecord  # noqa: E402
from hydra_plugins.gpu_queue_launcher._preload import preload  # noqa: E402
from hydra_plugins.gpu_queue_launcher._slots import GpuQueueConfigError, Slot, plan_slots, visible_gpus  # noqa: E402

LABELS = ["a", "b", "c", "d"]


# ---- units -------------------------------------------------------------------------------------------------------

def test_slots_fill_every_gpu_before_doubling_up():
    slots = plan_slots([0, 1], jobs_per_gpu=2, cpu_slots=1)
    assert [(s.index, s.device) for s in slots] == [(0, "0"), (1, "1"), (2, "0"), (3, "1")]
    assert slots[3].env() == {"CUDA_VISIBLE_DEVICES": "1", "GPU_QUEUE_SLOT": "3"}


def test_without_gpus_cpu_slots_hide_every_gpu():
    slots = plan_slots([], jobs_per_gpu=1, cpu_slots=3)
    assert [s.device for s in slots] == [None, None, None]
    assert slots[2].env() == {"CUDA_VISIBLE_DEVICES": "", "GPU_QUEUE_SLOT": "2"}


def test_auto_follows_cuda_visible_devices(monkeypatch):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == ["0"]  # CUDA stops at the first invalid index
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    assert [s.device for s in plan_slots("auto", 1, 1)] == ["GPU-aaaa", "GPU-bbbb"]


@pytest.mark.parametrize("gpus, jobs_per_gpu, field", [(2, 1, "gpus"), ([0, 0], 1, "gpus"), ([0], 0, "jobs_per_gpu")])
def test_bad_slot_settings_name_the_field(gpus, jobs_per_gpu, field):
    with pytest.raises(GpuQueueConfigError, match=f"hydra.launcher.{field}"):
        plan_slots(gpus, jobs_per_gpu, 1)


def test_preload_skips_what_fails_and_reports_it():
    report = preload(["json", "os.path:join", "no_such_module_xyz", "json:no_such_attribute"])
    assert report["loaded"] == ["json", "os.path:join"]
    assert report["failed"]["no_such_module_xyz"].startswith("ModuleNotFoundError")
    assert report["failed"]["json:no_such_attribute"].startswith("AttributeError")
    assert report["cuda_initialized_by"] is None


def _completed(value=None) -> JobReturn:
    ret = JobReturn(status=JobStatus.COMPLETED)
    ret.return_value = value
    return ret


def _failed(exc: BaseException) -> JobReturn:
    ret = JobReturn(status=JobStatus.FAILED)
    ret.return_value = exc
    return ret


NAN = JobOutcome("FAILED", "r2", "loss is NaN at step 4", user_error=True)


@pytest.mark.parametrize("returncode, job_return, status, signals, expected", [
    (0, _completed(), None, 0, ("FINISHED", "", False)),
    (0, _completed("a plain value"), {"state": "running", "run_id": "r0"}, 0, ("FINISHED", "", False)),
    (0, _completed(JobOutcome("FINISHED", "r1", final_loss=0.1)), {}, 0, ("FINISHED", "", False)),
    (0, _completed(JobOutcome("SKIPPED", "r1", "done as run r1")), {}, 0, ("SKIPPED", "done as run r1", False)),
    (0, _failed(JobNotFinished(NAN)), {}, 0, ("FAILED", "loss is NaN at step 4", True)),
    (0, _failed(JobNotFinished(JobOutcome("FAILED", None, "RuntimeError: boom\nTraceback ..."))), {}, 0,
     ("FAILED", "RuntimeError: boom", False)),  # a bug's first line; its traceback is in its log
    (0, _failed(ValueError("bad lr")), {"state": "running"}, 0, ("FAILED", "ValueError: bad lr", False)),
    (0, _failed(JobNotFinished(JobOutcome("KILLED", "r3", "stopped at step 9"))), {}, 1,
     ("KILLED", "stopped at step 9", False)),
    (0, _failed(KeyboardInterrupt()), None, 2, ("KILLED", "stopped on request", False)),
    (-9, None, {"state": "running"}, 0, ("FAILED", "died without a result: killed by SIGKILL (9) (out of memory? "
                                                   "the kernel's OOM killer sends SIGKILL)", False)),
    (3, None, None, 0, ("FAILED", "died without a result: exit code 3", False)),
    (-9, None, {"state": "running"}, 3, ("KILLED", "killed (SIGKILL) after the interrupts", False)),
])
def test_verdict(returncode, job_return, status, signals, expected):
    """The job's own word (returned or raised) decides; without one, how its process ended."""
    ended = verdict(job_return, status, returncode=returncode, signals_sent=signals)
    assert (ended.status, ended.user_error) == (expected[0], expected[2])
    assert ended.reason == expected[1]


def test_the_verdict_names_the_job_and_its_run_from_its_status_file():
    ended = verdict(None, {"state": "running", "label": "v57", "run_id": "r9", "step": 40}, returncode=-9)
    assert (ended.status, ended.label, ended.run_id) == ("FAILED", "v57", "r9")  # the run it left open
    said = verdict(_completed(JobOutcome("FINISHED", "r1", final_loss=0.25)), {"label": "v53", "run_id": "r1"})
    assert (said.label, said.run_id, said.final_loss) == ("v53", "r1", 0.25)


def test_an_outcome_survives_the_trip_to_the_launcher():
    import cloudpickle

    back = cloudpickle.loads(cloudpickle.dumps(_failed(JobNotFinished(NAN, "FAILED: loss is NaN"))))
    assert str(back._return_value) == "FAILED: loss is NaN" and verdict(back).reason == NAN.reason


def _record(tmp_path: Path, state: str, reason: str = "", status: dict | None = None) -> JobRecord:
    job = Job(idx=1, overrides=["experiment=v2"], label="experiment=v2", job_dir=tmp_path, spec_path=tmp_path / "s",
              result_path=tmp_path / "r", status_path=tmp_path / "st", payload=b"")
    return JobRecord(job=job, state=state, slot=Slot(1, "1"), reason=reason, status=status or {},
                     started_at=100.0, ended_at=163.0)


def test_failed_verdict_becomes_a_failed_job_return_with_its_message():
    ret = to_job_return(JobOutcome("FAILED", reason="loss is NaN at step 4"), None, overrides=["x=1"],
                        message="job #1 (v2) FAILED: loss is NaN at step 4")
    assert ret.status == JobStatus.FAILED
    with pytest.raises(RuntimeError, match="v2.*FAILED: loss is NaN"):
        _ = ret.return_value
    skipped = to_job_return(JobOutcome("SKIPPED", "r1", "done"), _completed(JobOutcome("SKIPPED", "r1", "done")),
                            overrides=["x=1"], message="")
    assert skipped.status == JobStatus.COMPLETED and skipped.return_value.run_id == "r1"


def test_summary_and_live_line_show_what_the_job_reported(tmp_path):
    (tmp_path / "console.log").write_text("step 1\nTraceback ...\nRuntimeError: boom\n")
    failed = _record(tmp_path, "FAILED", "RuntimeError: boom", {"label": "v2", "run_id": "abc123"})
    finished = _record(tmp_path, "FINISHED", "", {"label": "v1", "run_id": "def456"})
    finished.final_loss = 0.0912
    text = summary([finished, failed], tail_lines=2)
    assert "variant" in text and "MLflow run" in text and "final loss" in text
    assert "v1" in text and "FINISHED" in text and "1m03s" in text and "0.0912" in text and "def456" in text
    assert "| Traceback ..." in text and "| RuntimeError: boom" in text and "| step 1" not in text
    running = _record(tmp_path, "RUNNING", "", {"label": "v3", "step": 120, "max_steps": 1000, "loss": 0.25,
                                                 "speed": "3.2 it/s"})
    line = slot_line(Slot(0, "0"), running, now=130.0)
    assert line.split() == ["gpu0", "#1", "v3", "step", "120/1000", "loss", "0.25", "3.2", "it/s", "30.0s"]
    assert slot_line(Slot(1, None), None, now=0).split() == ["cpu1", "idle"]


def test_a_job_the_rule_stopped_early_fails_nothing_and_is_named_apart_from_killed(tmp_path):
    """A KILLED job whose outcome carries `stopped_early` (sweep.stop_early) completes for Hydra (the sweep goes on
    to its end) and the console names it STOPPED EARLY with why, apart from a signal's KILLED."""
    why = "at step 400: fit/loss 1.23 > median 1.1"
    stopped = JobOutcome("KILLED", "r7", "stopped early", stopped_early=why)
    ret = to_job_return(stopped, None, overrides=["x=1"], message="")
    assert ret.status == JobStatus.COMPLETED
    killed = to_job_return(JobOutcome("KILLED", "r8", "stopped by SIGTERM"), None, overrides=["x=2"], message="")
    assert killed.status == JobStatus.FAILED
    (tmp_path / "console.log").write_text("")
    early = _record(tmp_path, "KILLED", "stopped early", {"label": "v57"})
    early.stopped_early = why
    done = _record(tmp_path, "FINISHED", "", {"label": "v53"})
    signal_stop = _record(tmp_path, "KILLED", "stopped by SIGTERM", {"label": "v58"})
    text = summary([done, early, signal_stop], tail_lines=2)
    assert "gpu_queue: 3 jobs: 0 running, 0 queued, 1 finished, 1 stopped early, 1 killed" in text
    row = next(line for line in text.splitlines() if "v57" in line)
    assert row.split()[:3] == ["1", "v57", "STOPPED"] and row.rstrip().endswith(why)
    assert event_line(early) == f"[gpu1] STOPPED EARLY #1 v57  1m03s\n    {why}"
    assert early.outcome().stopped_early == why


def test_without_a_terminal_running_jobs_report_progress_every_so_often(tmp_path):
    """A sweep logged to a file (nohup, CI) shows each running job's step, loss and speed, not only its start/end."""
    import io

    from hydra_plugins.gpu_queue_launcher._console import Console

    running = _record(tmp_path, "RUNNING", "", {"label": "v3", "step": 120, "max_steps": 1000, "loss": 0.25,
                                                 "speed": "3.2 it/s"})
    queued = _record(tmp_path, "QUEUED")
    stream = io.StringIO()  # not a terminal: plain mode
    Console(stream, "auto", [Slot(1, "1")], refresh_s=0.5, progress_every_s=1e-9).refresh([running, queued])
    assert stream.getvalue().startswith("[gpu1] #1 v3  step 120/1000  loss 0.25  3.2 it/s")
    quiet = io.StringIO()
    Console(quiet, "auto", [Slot(1, "1")], refresh_s=0.5, progress_every_s=0).refresh([running])
    Console(quiet, "plain", [Slot(1, "1")], refresh_s=0.5, progress_every_s=3600).refresh([running])
    assert quiet.getvalue() == ""  # 0: off; and not before its interval has passed


def test_one_paragraph_per_distinct_reason_and_a_log_tail_only_for_bugs(tmp_path):
    """Three jobs hit by one user error make one paragraph (its whole text, no log tail); a bug gets the first
    line of its reason and the last lines of its log."""
    def record(idx: int, reason: str, user_error: bool) -> JobRecord:
        job_dir = tmp_path / str(idx)
        job_dir.mkdir()
        (job_dir / "console.log").write_text("Traceback (most recent call last):\n  File x\nValueError: boom\n")
        job = Job(idx=idx, overrides=[f"x={idx}"], label=f"x={idx}", job_dir=job_dir, spec_path=tmp_path / "s",
                  result_path=tmp_path / "r", status_path=tmp_path / "st", payload=b"")
        return JobRecord(job=job, state="FAILED", slot=Slot(0, None), reason=reason, user_error=user_error,
                         started_at=1.0, ended_at=2.0)

    user = "Invalid configuration:\n- sampling.every: must be 0 when no prompts are set, got 2."
    records = [record(0, user, True), record(1, user, True), record(2, user, True),
               record(3, "ValueError: boom\nTraceback (most recent call last): ...", False)]
    text = summary(records, tail_lines=3)
    assert text.count("sampling.every: must be 0") == 1  # one paragraph, not one per job
    assert "(1) FAILED, 3 jobs: #0 x=0, #1 x=1, #2 x=2" in text and "(2) FAILED, 1 job: #3 x=3" in text
    assert all(f"log #{i}: {tmp_path / str(i) / 'console.log'}" in text for i in range(4))
    assert text.count("| Traceback") == 1 and "last lines of #3's log" in text  # the bug's frames, once
    assert text.count("see (1) below") == 3 and "see (2) below" in text


def test_labels_of_long_values_stay_short():
    from hydra_plugins.gpu_queue_launcher.launcher import short_label

    label = short_label(["sampling.negative=" + "x" * 2000, "loss.huber_c=0.1"])
    assert label == "sampling.negative=" + "x" * 29 + "... loss.huber_c=0.1"
    assert len(short_label([f"k{i}=v" for i in range(100)])) == 100


def test_a_failed_job_re_raises_compactly_keeping_its_own_exception(tmp_path):
    """What Hydra's sweeper re-raises is a CompactHydraException (its message alone, no "Error executing job"
    block, no second traceback); the job's exception stays available to sweepers."""
    from hydra.errors import CompactHydraException

    own = ValueError("bad lr")
    ret = to_job_return(JobOutcome("FAILED", reason="ValueError: bad lr", user_error=True), _failed(own),
                        overrides=["x=1"], message="job #1 (v2) FAILED: ValueError: bad lr "
                                                   "(1 of 2 jobs did not finish: see the summary above)")
    with pytest.raises(CompactHydraException) as err:
        _ = ret.return_value
    assert str(err.value) == ("job #1 (v2) FAILED: ValueError: bad lr "
                              "(1 of 2 jobs did not finish: see the summary above)")
    assert err.value.job_exception is own and err.value.__cause__ is own and err.value.user_error


# ---- real sweeps ---------------------------------------------------------------------------------------------------

def test_four_jobs_on_two_gpu_slots(tmp_path):
    """At most two at once, the two at once on different GPUs, all four FINISHED; a bad preload entry is skipped."""
    result = toy.run_sweep(tmp_path, LABELS, "hydra.launcher.preload=[json,no_such_module_xyz]",
                           "+hydra.callbacks.locked._target_=toy_callbacks.LockedCallback")
    assert result.returncode == 0, result.stdout + result.stderr
    recs = toy.records(tmp_path)
    assert sorted(recs) == LABELS and all(r["result"] == "finished" for r in recs.values())
    assert {r["cuda_visible_devices"] for r in recs.values()} == {"0", "1"}
    spans = {k: (r["entered"], r["returned"]) for k, r in recs.items()}
    assert toy.max_overlap(list(spans.values())) == 2
    for x in LABELS:
        for y in LABELS:
            if x < y and spans[x][0] < spans[y][1] and spans[y][0] < spans[x][1]:
                assert recs[x]["cuda_visible_devices"] != recs[y]["cuda_visible_devices"], (x, y)
    jobs = toy.summary(tmp_path / "multirun")
    assert {j["state"] for j in jobs.values()} == {"FINISHED"}
    assert "no_such_module_xyz" in result.stdout + result.stderr
    assert "toy a: finished" in Path(jobs["a"]["log"]).read_text()  # the job's stdout went to its log file
    assert jobs["a"]["run_id"].startswith("run-a-") and jobs["a"]["final_loss"] == 0.1  # the outcome it returned
    assert toy.status_files(tmp_path / "multirun")["a"]["step"] == 10
    # The callback holds a lock and cannot be pickled: every job still ran it, from a fresh instance.
    assert "cannot be pickled" in result.stdout + result.stderr
    assert sorted(p.name.split(".")[0] for p in (tmp_path / "callbacks").iterdir()) == LABELS


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory):
    """One sweep in which b raises, c is SIGKILLed (as by the OOM killer) and d reports a NaN loss."""
    record_dir = tmp_path_factory.mktemp("failures")
    (record_dir / "fail").mkdir()
    for label, mode in {"b": "raise", "c": "signal", "d": "nan"}.items():
        (record_dir / "fail" / f"{label}.fail").write_text(mode)
    return record_dir, toy.run_sweep(record_dir, LABELS)


def test_failing_jobs_do_not_stop_the_others(failed_sweep):
    """Each failure is FAILED with its reason, the other job FINISHED, and the sweep exits 1."""
    record_dir, result = failed_sweep
    assert result.returncode == 1
    jobs = toy.summary(record_dir / "multirun")
    assert {k: j["state"] for k, j in jobs.items()} == {"a": "FINISHED", "b": "FAILED", "c": "FAILED", "d": "FAILED"}
    assert jobs["b"]["reason"] == "RuntimeError: toy job b asked to fail at step 5"
    assert "SIGKILL" in jobs["c"]["reason"]
    assert jobs["d"]["reason"] == "loss is NaN at step 5"
    assert "| RuntimeError: toy job b asked to fail" in result.stdout  # the log tail under the summary
    assert "asked to fail" in result.stderr  # Hydra re-raised the first failure after the sweep
    assert "Error executing job" not in result.stderr and result.stderr.count("Traceback") == 0  # no second one
    assert result.stdout.count("Traceback (most recent call last)") == 1  # b's last frames, from its log only


def test_rerun_skips_finished_jobs_and_reruns_the_failed_ones(failed_sweep):
    record_dir, _ = failed_sweep
    for marker in (record_dir / "fail").glob("*.fail"):
        marker.unlink()
    rerun = toy.run_sweep(record_dir, LABELS, f"hydra.sweep.dir={record_dir / 'rerun'}")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    jobs = toy.summary(record_dir / "rerun")
    assert {k: j["state"] for k, j in jobs.items()} == {"a": "SKIPPED", "b": "FINISHED", "c": "FINISHED",
                                                          "d": "FINISHED"}
    assert "already finished" in jobs["a"]["reason"]
    assert "SKIPPED" in rerun.stdout
    # One name per job from "started" to its end (the name its status file gives, not the launcher's `label=a`),
    # and the skip reason whole, in its own paragraph the table points at.
    assert "started #0 a\n" in rerun.stdout and "SKIPPED #0 a " in rerun.stdout and "label=a" not in rerun.stdout
    assert "see (1) below" in rerun.stdout and f"(1) SKIPPED, 1 job:\n    #0 a: {jobs['a']['reason']}" in rerun.stdout


def test_spawn_and_cpu_slots(tmp_path):
    """start_method=spawn (a fresh interpreter per job) on two CPU slots: no GPU visible to any job."""
    result = toy.run_sweep(tmp_path, ["a", "b"], "hydra.launcher.start_method=spawn", "hydra.launcher.gpus=[]",
                           "hydra.launcher.cpu_slots=2")
    assert result.returncode == 0, result.stdout + result.stderr
    recs = toy.records(tmp_path)
    assert [recs[k]["cuda_visible_devices"] for k in "ab"] == ["", ""]
    assert sorted(recs[k]["slot"] for k in "ab") == ["0", "1"]
    assert "cpu0" in result.stdout and "cpu1" in result.stdout


def _start_long_sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, str]:
    env = toy.sweep_env()
    proc = subprocess.Popen(toy.toy_command(tmp_path, LABELS, "sleep_s=60", "steps=600", *overrides), cwd=toy.ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sweep_dir = tmp_path / "multirun"

    def two_running() -> bool:
        states = toy.status_files(sweep_dir) if sweep_dir.exists() else {}
        return len(states) == 2 and all(s.get("step", 0) >= 2 for s in states.values())

    if not toy.wait_until(two_running, timeout=30):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"two jobs never ran: {proc.communicate()[0]}")
    return proc, env["GQ_TEST_TOKEN"]


def test_ctrl_c_stops_running_jobs_cleanly_and_starts_no_more(tmp_path):
    proc, token = _start_long_sweep(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground process group
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 130, output
    jobs = toy.summary(tmp_path / "multirun")
    assert {k: j["state"] for k, j in jobs.items()} == {"a": "KILLED", "b": "KILLED", "c": "CANCELLED",
                                                          "d": "CANCELLED"}
    assert all(jobs[k]["reason"].startswith("stopped at step") for k in "ab")  # each stopped cleanly, and said so
    assert all(jobs[k]["reason"].endswith(" by SIGINT") for k in "ab")
    states = toy.status_files(tmp_path / "multirun")  # the launcher wrote down the jobs that never started
    assert sorted(s["state"] for s in states.values()) == ["cancelled", "cancelled", "killed", "killed"]
    assert "2 killed, 2 cancelled" in output  # the two that never started are not counted as killed
    assert toy.no_processes_left(token) == []


def test_sigterm_to_the_sweep_names_it_and_exits_143(tmp_path):
    proc, token = _start_long_sweep(tmp_path)
    proc.send_signal(signal.SIGTERM)  # a scheduler's stop: to the sweep process alone
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 143, output
    assert "gpu_queue: SIGTERM received: no new jobs" in output and "gpu_queue: interrupted" not in output
    jobs = toy.summary(tmp_path / "multirun")
    assert [jobs[k]["state"] for k in LABELS] == ["KILLED", "KILLED", "CANCELLED", "CANCELLED"]
    assert [jobs[k]["reason"].rpartition(" by ")[2] for k in "ab"] == ["SIGTERM", "SIGTERM"]  # forwarded as is
    assert toy.no_processes_left(token) == []


def test_second_ctrl_c_kills_jobs_that_do_not_stop(tmp_path):
    proc, token = _start_long_sweep(tmp_path, "ignore_sigint=true", "hydra.launcher.kill_grace_s=0.5")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # the jobs ignore the first interrupt, so the sweep waits for them
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 130, output
    jobs = toy.summary(tmp_path / "multirun")
    assert [jobs[k]["state"] for k in LABELS] == ["KILLED", "KILLED", "CANCELLED", "CANCELLED"]
    assert "SIGKILL" in jobs["a"]["reason"]
    assert toy.no_processes_left(token) == []


def test_a_killed_launcher_takes_its_jobs_along(tmp_path):
    """kill -9 of the sweep process: the fork server sees its socket close and kills every job group."""
    proc, token = _start_long_sweep(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert toy.no_processes_left(token) == []
