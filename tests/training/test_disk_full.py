"""A disk that is full before a run, or fills during it, on a small filesystem the test makes: a tmpfs mounted in a
user namespace (`unshare -rm`), unprivileged, so the same test runs as root and as a user. The job runs inside it as
a real `python sweep.py`."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, new_store, write_image

sys.path.insert(0, str(ROOT / "tests" / "apps" / "faults"))
from fault_hook import FOLDER, fault_overrides  # noqa: E402


def unshare_problem() -> str | None:
    if shutil.which("unshare") is None:
        return "util-linux's unshare is not installed"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"this kernel refuses a user namespace's tmpfs: {done.stderr.strip()}"


pytestmark = [pytest.mark.slow, pytest.mark.skipif(unshare_problem() is not None, reason=str(unshare_problem()))]


def start_on_small_disk(tmp_path: Path, size: str, *argv: str, before: str = ""):
    """Start `python sweep.py` on a tiny model and dataset, with a tmpfs of `size` at `tmp_path / "disk"`; `before`
    runs first in the namespace (shell). Returns what waits for it: (exit status, console, the files on the tmpfs at
    the end: it goes with the namespace)."""
    from lora_sweep.model.loading import tiny_model_dir

    disk = tmp_path / "disk"
    write_image(tmp_path / "ds" / "1_x" / "a.png", caption="a photo")
    disk.mkdir()
    command = [sys.executable, str(ROOT / "sweep.py"), "data=folder", f"data.dir={tmp_path / 'ds'}",
               f"model.path={tiny_model_dir(Path(os.environ['LORA_SWEEP_CACHE_DIR']))}", *argv,
               f"hydra.run.dir={tmp_path / 'run'}"]
    listing = tmp_path / "files_on_disk.txt"
    script = (f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))} && {before} {shlex.join(command)}; "
              f"code=$?; find {shlex.quote(str(disk))} -type f > {shlex.quote(str(listing))}; exit $code")
    env = dict(os.environ, MLFLOW_TRACKING_URI=new_store(tmp_path / "mlflow.db"), PYTHONPATH=str(FOLDER))
    process = subprocess.Popen(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def finish() -> tuple[int, str, list[str]]:
        out = process.communicate(timeout=300)[0]
        return process.returncode, out, listing.read_text().splitlines()

    return finish


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, int, str, list[str]]]:
    """The two runs below, started together (each is one process): name -> (folder, exit status, console, files)."""
    full, filling = tmp_path_factory.mktemp("full_cache"), tmp_path_factory.mktemp("filling")
    fill = f"mkdir {full / 'disk' / 'cache'} && (cat /dev/zero > {full / 'disk' / 'filler'} 2>/dev/null || true) &&"
    started = {
        "full_cache": (full, start_on_small_disk(full, "1m", f"data.cache_dir={full / 'disk' / 'cache'}", before=fill)),
        "filling": (filling, start_on_small_disk(
            filling, "40m", f"data.cache_dir={filling / 'cache'}", f"train.state_dir={filling / 'disk' / 'states'}",
            f"train.output_dir={filling / 'disk' / 'out'}", "train.max_steps=4", "train.save_every=1",
            *fault_overrides({0: f"fill@3:{filling / 'disk'}"}))),
    }
    return {name: (folder, *finish()) for name, (folder, finish) in started.items()}


def test_a_full_cache_disk_is_refused_before_the_model_loads(runs):
    tmp_path, code, out, _ = runs["full_cache"]
    disk = tmp_path / "disk"
    assert code == 2, out[-3000:]
    assert "not enough free disk space: 0.0 MiB free where this training will write at least 0.6 MiB and " \
           f"lora-sweep keeps 16.0 MiB free: train.state_dir '{disk / 'cache' / 'states'}', data.cache_dir " \
           f"'{disk / 'cache'}' (0.6 MiB)." in out  # one image's latents and caption embeddings, at SDXL's sizes
    assert "Pre-flight found 1 problem" in out  # before Hydra's folder or any other is made
    assert "Traceback" not in out and "buckets" not in out  # refused in the set-up: nothing was encoded


def test_a_disk_that_fills_mid_training_fails_the_run_naming_the_file_and_what_was_saved(runs):
    tmp_path, code, out, files = runs["filling"]
    disk = tmp_path / "disk"
    assert code == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    out_dir = disk / "out"
    lora3 = out_dir / 'lora-step00000003.safetensors'
    assert f"OSError: disk full (no space left on device) while writing '{lora3}' " \
           f"(train.output_dir). Now: train.output_dir '{out_dir}' 0.0 MiB free;" in out
    assert f"Saved: '{out_dir / 'lora-step00000001.safetensors'}', '{out_dir / 'lora-step00000002.safetensors'}'. " \
           "The last saved state is kept (" in out
    states = sorted(Path(f).name for f in files if Path(f).name.startswith("state-"))
    assert states[-1] == "state-step00000002.pt" and f"{states[-1]}): the next run of this config resumes" in out
    assert not [f for f in files if f.endswith(".tmp")]  # no half-written file
    assert sorted(Path(f).name for f in files if f.endswith(".safetensors")) == [
        "lora-step00000001.safetensors", "lora-step00000002.safetensors"]
