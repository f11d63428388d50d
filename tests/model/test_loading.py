"""The model room: tiny SDXL build, the cached folder, the one loader (folder and single file), path checks.

(transformers prints a harmless "CLIPImageProcessor requires torchvision" warning on import.)
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from sgm_checkpoint import save_single_file

from lora_sweep.errors import UserError
from lora_sweep.model.loading import (
    build_folder_once,
    check_model_path,
    load_sdxl,
    sdxl_base_config_dir,
    tiny_model_dir,
)
from lora_sweep.model.tiny_sdxl import TINY_RECIPE_VERSION, build_tiny_sdxl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny_dir(cache_root) -> Path:
    return tiny_model_dir(cache_root, seed=0)


@pytest.fixture(scope="module")
def parts(tiny_dir):
    return load_sdxl(tiny_dir)


def unet_output(unet) -> torch.Tensor:
    """The UNet on fixed inputs shaped by its own config (so it works for any SDXL-architecture UNet)."""
    gen = torch.Generator().manual_seed(1)
    cross_dim = unet.config.cross_attention_dim
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled_dim, generator=gen),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 64, 8, 0, 64, 64]])}
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 900]),
                    encoder_hidden_states=torch.randn(2, 77, cross_dim, generator=gen),
                    added_cond_kwargs=added).sample


def test_tiny_build_is_offline_and_deterministic(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tiny build tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    build_tiny_sdxl(0)  # first build pays for diffusers' lazy module imports
    start = time.perf_counter()
    first, again, other = build_tiny_sdxl(0), build_tiny_sdxl(0), build_tiny_sdxl(1)
    assert (time.perf_counter() - start) / 3 < 1.5  # about 0.15 s each when the machine is idle
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b, c = (getattr(p, name).state_dict() for p in (first, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not all(torch.equal(a[k], c[k]) for k in a), name
    assert first.unet.config.addition_embed_type == "text_time"
    assert first.unet.config.cross_attention_dim == 32 + 48
    assert first.tokenizer_2.pad_token == "!" and first.tokenizer.model_max_length == 77


def test_saved_folder_is_sdxl_layout_and_reloads_identically(tiny_dir, parts):
    for name in ("tokenizer", "tokenizer_2"):
        assert sorted(p.name for p in (tiny_dir / name).iterdir()) == ["merges.txt", "tokenizer_config.json",
                                                                       "vocab.json"]
    assert json.loads((tiny_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert tiny_dir.name == f"{TINY_RECIPE_VERSION}-seed0"
    assert torch.equal(unet_output(parts.unet), unet_output(build_tiny_sdxl(0).unet))
    assert parts.resolution == 64 and parts.source == str(tiny_dir)
    assert set(parts.identity) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert load_sdxl(tiny_dir).identity == parts.identity
    ids = parts.tokenizer("a photo of the cat").input_ids
    assert ids == build_tiny_sdxl(0).tokenizer("a photo of the cat").input_ids
    assert ids[0] == parts.tokenizer.bos_token_id
    assert ids[-1] == parts.tokenizer.eos_token_id == len(parts.tokenizer) - 1  # eos last: argmax pooling works


def test_tiny_model_dir_returns_the_existing_folder(cache_root, tiny_dir):
    stamp = (tiny_dir / "unet" / "config.json").stat().st_mtime_ns
    assert tiny_model_dir(cache_root, seed=0) == tiny_dir
    assert (tiny_dir / "unet" / "config.json").stat().st_mtime_ns == stamp


def test_noise_scheduler_is_kohyas_ddpm(parts):
    config = parts.noise_scheduler.config
    assert type(parts.noise_scheduler).__name__ == "DDPMScheduler"
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert config.num_train_timesteps == 1000 and config.clip_sample is False
    alphas = parts.noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    assert snr[0].item() == pytest.approx(1175.5, rel=1e-3) and snr[999].item() == pytest.approx(0.00468, rel=1e-2)
    assert type(parts.scheduler).__name__ == "EulerDiscreteScheduler"


def test_pipeline_runs_two_steps_at_64px(parts):
    images = parts.pipeline()(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64,
                              output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and float(images.min()) >= 0 and float(images.max()) <= 1


def test_single_file_checkpoint_loads_through_the_same_loader(tmp_path, cache_root, parts):
    checkpoint = tmp_path / "tiny.safetensors"
    save_single_file(build_tiny_sdxl(0), checkpoint)
    from_file = load_sdxl(checkpoint, cache_root=cache_root)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, loaded = getattr(parts, name).state_dict(), getattr(from_file, name).state_dict()
        assert expected.keys() == loaded.keys(), name
        assert all(torch.equal(expected[k], loaded[k]) for k in expected), name
    assert torch.equal(unet_output(from_file.unet), unet_output(parts.unet))
    assert from_file.tokenizer_2("a cat").input_ids == parts.tokenizer_2("a cat").input_ids
    assert from_file.resolution == 64 and from_file.identity["unet"] != parts.identity["unet"]


def test_sdxl_base_config_folder_has_real_clip_vocab_and_sizes(cache_root):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    folder = sdxl_base_config_dir(cache_root)
    assert sdxl_base_config_dir(cache_root) == folder
    tokenizer, tokenizer_2 = (CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2"))
    assert len(tokenizer) == 49408
    # Reference ids of openai/clip-vit-large-patch14 for this caption.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer_2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


CHECK_SCRIPT = """
import json, sys
from pathlib import Path
from lora_sweep.errors import UserError
from lora_sweep.model.loading import check_model_path
messages = {}
for label, path in json.loads(sys.argv[1]).items():
    try:
        check_model_path(path)
        messages[label] = None
    except UserError as error:
        messages[label] = str(error)
heavy = [name for name in ("torch", "diffusers", "transformers") if name in sys.modules]
print(json.dumps({"messages": messages, "heavy": heavy}))
"""


def test_check_model_path_errors_are_user_errors_without_heavy_imports(tmp_path, tiny_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = tmp_path / "partial"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "tokenizer_2"):
        (partial / name).mkdir(parents=True)
    (partial / "model_index.json").write_text("{}")
    text_file = tmp_path / "model.txt"
    text_file.write_text("not a model")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    lora_like = tmp_path / "lora.safetensors"
    header = json.dumps({"lora_unet_x.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}).encode()
    lora_like.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    cases = {"none": None, "missing": str(tmp_path / "nope"), "empty": str(empty), "partial": str(partial),
             "txt": str(text_file), "garbage": str(garbage), "lora": str(lora_like), "good": str(tiny_dir)}
    result = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, check=True)
    report = json.loads(result.stdout)
    assert report["heavy"] == []
    messages = report["messages"]
    assert messages["good"] is None
    for label in cases.keys() - {"good"}:
        assert "model.path" in messages[label] and "diffusers SDXL folder" in messages[label], label
    assert "not set" in messages["none"] and "does not exist" in messages["missing"]
    assert "model_index.json" in messages["empty"] and "text_encoder_2" in messages["empty"]
    assert "lacks text_encoder_2;" in messages["partial"]
    assert "'.txt'" in messages["txt"] and "not a readable" in messages["garbage"]
    assert "not an SDXL base checkpoint" in messages["lora"] and "UNet" in messages["lora"]


def test_loader_rejects_single_files_it_has_no_configs_for(tmp_path, cache_root):
    pipe = build_tiny_sdxl(0)
    old_recipe, no_recipe = tmp_path / "old.safetensors", tmp_path / "anonymous.safetensors"
    save_single_file(pipe, old_recipe, recipe="tiny-sdxl-v0")
    save_single_file(pipe, no_recipe, recipe=None)  # read as SDXL base, whose UNet is 10x wider
    with pytest.raises(UserError, match="tiny-sdxl-v0"):
        load_sdxl(old_recipe, cache_root=cache_root)
    with pytest.raises(UserError, match=r"model.path=.*\[32, 4, 3, 3\].*\[320, 4, 3, 3\]"):
        load_sdxl(no_recipe, cache_root=cache_root)


RACE_SCRIPT = """
import os, sys, time
from pathlib import Path
from lora_sweep.model.loading import build_folder_once
final, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
def build(staging):
    (staging / f"built-by-{os.getpid()}").write_text("x")
    time.sleep(0.3)  # both processes are inside their build at once
print(build_folder_once(final, build))
"""


def test_two_processes_racing_produce_one_complete_folder(tmp_path):
    final, go = tmp_path / "cache" / "models" / "thing", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = [subprocess.Popen([sys.executable, "-c", RACE_SCRIPT, str(final), str(go)], stdout=subprocess.PIPE,
                               text=True, cwd=REPO, env=env) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outputs = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0]
    assert outputs == [str(final), str(final)]
    assert len(list(final.iterdir())) == 1  # one builder's complete folder, not a mix
    assert [p.name for p in final.parent.iterdir()] == ["thing"]  # no staging folders left behind


def test_tiny_model_dir_threads_racing(tmp_path, capfd):
    """Two threads build the tiny model at once: one folder with the seeded weights; with stderr not a terminal,
    no library bar ("Writing model shards", loading bars) reaches it."""
    import transformers

    transformers.utils.logging.enable_progress_bar()  # as in a fresh process (an earlier test may have disabled it)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny_model_dir(tmp_path, seed=3))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f"{TINY_RECIPE_VERSION}-seed3"]
    loaded, expected = load_sdxl(results[0]).unet.state_dict(), build_tiny_sdxl(3).unet.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)  # concurrent builds keep seeded weights
    printed = capfd.readouterr()
    assert "Writing model shards" not in printed.err and "Loading" not in printed.err, printed.err


def test_build_folder_once_leaves_nothing_when_the_build_fails(tmp_path):
    def failing(staging: Path) -> None:
        (staging / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_folder_once(tmp_path / "models" / "x", failing)
    assert list((tmp_path / "models").iterdir()) == []
    with pytest.raises(UserError, match="model.path"):
        check_model_path(tmp_path / "models" / "x")


def test_a_built_folder_has_the_modes_of_any_new_folder_and_file(tmp_path):
    """The cache's model and photos folders are shared by accounts and groups: mkdtemp's 0700, and the 0600 files
    diffusers' save_pretrained writes, made them owner-only whatever the umask."""
    import os

    def build(staging: Path) -> None:
        (staging / "unet").mkdir()
        (staging / "unet" / "w.safetensors").write_bytes(b"w")
        (staging / "unet" / "w.safetensors").chmod(0o600)  # as save_pretrained leaves it

    old = os.umask(0o022)
    try:
        final = build_folder_once(tmp_path / "models" / "x", build)
    finally:
        os.umask(old)
    modes = {p.relative_to(final).as_posix(): oct(p.stat().st_mode & 0o777) for p in [final, *final.rglob("*")]}
    assert modes == {".": "0o755", "unet": "0o755", "unet/w.safetensors": "0o644"}
