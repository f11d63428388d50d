"""Training states: RNG capture/restore, atomic save, pruning, and a write killed half-way."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from lora_sweep.errors import UserError
from lora_sweep.training import checkpoint
from lora_sweep.training.checkpoint import Position


def draws(flip_rng: random.Random) -> tuple:
    return (random.random(), flip_rng.random(), float(np.random.rand()), float(np.random.randn()),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_capture_restore_replays_every_stream():
    flip = random.Random(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in NumPy's state: must survive too
    saved = checkpoint.capture_rng(flip)
    first = draws(flip)
    random.seed(99), np.random.seed(99), torch.manual_seed(99), flip.seed(99)
    checkpoint.restore_rng(saved, flip)
    assert draws(flip) == first


def tiny_training_objects(seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return layer, opt, sched, scaler


def step(layer, opt, sched) -> None:
    layer(torch.randn(2, 4)).pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def save(folder: Path, layer, opt, sched, scaler, at: int, keep: int = 2) -> Path:
    return checkpoint.save_state(
        folder, lora=dict(layer.named_parameters()), optimizer=opt, lr_scheduler=sched, scaler=scaler,
        position=Position(step=at, epoch=1, batch_index=3, images_seen=at * 2), rng=checkpoint.capture_rng(
            random.Random(0)), config_hash="abc", run_id="run1", keep=keep)


def test_save_restore_continues_exactly(tmp_path):
    layer, opt, sched, scaler = tiny_training_objects()
    step(layer, opt, sched)
    path = save(tmp_path, layer, opt, sched, scaler, at=1)
    step(layer, opt, sched)
    step(layer, opt, sched)
    expected = layer.weight.detach().clone()

    layer2, opt2, sched2, scaler2 = tiny_training_objects(seed=5)  # other initial weights: all overwritten
    position = checkpoint.restore(checkpoint.load_state(path), lora=dict(layer2.named_parameters()), optimizer=opt2,
                                  lr_scheduler=sched2, scaler=scaler2, flip_rng=random.Random(1))
    assert (position.step, position.epoch, position.batch_index, position.images_seen) == (1, 1, 3, 2)
    assert sched2.last_epoch == 1 and opt2.state_dict()["state"][0]["step"] == 1
    step(layer2, opt2, sched2)
    step(layer2, opt2, sched2)
    assert torch.equal(layer2.weight, expected)
    assert checkpoint.read_meta(path) == {"config_hash": "abc", "run_id": "run1", "step": 1}


def test_keeps_the_newest_states_and_lists_them_in_step_order(tmp_path):
    objs = tiny_training_objects()
    for at in (1, 2, 3, 10):
        save(tmp_path, *objs, at=at, keep=2)
    assert [p.name for p in checkpoint.list_states(tmp_path)] == ["state-step00000003.pt", "state-step00000010.pt"]
    assert checkpoint.resolve_state_arg(str(tmp_path)).name == "state-step00000010.pt"


def test_unreadable_state_is_a_user_error_naming_the_file(tmp_path):
    bad = tmp_path / "state-step00000001.pt"
    bad.write_bytes(b"not a state")
    with pytest.raises(UserError, match="state-step00000001.pt"):
        checkpoint.load_state(bad)
    with pytest.raises(UserError, match="train.resume"):
        checkpoint.resolve_state_arg(str(tmp_path / "missing"))


def test_find_resumable_takes_the_newest_state_of_an_unfinished_run(tmp_path):
    objs = tiny_training_objects()
    save(tmp_path / "finished_run", *objs, at=5)
    save(tmp_path / "old_run", *objs, at=9)
    time.sleep(0.01)
    save(tmp_path / "new_run", *objs, at=2)
    resumable = {"old_run", "new_run"}
    assert checkpoint.find_resumable(tmp_path, resumable.__contains__).parent.name == "new_run"
    assert checkpoint.find_resumable(tmp_path, {"old_run"}.__contains__).name == "state-step00000009.pt"
    assert checkpoint.find_resumable(tmp_path, lambda run: False) is None
    assert checkpoint.find_resumable(tmp_path / "nothing", lambda run: True) is None


WRITER = textwrap.dedent("""
    import sys, random, torch
    sys.path.insert(0, {root!r})
    from lora_sweep.training import checkpoint
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    lora = dict(layer.named_parameters()) | {{"big": torch.nn.Parameter(torch.rand(32 * 2**20))}}
    for step in (1, 2):
        checkpoint.save_state(sys.argv[1], lora=lora, optimizer=opt, lr_scheduler=sched,
                              scaler=torch.amp.GradScaler("cpu", enabled=False),
                              position=checkpoint.Position(step=step), rng=checkpoint.capture_rng(random.Random(0)),
                              config_hash="h", run_id="r", keep=5)
        print("saved", step, flush=True)
""").format(root=str(ROOT))


def test_a_write_killed_half_way_leaves_the_previous_state_loadable(tmp_path):
    """SIGKILL the writer while state 2 is being written (its temporary file exists): state 1 stays whole and is the
    newest state; the half-written file is never taken for a state, and the next save clears it away."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved 1"
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".state-step00000002.pt.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, "state 2 was never started"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (partial,) = tmp_path.glob(".state-step00000002.pt.*.tmp")
    assert partial.stat().st_size < (tmp_path / "state-step00000001.pt").stat().st_size  # really cut short
    assert [p.name for p in checkpoint.list_states(tmp_path)] == ["state-step00000001.pt"]
    state = checkpoint.load_state(checkpoint.resolve_state_arg(str(tmp_path)))
    assert state["position"]["step"] == 1 and state["lora"]["big"].numel() == 32 * 2**20
    checkpoint.prune(tmp_path, keep=5)
    assert not partial.exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_files_get_the_mode_of_any_new_file(tmp_path, umask, mode):
    """LoRA files and cache entries are read by other programs and accounts (ComfyUI, a shared cache): mkstemp's
    0600, which safetensors' writer kept by replacing the file, made them owner-only whatever the umask."""
    import os

    from safetensors.torch import save_file

    from lora_sweep.atomic import write_text, write_with
    from lora_sweep.model.network import save_kohya

    old = os.umask(umask)
    try:
        files = [write_with(tmp_path / "a.safetensors", lambda tmp: save_file({"x": torch.zeros(1)}, str(tmp))),
                 write_text(tmp_path / "b.txt", "b"),
                 save_kohya(tmp_path / "lora.safetensors", {"x": torch.zeros(1)}, {"ss_network_dim": 4})]
    finally:
        os.umask(old)
    assert [oct(f.stat().st_mode & 0o777) for f in files] == [oct(mode)] * 3
