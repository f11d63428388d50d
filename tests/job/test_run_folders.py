"""A run's or sweep's folder is its own: two processes that start in the same second never share one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, new_store, write_image

from lora_sweep.paths import new_dir


def test_a_taken_folder_gets_the_next_free_suffix(tmp_path):
    first = new_dir(tmp_path / "outputs" / "2026-12-07" / "03-15-20")
    (Path(first) / "lora.safetensors").write_bytes(b"run 1")
    assert first == str(tmp_path / "outputs" / "2026-12-07" / "03-15-20")
    assert new_dir(first) == f"{first}_2" and new_dir(first) == f"{first}_3"
    assert (Path(first) / "lora.safetensors").read_bytes() == b"run 1"


def test_a_folder_left_empty_is_removed_when_the_process_ends(tmp_path):
    """`python sweep.py --cfg hydra --resolve` resolves the run and sweep folders only to print them."""
    code = "import sys; from lora_sweep.paths import new_dir; new_dir(sys.argv[1]); new_dir(sys.argv[2] + '/kept')"
    (tmp_path / "b").mkdir()
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a" / "03-15-20"), str(tmp_path / "b")], check=True,
                   cwd=ROOT)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["b"]


@pytest.mark.slow
def test_two_runs_started_in_the_same_second_write_separate_folders(tmp_path):
    """Two real `python sweep.py` processes at once, each stopped after its set-up by the fault hook. The run folder
    keeps the default's resolver with the date alone, so both start within its unit (the day), as two runs in one
    second do with the default."""
    sys.path.insert(0, str(ROOT / "tests" / "apps" / "faults"))
    from fault_hook import FOLDER, fault_overrides

    write_image(tmp_path / "ds" / "1_x" / "a.png", caption="a")
    runs = []
    for seed in (1, 2):  # a store each: two processes creating one sqlite store race in MLflow's migrations
        env = dict(os.environ, MLFLOW_TRACKING_URI=new_store(tmp_path / f"store{seed}.db"), PYTHONPATH=str(FOLDER))
        runs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "sweep.py"), "data=folder", f"data.dir={tmp_path / 'ds'}",
             f"data.cache_dir={tmp_path / 'cache'}", f"train.seed={seed}", *fault_overrides({0: "setup_error"}),
             "hydra.run.dir='${lora_sweep_new_dir:outputs/${now:%Y-%m-%d}}'"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [2, 2], outs
    folders = sorted(p for p in (tmp_path / "outputs").iterdir())
    assert [p.name[10:] for p in folders] == ["", "_2"]  # <date>, <date>_2
    seeds = sorted((p / ".hydra" / "overrides.yaml").read_text().count("train.seed=1") for p in folders)
    assert seeds == [0, 1]  # one run's overrides in each folder
    for folder in folders:
        assert "set-up failed on purpose" in (folder / "sweep.log").read_text()

