"""`python -m lora_sweep cache [clean [--states]]`: what the cache root holds, honestly, and what a clean removes."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import new_store

from lora_sweep.__main__ import main
from lora_sweep.data.cache import TensorCache


def filled_root(root: Path) -> Path:
    """A cache root as runs leave it: 2 latent + 1 text entries (and their digests), a training state of one run,
    the tiny model, the bundled photos, and a file lora-sweep did not write."""
    store = TensorCache(root)
    for i in range(2):
        store.get_or_compute("latents", f"{i:064x}", lambda: {"latents": torch.zeros(4, 8, 8)})
    store.get_or_compute("text", "f" * 64, lambda: {"context": torch.zeros(77, 64)})
    store.file_sha256(Path(__file__))  # a digest in .hashes/
    run = root / "states" / "0123456789abcdef" / "run1"
    run.mkdir(parents=True)
    (run / "state-step00000002.pt").write_bytes(b"s" * 3 * 2**20)
    (run.parent / ".lock").write_text("")
    (root / "models" / "tiny-sdxl-v1-seed0" / "unet").mkdir(parents=True)
    (root / "models" / "tiny-sdxl-v1-seed0" / "unet" / "w.safetensors").write_bytes(b"m" * 2**20)
    (root / "datasets" / "photos-v1" / "5_photo").mkdir(parents=True)
    (root / "datasets" / "photos-v1" / "5_photo" / "a.png").write_bytes(b"p" * 2**19)
    (root / "notes.txt").write_text("mine")
    return root


def test_info_counts_every_kind_with_its_size(tmp_path, capsys):
    root = filled_root(tmp_path / "cache")
    assert main(["cache", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cache at {root}: 4.5 MiB in all")
    assert "  latents: 2 latent entries, 0.0 MiB" in out and "  text: 1 text-encoder entry, 0.0 MiB" in out
    assert "  training states: 1 state of 1 run, 3.0 MiB (a stopped run resumes from them: `cache clean` keeps" in out
    assert "  built models: 1 (tiny-sdxl-v1-seed0), 1.0 MiB" in out
    assert f"\n    {root / 'models' / 'tiny-sdxl-v1-seed0'}\n" in out  # the folder load_lora_weights' pipe loads
    assert "  bundled datasets: 1 (photos-v1), 0.5" in out
    assert "  other files and folders: 1 item, 0.0 MiB (not written by lora-sweep: never removed)" in out


def test_clean_keeps_the_states_unless_asked_and_says_what_it_removed(tmp_path, capsys):
    root = filled_root(tmp_path / "cache")
    assert main(["cache", "clean", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cache at {root}: removed 1.5 MiB:")
    assert "  removed latents: 2 latent entries" in out and "  removed built models: 1 (tiny-sdxl-v1-seed0)" in out
    assert "  kept training states: 1 state of 1 run, 3.0 MiB" in out and "  kept other files" in out
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "states"]
    assert (root / "states" / "0123456789abcdef" / "run1" / "state-step00000002.pt").is_file()
    assert main(["cache", "clean", "--states", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "  removed training states: 1 state of 1 run, 3.0 MiB" in out
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]


def test_a_root_that_does_not_exist_is_said_so_and_nothing_claimed(tmp_path, capsys):
    missing = tmp_path / "nonexist_cache"
    assert main(["cache", "clean", "--dir", str(missing)]) == 0
    out = capsys.readouterr().out
    assert out == (f"cache at {missing}: the folder does not exist, so nothing is cached there and nothing was "
                   "removed.\n")
    assert "removed the cache" not in out and not missing.exists()


def test_clean_finished_states_removes_only_the_states_of_runs_the_store_finished(tmp_path, capsys):
    """Finished runs' final states pile up (one per run); a stopped run's state is what it resumes from."""
    from mlflow.tracking import MlflowClient

    uri = new_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    done, stopped = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    client.set_terminated(done, "FINISHED")
    client.set_terminated(stopped, "KILLED")
    root = tmp_path / "cache"
    for run_id, config_hash in ((done, "0" * 16), (stopped, "1" * 16), ("elsewhere", "1" * 16)):
        folder = root / "states" / config_hash / run_id
        folder.mkdir(parents=True)
        (folder / "state-step00000004.pt").write_bytes(b"s" * 2**20)
    assert main(["cache", "clean", "--finished-states", "--tracking-uri", uri, "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert out == (f"cache at {root}: removed the training states of 1 finished run in {uri}, 1.0 MiB; kept those of "
                   "unfinished runs (they resume from them) and of 1 run this store does not know.\n")
    assert sorted(p.relative_to(root / "states").as_posix() for p in (root / "states").glob("*/*")) == sorted([
        f"{'1' * 16}/elsewhere", f"{'1' * 16}/{stopped}"])
    assert main(["cache", "--finished-states", "--dir", str(root)]) == 2  # info has nothing to remove


def test_clean_finished_states_keeps_the_state_of_a_run_stopped_early(tmp_path, capsys):
    """A run sweep.stop_early stopped is KILLED with its tag: unfinished, so its state (what a rerun with the rule
    off resumes from) stays."""
    import json

    from mlflow.tracking import MlflowClient

    from lora_sweep.tracking.stopped import STOPPED_EARLY

    uri = new_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    done, early = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    client.set_terminated(done, "FINISHED")
    client.set_tag(early, STOPPED_EARLY, json.dumps({"step": 4, "rule": "median", "metric": "fit/loss", "value": 1.3,
                                                     "compared_with": 1.1, "peers": 2}))
    client.set_terminated(early, "KILLED")
    root = tmp_path / "cache"
    for run_id in (done, early):
        folder = root / "states" / ("2" * 16) / run_id
        folder.mkdir(parents=True)
        (folder / "state-step00000004.pt").write_bytes(b"s" * 2**20)
    assert main(["cache", "clean", "--finished-states", "--tracking-uri", uri, "--dir", str(root)]) == 0
    assert capsys.readouterr().out == (f"cache at {root}: removed the training states of 1 finished run in {uri}, "
                                       "1.0 MiB; kept those of unfinished runs (they resume from them).\n")
    assert [p.name for p in (root / "states" / ("2" * 16)).iterdir()] == [early]
    assert (root / "states" / ("2" * 16) / early / "state-step00000004.pt").is_file()


def test_clean_finished_states_against_a_store_that_cannot_answer_is_refused_at_once(tmp_path, capsys):
    """A server that refuses connections would keep MLflow retrying for minutes; a sqlite path with no file would
    be created empty and 'know' no finished run."""
    root = tmp_path / "cache"
    (root / "states" / ("0" * 16) / "run1").mkdir(parents=True)
    for uri in ("http://127.0.0.1:9", f"sqlite:///{tmp_path / 'none.db'}"):
        assert main(["cache", "clean", "--finished-states", "--tracking-uri", uri, "--dir", str(root)]) == 2
        assert uri in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists() and (root / "states" / ("0" * 16) / "run1").is_dir()


def test_removing_states_keeps_what_mlflow_has_not_received(tmp_path, capsys):
    """A run whose store was down keeps `mlflow_pending.json` (and its copies) beside its states: removing states
    must not lose it, only `replay` sends and removes it."""
    root = filled_root(tmp_path / "cache")
    run = root / "states" / "0123456789abcdef" / "run1"
    (run / "mlflow_pending.json").write_text("{}")
    (run / "mlflow_pending_files").mkdir()
    (run / "mlflow_pending_files" / "image00000.png").write_bytes(b"png")
    other = run.parent / "run2"
    other.mkdir()
    (other / "state-step00000001.pt").write_bytes(b"s")
    assert main(["cache", "clean", "--states", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert ("  kept records MLflow has not received: 1 run, 0.0 MiB (send them with `python -m lora_sweep replay`)"
            in out)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        "mlflow_pending.json", "mlflow_pending_files", "mlflow_pending_files/image00000.png"]
    assert not other.exists()
