"""Load SDXL, real or tiny, through one path: a diffusers folder or a single .safetensors checkpoint.

The tiny models are diffusers folders (the trained one shipped in the package, the random one built into the cache),
opened like a real download, so tests and the demo exercise the real loader. Single files read their configs from a
local folder (`single_file_config_dir`): nothing is fetched.
Importing this module and `check_model_path` touch neither torch nor diffusers, so a bad path is said early.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_sweep.atomic import give_new_file_modes
from lora_sweep.errors import UserError
from lora_sweep.model.tiny_sdxl import (
    CLIP_BPE_GZ,
    SDXL_BASE_ASSETS,
    TINY_RECIPE_VERSION,
    TINY_TRAINED_DIR,
    read_clip_merges,
    sdxl_asset_config,
    write_clip_tokenizer,
)
from lora_sweep.model.weights import ACCEPTS, FOLDER_PARTS, load_cast, read_safetensors_header
from lora_sweep.paths import default_cache_dir

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the parts with weights
# kohya v0.8.7's transformers 4.36 CLIP computes eager attention; transformers 5 defaults to SDPA (~1e-6 apart)
TEXT_ENCODER_ATTENTION = "eager"
# Each component's keys in a single-file (SGM layout) checkpoint start with these.
SINGLE_FILE_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                        "text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1."}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# Keys every SDXL-base single-file checkpoint has (SGM layout): UNet, VAE, CLIP-L and OpenCLIP-bigG towers.
SINGLE_FILE_KEYS = {
    "UNet": "model.diffusion_model.input_blocks.0.0.weight",
    "VAE": "first_stage_model.encoder.conv_in.weight",
    "text encoder 1 (CLIP ViT-L)":
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
    "text encoder 2 (OpenCLIP ViT-bigG)": "conditioner.embedders.1.model.positional_embedding",
}
SMALL_FILE_BYTES = 64 * 2**20  # identity hashes the content of files up to this size, and size + mtime above it


@dataclass
class SDXLParts:
    """Everything the trainer takes from a model. noise_scheduler: kohya's training DDPMScheduler; scheduler: the
    folder's sampling scheduler; identity: per-component fingerprints for cache keys; resolution: the native side."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    noise_scheduler: Any
    scheduler: Any
    source: str
    identity: dict[str, str]
    resolution: int

    def pipeline(self, scheduler: Any = None) -> Any:
        """A StableDiffusionXLPipeline sharing these modules (for sampling); `scheduler` defaults to the folder's."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler or self.scheduler,
        )


def kohya_noise_scheduler() -> Any:
    """The DDPMScheduler kohya's train_network.py trains with (its default prediction_type "epsilon" is unused)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


def check_model_path(path: str | os.PathLike | None) -> Path:
    """Validate `model.path` cheaply (file names and the safetensors header only) and return it as a Path."""
    if path is None or str(path).strip() == "":
        raise UserError(f"model.path is not set; {ACCEPTS}.")
    model_path = Path(path).expanduser()
    if not model_path.exists():
        raise UserError(f"model.path={str(path)!r} does not exist; {ACCEPTS}.")
    if model_path.is_dir():
        missing = [name for name in ("model_index.json", *FOLDER_PARTS) if not (model_path / name).exists()]
        if missing:
            raise UserError(f"model.path={str(path)!r} is a folder but lacks {', '.join(missing)}; {ACCEPTS}.")
        return model_path
    if model_path.suffix.lower() != ".safetensors":
        raise UserError(f"model.path={str(path)!r} has the extension {model_path.suffix or '(none)'!r}, but only "
                        f".safetensors single-file checkpoints are read (no pickled .ckpt/.pt); {ACCEPTS}.")
    header = read_safetensors_header(model_path)
    missing = [part for part, key in SINGLE_FILE_KEYS.items() if key not in header]
    if missing:
        raise UserError(f"model.path={str(path)!r} is a .safetensors file but not an SDXL base checkpoint in the "
                        f"original layout: it lacks the {', '.join(missing)} weights (is it a LoRA, a refiner, or a "
                        f"single diffusers component?); {ACCEPTS}.")
    return model_path


def checkpoint_dtypes(path: str | os.PathLike) -> dict[str, Any]:
    """Each component's dtype on disk (the dtype most of its floating tensors have), from safetensors headers only; None
    for a component without a .safetensors file (then read in fp32)."""
    import torch

    model_path = Path(path)
    found: dict[str, Any] = dict.fromkeys(COMPONENTS)
    if model_path.is_dir():
        variant = _weights_variant(model_path)
        headers = {}
        for name in COMPONENTS:
            files = sorted((model_path / name).glob("*.safetensors")) if (model_path / name).is_dir() else []
            files = [f for f in files if (".fp16." in f.name) == (variant == "fp16")] or files
            headers[name] = [read_safetensors_header(f) for f in files]
    else:
        header = read_safetensors_header(model_path)
        headers = {name: [{k: v for k, v in header.items() if k.startswith(prefix)}]
                   for name, prefix in SINGLE_FILE_PREFIXES.items()}
    for name, parts in headers.items():
        counts = Counter(info["dtype"] for part in parts for key, info in part.items()
                         if key != "__metadata__" and info.get("dtype") in SAFETENSORS_DTYPES)
        if counts:
            found[name] = getattr(torch, SAFETENSORS_DTYPES[counts.most_common(1)[0][0]])
    return found


def resolve_model_path(name: str, path: str | None, *, cache_root: Path | None = None, seed: int = 0) -> Path:
    """`model=tiny` -> the trained tiny folder shipped in the package; `model=tiny_random` -> the cached random-weight
    folder (built if needed); `model=sdxl` -> the checked `model.path`."""
    if name == "tiny":
        return trained_tiny_dir()
    if name == "tiny_random":
        return tiny_model_dir(cache_root, seed)
    if name == "sdxl":
        return check_model_path(path)
    raise UserError(f"model={name!r} is unknown; model accepts 'tiny' (the trained tiny SDXL shipped in the package), "
                    f"'tiny_random' (random-weight SDXL architecture, offline) or 'sdxl' (with model.path).")


def trained_tiny_dir(folder: Path = TINY_TRAINED_DIR) -> Path:
    """The shipped trained tiny SDXL, a diffusers folder read like a user's own (never built at run time)."""
    if not (folder / "model_index.json").is_file():
        raise UserError(f"model=tiny: its weights are missing from the installed package ({folder.name}/); reinstall "
                        f"lora-sweep, rebuild them with `make tiny-model`, or set model to tiny_random.")
    return folder


def build_folder_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Create `final` by `build(staging)` beside it, then one atomic rename: readers see no folder or a whole one,
    with the modes of any new folder and file. Racing processes both build; the loser's rename fails and it discards
    its copy."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".building", dir=final.parent))
    try:
        build(staging)
        give_new_file_modes(staging)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def library_bars_off_unless_on_terminal() -> None:
    """diffusers' and transformers' progress bars only on a terminal: in a job's log they are carriage returns, and
    our own lines name the phase."""
    import diffusers
    import transformers

    from lora_sweep.progress import on_terminal

    if not on_terminal():
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def tiny_model_path(cache_root: Path | None = None, seed: int = 0) -> Path:
    """Where `tiny_model_dir` keeps the tiny SDXL, `<cache>/models/<recipe version>-seed<seed>`, built or not."""
    return Path(cache_root or default_cache_dir()) / "models" / f"{TINY_RECIPE_VERSION}-seed{seed}"


def tiny_model_dir(cache_root: Path | None = None, seed: int = 0) -> Path:
    """The tiny SDXL as a diffusers folder (`tiny_model_path`), built on first use."""
    from lora_sweep.model.tiny_sdxl import build_tiny_sdxl, save_tiny_sdxl

    final = tiny_model_path(cache_root, seed)
    library_bars_off_unless_on_terminal()  # saving shows transformers' "Writing model shards" bar
    return build_folder_once(final, lambda staging: save_tiny_sdxl(build_tiny_sdxl(seed), staging))


def sdxl_base_config_dir(cache_root: Path | None = None) -> Path:
    """A weight-less SDXL-base diffusers folder (bundled configs, CLIP vocab rebuilt from its BPE file) that
    `from_single_file` reads instead of the Hub; keyed by a hash of the assets."""
    digest = hashlib.sha256(CLIP_BPE_GZ.read_bytes())
    for file in sorted(SDXL_BASE_ASSETS.rglob("*.json")):
        digest.update(file.relative_to(SDXL_BASE_ASSETS).as_posix().encode() + file.read_bytes())
    final = Path(cache_root or default_cache_dir()) / "models" / f"sdxl-base-config-{digest.hexdigest()[:12]}"

    def build(staging: Path) -> None:
        shutil.copytree(SDXL_BASE_ASSETS, staging, dirs_exist_ok=True)
        merges = read_clip_merges()
        for name in ("tokenizer", "tokenizer_2"):
            write_clip_tokenizer(staging / name, merges, sdxl_asset_config(name))

    return build_folder_once(final, build)


def load_sdxl(path: str | os.PathLike, *, dtype: Any = None, device: Any = "cpu",
              cache_root: Path | None = None, dtypes: Mapping[str, Any] | None = None) -> SDXLParts:
    """A diffusers SDXL folder or a single-file checkpoint -> SDXLParts, never touching the network.

    `dtypes`: the dtype to read each component in (e.g. `placement.load_dtypes`' plan); `dtype`: the rest (fp32). A
    folder's component already in its dtype is mapped without a copy, another is read straight into it
    (`weights.load_cast`); a single file is read in its own dtype, then cast. The text encoders compute
    `TEXT_ENCODER_ATTENTION`. Raises UserError naming model.path.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    model_path = check_model_path(path)
    library_bars_off_unless_on_terminal()
    wanted = {name: (dtypes or {}).get(name) or dtype or torch.float32 for name in COMPONENTS}
    config_dir = None if model_path.is_dir() else single_file_config_dir(model_path, cache_root)
    try:
        if config_dir is None:
            variant = _weights_variant(model_path)
            pipe = StableDiffusionXLPipeline.from_pretrained(
                model_path, dtype={**wanted, "default": dtype or torch.float32}, local_files_only=True,
                variant=variant, **_cast_while_reading(model_path, wanted, variant))
        else:
            on_disk = checkpoint_dtypes(model_path).get("unet") or torch.float32
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(model_path), config=str(config_dir), dtype=on_disk, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"model.path={str(path)!r} could not be loaded as SDXL: {error}") from error
    for name in COMPONENTS:
        module = getattr(pipe, name)
        if any(p.dtype != wanted[name] for p in module.parameters() if p.is_floating_point()):
            module.to(dtype=wanted[name])  # a single file's component (a folder's are read in their dtype)
        module.to(device).eval()
    for name in ("text_encoder", "text_encoder_2"):  # train.sdpa / xformers choose the U-Net's attention only
        getattr(pipe, name).set_attn_implementation(TEXT_ENCODER_ATTENTION)
    return SDXLParts(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, noise_scheduler=kohya_noise_scheduler(),
        scheduler=pipe.scheduler, source=str(model_path), identity=weights_identity(model_path, config_dir),
        resolution=int(pipe.unet.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1),
    )


def _cast_while_reading(folder: Path, wanted: Mapping[str, Any], variant: str | None) -> dict[str, Any]:
    """The folder's components whose wanted dtype differs from the disk's, read by `weights.load_cast`, for
    from_pretrained to take as given."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    on_disk = checkpoint_dtypes(folder)
    loaded = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        if on_disk.get(name) is not None and on_disk[name] != wanted[name]:
            model = load_cast(cls, folder / name, wanted[name], variant)
            if model is not None:
                loaded[name] = model
    return loaded


def single_file_config_dir(checkpoint: Path, cache_root: Path | None = None) -> Path:
    """The config folder for a single-file checkpoint: the tiny recipe's when its metadata names it, else SDXL base's;
    the UNet's input conv must match it."""
    header = read_safetensors_header(checkpoint)
    recipe = header.get("__metadata__", {}).get("lora_sweep.recipe")
    if recipe is not None and recipe != TINY_RECIPE_VERSION:
        raise UserError(f"model.path={str(checkpoint)!r} was written by tiny recipe {recipe!r}; this version builds "
                        f"{TINY_RECIPE_VERSION!r}. Re-export it.")
    config_dir = tiny_model_dir(cache_root) if recipe else sdxl_base_config_dir(cache_root)
    unet_config = json.loads((config_dir / "unet" / "config.json").read_text())
    expected = [unet_config["block_out_channels"][0], unet_config["in_channels"], 3, 3]
    found = header[SINGLE_FILE_KEYS["UNet"]]["shape"]
    if list(found) != expected:
        raise UserError(f"model.path={str(checkpoint)!r}: its UNet input conv has shape {found}, SDXL base has "
                        f"{expected}; only SDXL-base-architecture checkpoints are supported.")
    return config_dir


def _weights_variant(folder: Path) -> str | None:
    """"fp16" when the folder ships only fp16-variant weights (as some SDXL copies do), else None."""
    unet_files = {p.name for p in (folder / "unet").iterdir()}
    plain = any(name.startswith("diffusion_pytorch_model") and ".fp16." not in name for name in unet_files)
    return "fp16" if not plain and any(".fp16." in name for name in unet_files) else None


def weights_identity(model_path: Path, config_dir: Path | None = None) -> dict[str, str]:
    """Cheap per-component fingerprints ("unet", "vae", "text_encoder", "text_encoder_2") for cache keys.

    sha256 over (relative name, content sha256) of files up to 64 MiB and (name, size, mtime_ns) above; a text
    encoder's includes its tokenizer. A single file gives each component the whole file's fingerprint plus its
    configs. Dtype and device are not in it.
    """
    sources = {"unet": ["unet"], "vae": ["vae"], "text_encoder": ["text_encoder", "tokenizer"],
               "text_encoder_2": ["text_encoder_2", "tokenizer_2"]}
    if config_dir is None:
        return {part: _files_digest(model_path, folders) for part, folders in sources.items()}
    file_digest = _files_digest(model_path.parent, [model_path.name])
    config_digests = {part: _files_digest(config_dir, folders, only=(".json", ".txt"))
                      for part, folders in sources.items()}
    return {part: hashlib.sha256(f"{file_digest}|{part}|{config_digests[part]}".encode()).hexdigest()
            for part in sources}


def _files_digest(root: Path, names: list[str], only: tuple[str, ...] | None = None) -> str:
    """sha256 over the files (or the single file) `names` under `root`; `only` keeps those suffixes."""
    digest = hashlib.sha256()
    for name in names:
        files = [root / name] if (root / name).is_file() else sorted(p for p in (root / name).rglob("*") if p.is_file())
        for file in (f for f in files if only is None or f.suffix in only):
            stat = file.stat()
            fingerprint = hashlib.sha256(file.read_bytes()).hexdigest() if stat.st_size <= SMALL_FILE_BYTES \
                else f"{stat.st_size}:{stat.st_mtime_ns}"
            digest.update(f"{file.relative_to(root).as_posix()}\t{fingerprint}\n".encode())
    return digest.hexdigest()
