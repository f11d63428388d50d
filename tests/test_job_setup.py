"""Importing lora_sweep changes nothing; `lora_sweep.setup()` sets a process up, called by each entry point and by
`sweep.main`, the task function a launcher's job process runs. A job process resolves its folder before that call,
with the resolvers Hydra's singleton state brings from the sweep process (every launcher hands it to its jobs): the
toy app's folder name needs a resolver only its entry point registers (tests/apps/toy/toy_setup.py). The Ray path is
checked the same way by tests/test_ray_launcher.py, the Slurm path by tests/test_slurm_sweep.py's real sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_config

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps" / "toy"))
import toy_harness as toy  # noqa: E402

TOY_SUBDIR = "hydra.sweep.subdir='${toy_job_dir:${hydra.job.num},${label}}'"

PROCESS_STATE = """
import json, logging, warnings
from omegaconf import OmegaConf

def state():
    loggers = ["", "py.warnings", "transformers.utils.import_utils", "bitsandbytes.backends.cpu.ops"]
    return {"resolvers": [OmegaConf.has_resolver(n) for n in ("lora_sweep_job_dir", "lora_sweep_project")],
            "showwarning": warnings.showwarning.__qualname__,
            "filters": [len(logging.getLogger(n).filters) for n in loggers]}

before = state()
import lora_sweep, lora_sweep.paths, lora_sweep.job.names, lora_sweep.job.run, lora_sweep.checks.preflight
imported = state()
lora_sweep.setup()
lora_sweep.setup()
print(json.dumps([before, imported, state()]))
"""


def test_importing_lora_sweep_leaves_the_process_as_it_was_and_setup_is_idempotent():
    out = subprocess.run([sys.executable, "-c", PROCESS_STATE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    before, imported, set_up = json.loads(out.stdout.strip().splitlines()[-1])
    assert imported == before and before["resolvers"] == [False, False]
    assert set_up["resolvers"] == [True, True] and set_up["showwarning"] == "_log_python_warning"
    assert set_up["filters"] == [*before["filters"][:2], 1, 1]  # one filter each, though set up twice


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_queued_job_resolves_its_folder_with_the_resolvers_of_the_sweep_process(tmp_path, method):
    result = toy.run_sweep(tmp_path, ["a", "b"], TOY_SUBDIR, f"hydra.launcher.start_method={method}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "multirun").glob("job-*")) == ["job-0-a", "job-1-b"]
    assert {r["result"] for r in toy.records(tmp_path).values()} == {"finished"}


def test_the_task_function_sets_its_process_up_before_the_job(tmp_path, monkeypatch):
    """`sweep.main` is what a job process runs (it never runs sweep.py's start): it calls setup() first."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import lora_sweep
    import sweep
    from lora_sweep.config import register_configs

    calls = []
    monkeypatch.setattr(lora_sweep, "setup", lambda: calls.append("setup"))

    def run_job(cfg, **kwargs):
        calls.append("run_job")
        raise RuntimeError("stop here")

    monkeypatch.setattr("lora_sweep.job.run.run_job", run_job)
    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        job = compose("config", overrides=[f"train.output_dir={tmp_path}"], return_hydra_config=True)
    with open_dict(job):
        job.hydra.mode, job.hydra.job.num = "RUN", 0
        job.hydra.runtime.cwd = job.hydra.runtime.output_dir = str(tmp_path)
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            sweep.main.__wrapped__(compose_config(f"train.output_dir={tmp_path}"))
    finally:
        HydraConfig.instance().cfg = saved
    assert calls == ["setup", "run_job"]
