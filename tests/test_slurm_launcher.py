"""conf/hydra/launcher/submitit_slurm.yaml and hydra_plugins/slurm_sweep_launcher without a cluster: how the
preset's keys become sbatch options, and how each job's outcome is judged and summarised. The real cluster run is
tests/test_slurm_sweep.py."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus

from hydra_plugins._job_outcome import JobFailed, JobNotFinished, JobOutcome
from hydra_plugins.slurm_sweep_launcher._outcome import SlurmJob, finalize, job_return, summary, summary_json

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps" / "toy"))
import toy_harness as toy  # noqa: E402
from conftest import new_store


def _launcher(*overrides: str):
    import warnings

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/", category=UserWarning)
        with initialize_config_dir(str(toy.APP.parent / "conf"), version_base="1.3"):
            overrides = ("hydra/launcher=submitit_slurm", f"hydra.searchpath=[file://{toy.ROOT / 'conf'}]",
                         "record_dir=/tmp/unused", *overrides)
            cfg = compose("toy", overrides=list(overrides), return_hydra_config=True)
    return instantiate(cfg.hydra.launcher)


def test_preset_is_the_plugins_launcher_with_the_plugins_keys():
    launcher = _launcher()
    # By name: Hydra's plugin scan executes plugin modules once more, so class objects are not `is`-comparable.
    lineage = [f"{c.__module__}.{c.__qualname__}" for c in type(launcher).__mro__]
    assert lineage[:2] == ["hydra_plugins.slurm_sweep_launcher.launcher.SlurmLauncher",
                           "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"]
    assert launcher.params["max_num_timeout"] == 0 and launcher.params["signal_delay_s"] == 120


def test_partition_gpus_parallelism_and_time_limit_become_sbatch_options(tmp_path):
    if shutil.which("srun") is None:
        pytest.skip("submitit's Slurm executor needs `srun` on PATH (apt-get install slurm-client)")
    launcher = _launcher("hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                         "hydra.launcher.array_parallelism=3", "hydra.launcher.timeout_min=90",
                         "hydra.launcher.account=lab", "hydra.launcher.constraint=a100",
                         f"hydra.launcher.submitit_folder={tmp_path}/%j",
                         "+hydra.launcher.additional_parameters.mail-type=END")
    executor = launcher._executor()
    script = executor._executor._make_submission_file_text("python -m job", "uid")
    for option in ("--partition=gpu", "--gpus-per-node=2", "--time=90", "--account=lab", "--cpus-per-task=8",
                   "--mem=64GB", "--signal=USR2@120", "--mail-type=END", "--constraint=a100", "--ntasks-per-node=1"):
        assert f"#SBATCH {option}" in script, (option, script)
    assert executor._executor.parameters["array_parallelism"] == 3  # becomes --array=0-(N-1)%3 at submission
    assert executor._executor.max_num_timeout == 0


def _ret(status: JobStatus, value=None) -> JobReturn:
    ret = JobReturn(overrides=["noise=none"])
    ret.status, ret.return_value = status, value
    return ret


NAN = "NonFiniteLoss: train/loss is nan at optimizer step 1"


@pytest.mark.parametrize("job_return, error, status, expected", [
    (_ret(JobStatus.COMPLETED, JobOutcome("FINISHED", "r0", final_loss=0.5)), "", {}, ("FINISHED", "")),
    (_ret(JobStatus.COMPLETED, JobOutcome("SKIPPED", "abc", "finished as run abc")), "", {"state": "skipped"},
     ("SKIPPED", "finished as run abc")),
    (_ret(JobStatus.FAILED, JobNotFinished(JobOutcome("FAILED", "r1", NAN, user_error=True))), "", {}, ("FAILED", NAN)),
    (_ret(JobStatus.FAILED, JobNotFinished(JobOutcome("KILLED", "r2", "stopped by signal"))), "", {"state": "running"},
     ("KILLED", "stopped by signal")),
    (_ret(JobStatus.FAILED, ValueError("bad")), "", {}, ("FAILED", "ValueError: bad")),
    (None, "Slurm job 7_1 ended without a result (squeue: TIMEOUT)", {"state": "running", "step": 40},
     ("FAILED", "Slurm job 7_1 ended without a result (squeue: TIMEOUT) (its last status: running)")),
])
def test_the_verdict_of_a_slurm_job(job_return, error, status, expected):
    job = SlurmJob(0, ["noise=none"], "7_0", job_return=job_return, error=error, status=status)
    finalize(job)
    assert (job.state, job.reason) == expected


def test_a_dead_job_fails_alone_in_the_summary_and_in_hydra(tmp_path):
    err = tmp_path / "7_1_0_log.err"
    err.write_text("step 1\r step 2\nTraceback (most recent call last):\nMemoryError\n")
    finished = JobOutcome("FINISHED", "r0", final_loss=0.4)
    jobs = [
        SlurmJob(0, ["noise=none"], "7_0", job_return=_ret(JobStatus.COMPLETED, finished),
                 status={"state": "running", "label": "v53", "run_id": "r0"}),
        SlurmJob(1, ["noise=offset"], "7_1", log_files=[str(tmp_path / "7_1_0_log.out"), str(err)],
                 error="Slurm job 7_1 ended without a result (squeue: OUT_OF_MEMORY)"),
    ]
    for job in jobs:
        finalize(job)
    text = summary(jobs)
    assert "Slurm sweep: 2 jobs: 1 FAILED, 1 FINISHED" in text
    assert "v53" in text and "r0" in text and "0.4000" in text
    assert "#1 noise=offset FAILED: Slurm job 7_1 ended without a result (squeue: OUT_OF_MEMORY)" in text
    assert f"log: {err}" in text and "| MemoryError" in text
    returns = [job_return(job) for job in jobs]
    assert returns[0].status == JobStatus.COMPLETED and returns[0].return_value == finished
    assert returns[1].status == JobStatus.FAILED and isinstance(returns[1]._return_value, JobFailed)
    assert str(returns[1]._return_value) == ("job #1 (noise=offset, Slurm job 7_1) FAILED: Slurm job 7_1 ended "
                                             "without a result (squeue: OUT_OF_MEMORY)")
    assert '"state": "FAILED"' in summary_json(jobs) and '"final_loss": 0.4' in summary_json(jobs)


def test_a_job_the_rule_stopped_early_completes_and_is_named_so(tmp_path):
    """A job sweep.stop_early stopped raises JobNotFinished(KILLED, stopped_early=why): it fails nothing, and the
    summary says STOPPED EARLY with why, not KILLED with a log tail."""
    why = "at step 2: fit/loss nan > limit 0.6"
    outcome = JobOutcome("KILLED", "r5", "stopped early", label="v57", stopped_early=why)
    job = SlurmJob(0, ["noise=none"], "7_0", job_return=_ret(JobStatus.FAILED, JobNotFinished(outcome)))
    finalize(job)
    text = summary([job])
    assert "Slurm sweep: 1 jobs: 1 STOPPED EARLY" in text and text.rstrip().endswith(why)
    assert "v57 KILLED" not in text and job_return(job).status == JobStatus.COMPLETED
    assert f'"stopped_early": "{why}"' in summary_json([job])


def test_the_sweep_warns_when_the_tracking_store_is_not_a_server(monkeypatch, caplog):
    from omegaconf import OmegaConf

    from hydra_plugins.slurm_sweep_launcher.launcher import _warn_if_not_a_server

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _warn_if_not_a_server(OmegaConf.create({"tracking": {"uri": "sqlite:////shared/mlflow.db"}}))
    assert "not a server" in caplog.text and "sqlite:////shared/mlflow.db" in caplog.text
    caplog.clear()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-host:5000")
    _warn_if_not_a_server(OmegaConf.create({"tracking": {"uri": None}}))
    assert caplog.text == ""


def _task(i: int):
    """Array task i on the node: 0 returns like Hydra's run_job, 1 is killed (no result, as after an OOM kill)."""
    import os
    import signal

    from hydra.core.utils import JobReturn, JobStatus

    if i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    ret = JobReturn(overrides=[f"i={i}"])
    ret.status, ret.return_value = JobStatus.COMPLETED, i
    return ret


@pytest.mark.slow
def test_a_job_killed_on_a_cluster_without_accounting_fails_alone(slurm_cluster, tmp_path, monkeypatch):
    """A real array of two: the killed task leaves no result and sacct cannot say so; the launcher still ends,
    with the other task's result and the killed one FAILED with Slurm's state (stock: waits forever)."""
    import cloudpickle
    import submitit

    from hydra_plugins.slurm_sweep_launcher import launcher as module

    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.setattr(module, "NO_RESULT_GRACE_S", 2.0)
    monkeypatch.setattr(module, "SQUEUE_EVERY_S", 1.0)
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1, slurm_array_parallelism=2)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the node cannot import this test module
    try:
        jobs = executor.map_array(_task, [0, 1])
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    launcher = module.SlurmLauncher.__new__(module.SlurmLauncher)  # no sweep folder: no status files
    judged = launcher._wait_all(jobs, [["i=0"], ["i=1"]], 0)
    assert [j.state for j in judged] == ["FINISHED", "FAILED"]
    assert judged[0].job_return.return_value == 0
    assert re.fullmatch(r"Slurm job \d+_1 ended without a result \(squeue: FAILED\)", judged[1].reason)


@pytest.mark.slow
def test_a_sweep_slurm_cannot_take_ends_in_one_paragraph_naming_sbatchs_error(tmp_path):
    """sbatch with no controller to ask (SLURM_CONF: an empty file, as on a login node without Slurm's
    configuration): one paragraph with sbatch's own words, exit 1, no traceback; the parent run says no job ran."""
    import os
    import subprocess

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        pytest.skip("needs Slurm's client commands (apt-get install slurm-client)")
    (tmp_path / "slurm.conf").write_text("")
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf"), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": new_store(tmp_path / "mlflow.db")}
    out = subprocess.run([sys.executable, str(toy.ROOT / "sweep.py"), "-m", "noise=none", "train.max_steps=1",
                          "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "Traceback" not in text and "FailedJobError" not in text
    (paragraph,) = [line for line in text.splitlines() if line.startswith("Slurm did not accept")]
    assert "job array of 1 job: sbatch exited with status 1: " in paragraph
    assert "Unable to process configuration file" in paragraph and text.count("Unable to process") == 1
    assert f"SLURM_CONF={tmp_path / 'slurm.conf'} names" in paragraph and "partition=gpu" in paragraph
    assert "ended FAILED (no job ran)" in text


def test_sbatch_that_cannot_be_run_is_named_too():
    from hydra_plugins.slurm_sweep_launcher.launcher import submit_error

    text = submit_error(FileNotFoundError(2, "No such file or directory", "sbatch"), 3, {"partition": None}, "/s")
    assert text.startswith("Slurm did not accept the sweep's job array of 3 jobs: sbatch could not be run "
                           "([Errno 2] No such file or directory: 'sbatch').")
    assert "none beyond the defaults" in text and "under /s." in text
