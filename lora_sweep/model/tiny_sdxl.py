"""A tiny SDXL-architecture pipeline with seeded random weights (model=tiny_random; model=tiny is it trained by
tiny_training.py), built from configs with no network, so tests and the demo run every SDXL code path without its
weights. It keeps SDXL's layout and shrinks widths and depths (about 2 M
UNet parameters); the two text encoders have different widths (32, 48, like 768 and 1280), so a swapped pair fails
and diffusers' single-file loader tells them apart; the VAE has four levels (1/8 latents).
"""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

# Bump when anything below changes the tiny model (shapes, init, tokenizer): cached folders are keyed by it.
TINY_RECIPE_VERSION = "tiny-sdxl-v1"

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
SDXL_BASE_ASSETS = ASSETS_DIR / "sdxl_base"
# model=tiny: this architecture trained by model/tiny_training.py (`make tiny-model`), its record in tiny_trained.json
TINY_TRAINED_DIR = ASSETS_DIR / "tiny_trained"
CLIP_BPE_GZ = ASSETS_DIR / "bpe_simple_vocab_16e6.txt.gz"
# 256 bytes + 256 bytes</w> + merges + 2 specials = 49408 tokens, both SDXL text encoders' vocab_size
CLIP_NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

# A handful of merges so that common caption words become single tokens; everything else stays byte-level.
TINY_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n"), ("in", "g</w>"),
    ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("o", "n</w>"), ("e", "r</w>"),
)

TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION = 32, 48, 40  # SDXL: 768, 1280, 1280
TINY_ADDITION_TIME_EMBED_DIM = 8  # SDXL: 256
TINY_RESOLUTION = 64
# Weights come from torch's process-global RNG: threads building at once would interleave their draws.
_SEEDED_BUILD = threading.Lock()


def byte_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character table: printable Latin-1 maps to itself, the other 68
    bytes to 256.. in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable bytes first) is the id order of the vocab


def clip_vocab(merges: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> dict[str, int]:
    """CLIP's token -> id table from its merges: bytes, bytes + "</w>", one token per merge, then <|startoftext|>,
    <|endoftext|> (eos has the highest id, which legacy argmax pooling relies on)."""
    byte_chars = list(byte_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def read_clip_merges(gz_path: Path = CLIP_BPE_GZ) -> list[tuple[str, str]]:
    """The 48,894 merges of the real CLIP tokenizer from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    lines = gzip.decompress(gz_path.read_bytes()).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]  # type: ignore[misc]


def write_clip_tokenizer(folder: Path, merges, tokenizer_config: dict) -> None:
    """Write a CLIPTokenizer folder in SDXL's layout: vocab.json, merges.txt and tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")


def sdxl_asset_config(component: str) -> dict:
    """One bundled SDXL-base config: `component` is e.g. "scheduler", "tokenizer_2" or "unet"."""
    folder = SDXL_BASE_ASSETS / component
    name = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
            "tokenizer_2": "tokenizer_config.json"}.get(component, "config.json")
    return json.loads((folder / name).read_text(encoding="utf-8"))


def tiny_unet_config() -> dict:
    """UNet2DConditionModel kwargs: SDXL's structure at 2 levels, widths 32/64, text_time conditioning."""
    return dict(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
        addition_embed_type="text_time", addition_time_embed_dim=TINY_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TE2_PROJECTION + 6 * TINY_ADDITION_TIME_EMBED_DIM,
    )


def tiny_vae_config() -> dict:
    """AutoencoderKL kwargs: four levels (spatial factor 8) and SDXL's scaling factor."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=TINY_RESOLUTION, scaling_factor=0.13025,
    )


def tiny_text_encoder_config(second: bool) -> dict:
    """CLIPTextConfig kwargs mirroring SDXL's two configs (activation, eos_token_id=2 legacy pooling, 77 positions)."""
    hidden = TE2_HIDDEN if second else TE1_HIDDEN
    return dict(
        vocab_size=len(clip_vocab(TINY_MERGES)), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=3, num_attention_heads=4, projection_dim=TE2_PROJECTION if second else hidden,
        hidden_act="gelu" if second else "quick_gelu", max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
        pad_token_id=1,
    )


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny StableDiffusionXLPipeline with weights drawn from `seed`; the global torch RNG is forked (under a lock),
    so the caller's stream is undisturbed and a seed always gives the same weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(second=False)))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_text_encoder_config(second=True)))
    tokenizer, tokenizer_2 = (
        CLIPTokenizer(vocab=clip_vocab(TINY_MERGES), merges=list(TINY_MERGES), **_tokenizer_kwargs(name))
        for name in ("tokenizer", "tokenizer_2")
    )
    scheduler = EulerDiscreteScheduler.from_config(sdxl_asset_config("scheduler"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()
    return pipe


def _tokenizer_kwargs(name: str) -> dict:
    """The CLIPTokenizer arguments from SDXL's tokenizer_config.json `name` (special tokens, 77 max length)."""
    config = sdxl_asset_config(name)
    return {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length")}


def save_tiny_sdxl(pipe: StableDiffusionXLPipeline, folder: Path) -> None:
    """Save as a diffusers folder in SDXL's layout, tokenizers as vocab.json + merges.txt, so loading it reads the files
    a real SDXL download has. No config keeps `_name_or_path`: a pipeline read from a folder would write its path."""
    import json
    import shutil

    pipe.save_pretrained(folder, safe_serialization=True)
    for path in folder.rglob("*.json"):
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / name)
        write_clip_tokenizer(folder / name, TINY_MERGES, sdxl_asset_config(name))
