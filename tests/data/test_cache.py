"""The shared tensor cache: keys, identity of weights, atomic entries, counting, locking across real processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_sweep import paths
from lora_sweep.data import cache as cache_lib
from lora_sweep.data import cache_keys
from lora_sweep.data.cache import TensorCache
from lora_sweep.data.cache_keys import cache_key, computed_key, latent_cache_key, text_cache_key
from lora_sweep.errors import UserError

REPO = Path(__file__).resolve().parents[2]
LATENT_FIELDS = dict(vae="v" * 64, image_sha256="i" * 64, bucket=(832, 1216), resized=(832, 1248),
                     crop_left_top=(0, 16), flipped=False)


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_SWEEP_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.default_cache_dir() == tmp_path / "a"
    monkeypatch.setenv("LORA_SWEEP_CACHE_DIR", "")
    assert paths.default_cache_dir() == tmp_path / "xdg" / "lora-sweep"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert paths.default_cache_dir() == Path.home() / ".cache" / "lora-sweep"


def test_cache_key_is_canonical_and_content_only():
    assert cache_key(a=1, b=[1, 2]) == cache_key(b=(1, 2), a=1)  # order of fields, tuple vs list: same key
    assert cache_key(a=1) != cache_key(a=2) and cache_key(a="1") != cache_key(a=1)
    assert len(cache_key(a=1)) == 64
    with pytest.raises(TypeError, match="hash content"):
        cache_key(image=Path("x.png"))


def test_latent_and_text_keys_change_with_what_changes_the_tensor():
    base = latent_cache_key(**LATENT_FIELDS)
    assert base == latent_cache_key(**LATENT_FIELDS)
    for field, value in [("vae", "w" * 64), ("image_sha256", "j" * 64), ("bucket", (896, 1152)),
                         ("resized", (896, 1200)), ("crop_left_top", (0, 15)), ("flipped", True)]:
        assert latent_cache_key(**(LATENT_FIELDS | {field: value})) != base, field
    with pytest.raises(TypeError):  # the entry holds the posterior's mean and std: sample and mean share it
        latent_cache_key(**LATENT_FIELDS, latent="mean")
    assert latent_cache_key(**LATENT_FIELDS, vae_dtype="float16") != base
    # training options are not fields at all: they cannot reach a key.
    with pytest.raises(TypeError):
        latent_cache_key(**LATENT_FIELDS, learning_rate=1e-4)
    text = text_cache_key(text_encoders="t" * 64, caption="sks dog")
    assert text != text_cache_key(text_encoders="t" * 64, caption="sks dog, red")
    assert text != text_cache_key(text_encoders="u" * 64, caption="sks dog")
    assert text != text_cache_key(text_encoders="t" * 64, caption="sks dog", attention="sdpa")
    assert text != base


def test_a_cpu_entry_is_keyed_by_the_thread_count_it_was_computed_with():
    """kohya v0.8.7 encodes its latents afresh at its run's thread count (accelerate launch's
    --num_cpu_threads_per_process, 1 by default); on the CPU the VAE's sums depend on it, so a CPU entry is stored
    under its content key and torch's thread count, a GPU entry under its content key alone."""
    key = latent_cache_key(**LATENT_FIELDS)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = computed_key(key, "cpu")
        assert computed_key(key, torch.device("cpu")) == one
        torch.set_num_threads(2)
        two = computed_key(key, "cpu")
    finally:
        torch.set_num_threads(before)
    assert len({key, one, two}) == 3
    assert one == cache_key(kind="computed", key=key, cpu_threads=1)
    assert computed_key(key, "cuda") == computed_key(key, torch.device("cuda", 1)) == key
    assert computed_key(key, "meta") == key


def test_file_sha256_and_memo(tmp_path):
    f = tmp_path / "img.png"
    f.write_bytes(b"abc" * 1000)
    memo = tmp_path / "memo"
    assert cache_keys.file_sha256(f, memo_dir=memo) and not memo.exists()  # just written: never memoized
    os.utime(f, (time.time() - 60, time.time() - 60))
    assert cache_keys.file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert cache_keys.file_sha256(f, memo_dir=memo) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert any(memo.rglob("*.json"))
    f.write_bytes(b"abd" * 1001)  # edited: size and mtime change, the memo does not apply
    assert cache_keys.file_sha256(f, memo_dir=memo) == hashlib.sha256(b"abd" * 1001).hexdigest()


def _diffusers_folder(root: Path) -> Path:
    for sub, name in [("vae", "diffusion_pytorch_model.safetensors"), ("unet", "diffusion_pytorch_model.safetensors"),
                      ("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors"),
                      ("tokenizer", "vocab.json"), ("tokenizer_2", "vocab.json")]:
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / name).write_bytes(f"{sub} weights".encode())
    (root / "model_index.json").write_text("{}")
    (root / ".cache").mkdir()
    (root / ".cache" / "junk").write_text("download bookkeeping")
    return root


def test_model_identity_of_diffusers_folder_by_component(tmp_path):
    model = _diffusers_folder(tmp_path / "m")
    for f in model.rglob("*"):
        os.utime(f, (time.time() - 60, time.time() - 60))
    memo = tmp_path / "memo"
    vae, text = cache_keys.model_identity(model, "vae"), cache_keys.model_identity(model, "text", memo_dir=memo)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"other unet")
    (model / ".cache" / "junk").write_text("changed")
    assert cache_keys.model_identity(model, "vae") == vae  # the U-Net and hidden files are not part of it
    assert cache_keys.model_identity(model, "text", memo_dir=memo) == text
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"fp16-fix vae")  # swap the VAE
    assert cache_keys.model_identity(model, "vae") != vae
    assert cache_keys.model_identity(model, "text", memo_dir=memo) == text
    (model / "tokenizer_2" / "vocab.json").write_bytes(b"other vocab")
    assert cache_keys.model_identity(model, "text", memo_dir=memo) != text
    moved = model.rename(tmp_path / "renamed")  # content, not location
    assert cache_keys.model_identity(moved, "vae") == cache_keys.model_identity(moved, "vae", memo_dir=memo)
    assert any(memo.rglob("*.json"))
    with pytest.raises(UserError, match="does not exist"):
        cache_keys.model_identity(tmp_path / "missing", "vae")


def test_a_model_file_that_is_a_broken_link_is_named(tmp_path):
    model = _diffusers_folder(tmp_path / "m")
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.symlink_to(tmp_path / "blobs" / "0a1b")  # an HF snapshot whose blob was removed
    with pytest.raises(UserError) as error:
        cache_keys.model_identity(model, "vae")
    assert str(error.value) == (f"model folder '{model}': '{weights}' is a link to '{tmp_path / 'blobs' / '0a1b'}', "
                                "which is gone. Restore it (download the model again) or point model.path at a "
                                "complete copy.")


def test_model_identity_of_single_file_checkpoint(tmp_path):
    def checkpoint(vae: float, unet: float, text: float) -> Path:
        path = tmp_path / "sdxl.safetensors"
        save_file({"first_stage_model.encoder.w": torch.full((4, 4), vae),
                   "model.diffusion_model.w": torch.full((4, 4), unet),
                   "conditioner.embedders.0.transformer.w": torch.full((4,), text)}, str(path))
        return path

    path = checkpoint(1.0, 1.0, 1.0)
    vae, text = cache_keys.model_identity(path, "vae"), cache_keys.model_identity(path, "text")
    checkpoint(1.0, 2.0, 1.0)  # only the U-Net changed
    assert cache_keys.model_identity(path, "vae", memo_dir=tmp_path / "m") == vae
    assert cache_keys.model_identity(path, "text") == text
    checkpoint(3.0, 2.0, 1.0)
    assert cache_keys.model_identity(path, "vae", memo_dir=tmp_path / "m") != vae
    standalone = tmp_path / "vae.safetensors"  # a lone VAE file has no prefixes: hashed whole
    save_file({"encoder.w": torch.ones(2)}, str(standalone))
    assert cache_keys.model_identity(standalone, "vae") == hashlib.sha256(
        f"file\t{cache_keys.file_sha256(standalone)}".encode()).hexdigest()


def test_get_or_compute_counts_and_returns_what_is_stored(tmp_path):
    store = TensorCache(tmp_path / "c")
    key = latent_cache_key(**LATENT_FIELDS)
    calls = []

    def compute():
        calls.append(1)
        return {"latents": torch.arange(6, dtype=torch.float16).reshape(1, 2, 3)[:, :, 1:]}  # a non-contiguous view

    first = store.get_or_compute("latents", key, compute, meta={"source": "a.png", "bucket": [832, 1216]})
    second = store.get_or_compute("latents", key, compute)
    assert len(calls) == 1 and (store.hits, store.misses) == (1, 1)
    assert torch.equal(first["latents"], second["latents"]) and second["latents"].dtype == torch.float16
    other = text_cache_key(text_encoders="t" * 64, caption="a")
    store.get_or_compute("text", other, lambda: {"context": torch.zeros(2), "pooled": torch.ones(3)})
    assert store.stats() == {"cache/hits": 1, "cache/misses": 2, "cache/latents/hits": 1,
                             "cache/latents/misses": 1, "cache/text/hits": 0, "cache/text/misses": 1}
    assert store.path_for("latents", key) == tmp_path / "c" / "latents" / key[:2] / f"{key}.safetensors"
    fresh = TensorCache(tmp_path / "c")  # another job: a hit, including the header
    assert fresh.get_or_compute("text", other, lambda: pytest.fail("recomputed")) is not None
    from safetensors import safe_open
    with safe_open(str(store.path_for("latents", key)), "pt") as f:
        assert f.metadata()["source"] == "a.png" and json.loads(f.metadata()["bucket"]) == [832, 1216]


def test_editing_a_caption_misses_once(tmp_path):
    store = TensorCache(tmp_path)
    encode = lambda: {"pooled": torch.randn(4)}  # noqa: E731
    for caption in ["sks dog", "sks dog", "sks dog, red", "sks dog"]:
        store.get_or_compute("text", text_cache_key(text_encoders="t" * 64, caption=caption), encode)
    assert (store.hits, store.misses) == (2, 2)


def test_a_writer_finishing_second_keeps_the_entry_already_there(tmp_path):
    store, key = TensorCache(tmp_path), "a" * 64
    impatient = TensorCache(tmp_path, lock_timeout_s=0.0)  # does not wait for the lock: computes its own copy

    def compute():
        impatient.get_or_compute("latents", key, lambda: {"x": torch.zeros(3)})  # finishes first
        return {"x": torch.ones(3)}

    store.get_or_compute("latents", key, compute)
    assert torch.equal(store.get("latents", key)["x"], torch.zeros(3))


def test_leftover_temp_and_truncated_entries_are_never_read(tmp_path):
    store, key = TensorCache(tmp_path), "b" * 64
    path = store.path_for("latents", key)
    path.parent.mkdir(parents=True)
    leftover = path.parent / f".{path.name}.k1ll3d.tmp"  # a writer killed mid-write
    leftover.write_bytes(b"\x00" * 100)
    assert store.get("latents", key) is None
    store.get_or_compute("latents", key, lambda: {"x": torch.ones(1000)})
    save_file({"x": torch.full((1000,), 2.0)}, str(path))
    path.write_bytes(path.read_bytes()[:-64])  # damaged on disk
    assert store.get("latents", key) is None
    fixed = store.get_or_compute("latents", key, lambda: {"x": torch.full((1000,), 3.0)})
    assert torch.equal(store.get("latents", key)["x"], fixed["x"]) and fixed["x"][0] == 3.0
    assert leftover.exists() and store.size_bytes() > path.stat().st_size


def test_nan_is_refused_with_the_image_named(tmp_path):
    store = TensorCache(tmp_path)
    with pytest.raises(cache_lib.NonFiniteCacheError, match="photos/dog.png") as info:
        store.get_or_compute("latents", "c" * 64, lambda: {"latents": torch.tensor([1.0, float("nan")])},
                             meta={"source": "photos/dog.png"})
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, UserError)
    assert store.get("latents", "c" * 64) is None and store.misses == 0


def test_clear_reports_bytes_and_spares_other_files(tmp_path):
    store = TensorCache(tmp_path)
    for i in range(3):
        store.get_or_compute("latents", f"{i:064x}", lambda: {"x": torch.zeros(100)})
    entry = store.path_for("latents", f"{0:064x}")
    os.utime(entry, (time.time() - 60, time.time() - 60))
    store.file_sha256(entry)  # remembered under .hashes/
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "photos" / "ab").mkdir(parents=True)
    (tmp_path / "photos" / "ab" / "cat.png").write_bytes(b"png")
    size = store.size_bytes()
    assert size > 3 * 400
    assert store.clear() == size and store.size_bytes() == 0
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "photos" / "ab" / "cat.png").exists()
    assert not (tmp_path / "latents").exists() and not (tmp_path / ".hashes").exists()
    assert "0 entries" in store.summary()


def test_lock_timeout_computes_its_own(tmp_path):
    store = TensorCache(tmp_path, lock_timeout_s=0.2)
    key = "d" * 64
    held = cache_lib._KeyLock(store._lock_path("latents", key))
    assert held.acquire(1.0)
    try:
        started = time.monotonic()
        out = store.get_or_compute("latents", key, lambda: {"x": torch.ones(2)})
        assert 0.15 < time.monotonic() - started < 2.0 and store.misses == 1 and out["x"].sum() == 2
    finally:
        held.release()
    assert not store._lock_path("latents", key).exists()  # lock files do not pile up


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lora_sweep.data.cache import _KeyLock
    lock = _KeyLock(Path(sys.argv[1]))
    assert lock.acquire(5.0)
    print("held", flush=True)
    time.sleep(60)
""")


@pytest.mark.skipif(cache_lib.fcntl is None, reason="no flock on this platform")
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock_path = tmp_path / ".locks" / "latents" / ("e" * 64 + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock_path)], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = cache_lib._KeyLock(lock_path)
        assert not waiter.acquire(0.1)  # really held
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait(10)
        started = time.monotonic()
        assert waiter.acquire(5.0) and time.monotonic() - started < 2.0
        waiter.release()
    finally:
        holder.kill()
        holder.wait(10)


_WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from lora_sweep.data.cache import TensorCache

    root, out, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    store = TensorCache(root)
    many = [f"{i:064x}" for i in range(6)]
    single = [f"{i + 100:064x}" for i in range(3)]
    log = open(root.parent / "computed.log", "a")

    def record(key):
        log.write(f"{os.getpid()} {key}\\n")
        log.flush()

    def compute_one(key):
        def run():
            time.sleep(0.15)  # slow enough for the other job to arrive mid-write
            record(key)
            return {"x": torch.rand(8)}  # random: two computations would differ
        return run

    out.with_suffix(".ready").touch()  # imports done
    while not go.exists():
        time.sleep(0.005)
    got = [store.get_or_compute("latents", key, compute_one(key)) for key in many]
    got += [store.get_or_compute("text", key, compute_one(key)) for key in single]
    save_file({f"t{i}": t["x"] for i, t in enumerate(got)}, str(out))
    out.with_suffix(".json").write_text(json.dumps(store.stats()))
""")


@pytest.mark.skipif(cache_lib.fcntl is None, reason="no flock on this platform")
def test_two_processes_fill_the_same_cache_once(tmp_path):
    from safetensors.torch import load_file

    root, go = tmp_path / "cache", tmp_path / "go"
    outs = [tmp_path / f"worker{i}.safetensors" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(out), str(go)],
                                env=os.environ | {"PYTHONPATH": str(REPO)}) for out in outs]
    deadline = time.monotonic() + 60
    while not all(out.with_suffix(".ready").exists() for out in outs):  # both have imported torch
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers)
        time.sleep(0.01)
    go.touch()  # release them together
    assert [w.wait(120) for w in workers] == [0, 0]
    first, second = (load_file(str(out)) for out in outs)
    assert first.keys() == second.keys() and len(first) == 9
    assert all(torch.equal(first[name], second[name]) for name in first)  # both read the one computation
    computed = [line.split()[1] for line in (tmp_path / "computed.log").read_text().splitlines()]
    assert sorted(computed) == sorted(set(computed)) and len(computed) == 9  # every key computed exactly once
    stats = [json.loads(out.with_suffix(".json").read_text()) for out in outs]
    assert sum(s["cache/misses"] for s in stats) == 9 and sum(s["cache/hits"] for s in stats) == 9
    assert not list(root.rglob("*.tmp")) and not list((root / ".locks").rglob("*.lock"))
