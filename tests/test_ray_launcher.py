"""The Ray path (conf/hydra/launcher/ray.yaml, hydra-ray-launcher): the toy sweep on a local Ray with two fake GPUs.

Ray listens on every network interface and writes ~/.ray, so the sweep runs in a private network namespace with
only loopback up (`unshare -n`, needs root or unprivileged user namespaces), with HOME and RAY_TMPDIR in temporary
directories, under a timeout. Without `unshare -n` the test is skipped rather than run exposed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps" / "toy"))
import toy_harness as toy  # noqa: E402

LABELS = ["a", "b", "c", "d"]
TIMEOUT_S = 150
NETNS = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


def _netns_unavailable() -> str | None:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        return "ray / hydra-ray-launcher not installed"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "`unshare` or `ip` missing: cannot isolate Ray's network listeners"
    probe = subprocess.run([*NETNS, "true"], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        return f"`unshare -n` not permitted here ({probe.stderr.strip()}): Ray would listen on real interfaces"
    return None


def _kill_tokened(token: str) -> None:
    for pid, _ in toy.processes_with_token(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _compose_preset(launcher: str):
    """The toy config with the project's conf/ on the search path and `hydra/launcher=<launcher>`, and the launcher
    object Hydra would build from it (no cluster needed to build one)."""
    import warnings

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/", category=UserWarning)  # same-name schema
        with initialize_config_dir(str(toy.APP.parent / "conf"), version_base="1.3"):
            overrides = [f"hydra/launcher={launcher}", f"hydra.searchpath=[file://{toy.ROOT / 'conf'}]",
                         "record_dir=/tmp/unused"]
            cfg = compose("toy", overrides=overrides, return_hydra_config=True)
    return cfg.hydra.launcher, instantiate(cfg.hydra.launcher)


def test_ray_preset_asks_one_gpu_per_job_and_no_retries():
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        pytest.skip("hydra-ray-launcher not installed")
    launcher_cfg, launcher = _compose_preset("ray")
    assert type(launcher).__name__ == "RayLauncher"
    assert launcher_cfg.ray.remote.num_gpus == 1 and launcher_cfg.ray.remote.max_retries == 0
    assert launcher_cfg.ray.init.address == "local" and launcher_cfg.ray.init.include_dashboard is False


def test_slurm_preset_composes_with_one_gpu_per_task_and_bounded_parallelism():
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("hydra-submitit-launcher not installed")
    launcher_cfg, launcher = _compose_preset("submitit_slurm")
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher_cfg.gpus_per_node == 1 and launcher_cfg.tasks_per_node == 1
    assert launcher.params["array_parallelism"] == 4 and launcher.params["submitit_folder"].endswith("/.submitit/%j")


@pytest.mark.slow
def test_ray_runs_the_same_job_function_one_fake_gpu_per_job(tmp_path):
    """Four jobs + one that fails, two fake GPUs: at most two at once on different GPUs, the four finish, the
    failure does not stop them and makes the exit status non-zero."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    (tmp_path / "home").mkdir()
    (tmp_path / "fail").mkdir()
    (tmp_path / "fail" / "e.fail").write_text("raise")
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = toy.sweep_env(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp)
    # The job folders are named by a resolver only the toy's entry point registers: a Ray worker has it from the
    # Hydra singleton state the launcher hands each job (tests/test_job_setup.py checks the same for gpu_queue).
    subdir = "hydra.sweep.subdir='${toy_job_dir:${hydra.job.num},${label}}'"
    command = [*NETNS, *toy.toy_command(
        tmp_path, [*LABELS, "e"], "hydra/launcher=ray", f"hydra.searchpath=[file://{toy.ROOT / 'conf'}]",
        "hydra.launcher.ray.init.num_gpus=2", "hydra.launcher.ray.init.num_cpus=4", subdir)]
    try:
        result = subprocess.run(command, cwd=toy.ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                                start_new_session=True)
        left = toy.no_processes_left(env["GQ_TEST_TOKEN"], timeout=30)
    except subprocess.TimeoutExpired as exc:
        _kill_tokened(env["GQ_TEST_TOKEN"])
        pytest.fail(f"the Ray sweep did not end within {TIMEOUT_S}s: {exc.stdout}\n{exc.stderr}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    output = result.stdout + result.stderr
    assert result.returncode == 1, output  # job e failed; Hydra re-raised it after the batch
    assert "toy job e asked to fail" in result.stderr
    recs = toy.records(tmp_path)
    assert sorted(recs) == LABELS and all(r["result"] == "finished" for r in recs.values()), output
    assert {r["cuda_visible_devices"] for r in recs.values()} <= {"0", "1"}
    spans = {k: (r["entered"], r["returned"]) for k, r in recs.items()}
    assert toy.max_overlap(list(spans.values())) <= 2
    for x in LABELS:
        for y in LABELS:
            if x < y and spans[x][0] < spans[y][1] and spans[y][0] < spans[x][1]:
                assert recs[x]["cuda_visible_devices"] != recs[y]["cuda_visible_devices"], (x, y)
    assert left == [], f"processes left behind: {left}"
    assert sorted(p.name for p in (tmp_path / "multirun").glob("job-*")) == [f"job-{n}-{x}"
                                                                           for n, x in enumerate([*LABELS, "e"])]
