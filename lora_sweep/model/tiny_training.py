"""Train the tiny SDXL (model=tiny) on the synthetic world of `tiny_world`: seeded, CPU minutes, `make tiny-model`.

Stage 1 trains the VAE (wider than tiny_random's, SDXL's four levels and 4 latent channels) to reconstruct 32 px
crops (MSE of a near-deterministic posterior), then rescales its latents so that scaled by SDXL's 0.13025 they have
unit spread (folded into quant_conv / post_quant_conv: the decoder's output is unchanged). Stage 2 trains the U-Net to
predict the noise (eps) under kohya's DDPMScheduler, with SDXL's size conditioning, and the two text encoders with it
(10% empty captions, so guidance works). Stage 3 trains the VAE's decoder alone on whole scenes from the latents
stage 2 trained on (the encoder frozen: those latents stay, bit for bit). The weights start from
`initial_pipeline(config)`; every draw comes from generators seeded by `seed`. `measure` gives the figures recorded
beside the weights (docs/tiny-models.md)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_sweep.model.encode import VAE_SCALE_FACTOR, encode_prompts
from lora_sweep.model.tiny_sdxl import TINY_RESOLUTION, build_tiny_sdxl, save_tiny_sdxl, tiny_vae_config
from lora_sweep.model.tiny_world import scenes

CHUNK = 64  # scenes are drawn in chunks of this many, each from its own seed: the first steps need only chunk 0
TRAIN_SPLIT, HELD_OUT_SPLIT = 0, 1
FIRST_STEPS = 5  # losses recorded per stage, which tests/model/test_tiny_trained.py reruns
EVAL_TIMESTEPS = (100, 300, 500, 700, 900)  # validation.timesteps' default: the fit/loss yardstick


@dataclass
class TinyTrainingConfig:
    """Everything the weights depend on besides the code; recorded beside them."""

    seed: int = 0
    train_scenes: int = 2048
    held_out_scenes: int = 64
    vae_block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 64])  # tiny_random's: 8, 16, 32, 32
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 4
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32  # the VAE is fully convolutional: crops cost a quarter of whole scenes
    vae_lr: float = 1e-3
    vae_kl_weight: float = 0.0  # reconstruction alone: the rescale below sets the latents' spread
    vae_initial_logvar: float | None = -12.0  # a number: the posterior's log-variance starts there, the same everywhere
    decoder_steps: int = 6000  # stage 3: the decoder alone on whole scenes, the encoder (the U-Net's latents) frozen
    decoder_batch: int = 16
    decoder_lr: float = 5e-4
    decoder_l1_weight: float = 0.0  # an L1 term beside the MSE: sharper edges
    unet_steps: int = 1000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_encoder_lr: float = 1e-3  # 0: the text encoders stay as drawn; else they train with the U-Net
    warmup_steps: int = 20
    caption_dropout: float = 0.1
    eval_timesteps: list[int] = field(default_factory=lambda: list(EVAL_TIMESTEPS))


def initial_pipeline(config: TinyTrainingConfig) -> Any:
    """`build_tiny_sdxl(seed)` with the config's VAE widths (drawn from the same seed): where training starts."""
    from diffusers import AutoencoderKL

    pipe = build_tiny_sdxl(config.seed)
    widths = {"block_out_channels": tuple(config.vae_block_out_channels),
              "layers_per_block": config.vae_layers_per_block, "norm_num_groups": config.vae_norm_num_groups}
    if any(pipe.vae.config[key] != value for key, value in widths.items()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            pipe.vae = AutoencoderKL(**{**tiny_vae_config(), **widths}).eval()
    return pipe


class SceneStream:
    """The training (or held-out) scenes of a seed, drawn a chunk at a time on first use: images in [-1, 1] as
    (3, 64, 64) tensors, captions, and (once `encode` is set) latents and text embeddings per chunk."""

    def __init__(self, seed: int, split: int, total: int):
        self.seed, self.split, self.total = seed, split, total
        self._chunks: dict[int, dict[str, Any]] = {}
        self.encode: Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]] | None = None

    def chunk(self, k: int) -> dict[str, Any]:
        if k not in self._chunks:
            images, captions = scenes(CHUNK, [self.seed, self.split, k])
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
            self._chunks[k] = {"pixels": pixels, "captions": captions}
        found = self._chunks[k]
        if self.encode is not None and "latents" not in found:
            found.update(self.encode(found["pixels"], found["captions"]))
        return found

    def batch(self, step: int, size: int, keys: Sequence[str]) -> dict[str, Any]:
        """Batch `step`: the next `size` scenes in order, wrapping around after `total`."""
        rows = [(step * size + i) % self.total for i in range(size)]
        out: dict[str, Any] = {}
        for key in keys:
            items = [self.chunk(r // CHUNK)[key][r % CHUNK] for r in rows]
            out[key] = items if key == "captions" else torch.stack(items)
        return out

    def reset_encoded(self) -> None:
        for found in self._chunks.values():
            for key in ("latents", "latent_std"):
                found.pop(key, None)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth: the last steps settle the weights."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(vae: Any, stream: SceneStream, config: TinyTrainingConfig) -> Iterator[float]:
    """Stage 1, one loss per optimizer step: reconstruction MSE of a posterior sample plus a tiny KL."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.vae_initial_logvar is not None:
        # A near-zero posterior std from the start: the decoder learns from the means, not from noise over them.
        with torch.no_grad():
            vae.quant_conv.weight[vae.config.latent_channels :] = 0
            vae.quant_conv.bias[vae.config.latent_channels :] = config.vae_initial_logvar
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _lr_factor(step, config.vae_steps, config.warmup_steps)
        pixels = stream.batch(step, config.vae_batch, ["pixels"])["pixels"]
        top, left = torch.randint(0, TINY_RESOLUTION - config.vae_crop + 1, (2,), generator=generator).tolist()
        crop = pixels[:, :, top : top + config.vae_crop, left : left + config.vae_crop]
        posterior = vae.encode(crop).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, crop)
        loss = loss + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        yield float(loss.detach())
    vae.eval()


@torch.no_grad()
def rescale_latents(vae: Any, stream: SceneStream, chunks: int = 4) -> float:
    """Fold a factor c into the VAE so its posterior mean, times 0.13025, has unit standard deviation over the first
    `chunks` chunks; returns c. Decoding c * z with post_quant_conv / c gives the same image."""
    means = torch.cat([vae.encode(stream.chunk(k)["pixels"]).latent_dist.mean for k in range(chunks)])
    factor = 1.0 / (VAE_SCALE_FACTOR * float(means.std()))
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= factor
    vae.quant_conv.bias[:channels] *= factor
    vae.quant_conv.bias[channels:] += 2 * math.log(factor)  # logvar of c * z
    vae.post_quant_conv.weight /= factor
    return factor


def encoder_for(pipe: Any) -> Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]:
    """A chunk's posterior (mean, std) with the pipeline's VAE; the captions are encoded per batch (they may train)."""

    @torch.no_grad()
    def encode(pixels: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        posterior = pipe.vae.encode(pixels).latent_dist
        return {"latents": posterior.mean, "latent_std": posterior.std}

    return encode


def size_time_ids(batch: int) -> torch.Tensor:
    """SDXL's micro-conditioning as the trainer feeds it for a 64 px image: original 64x64, no crop, target 64x64."""
    return torch.tensor([TINY_RESOLUTION, TINY_RESOLUTION, 0, 0, TINY_RESOLUTION, TINY_RESOLUTION],
                        dtype=torch.float32).repeat(batch, 1)


def train_unet(pipe: Any, stream: SceneStream, config: TinyTrainingConfig) -> Iterator[float]:
    """Stage 2, one loss per optimizer step: eps-prediction MSE at t ~ U{0..999} under kohya's DDPMScheduler."""
    from lora_sweep.model.loading import kohya_noise_scheduler

    scheduler = kohya_noise_scheduler()
    generator = torch.Generator().manual_seed(config.seed + 1)
    unet, encoders = pipe.unet, [pipe.text_encoder, pipe.text_encoder_2]
    train_text = config.text_encoder_lr > 0
    groups = [{"params": list(unet.parameters()), "base_lr": config.unet_lr}]
    if train_text:
        groups.append({"params": [p for e in encoders for p in e.parameters()], "base_lr": config.text_encoder_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.unet_lr, weight_decay=0.01)
    for model in [unet, *encoders] if train_text else [unet]:
        model.train()
    for step in range(config.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * _lr_factor(step, config.unet_steps, config.warmup_steps)
        batch = stream.batch(step, config.unet_batch, ["latents", "latent_std", "captions"])
        size = config.unet_batch
        x0 = (batch["latents"] + batch["latent_std"] * torch.randn(batch["latents"].shape, generator=generator))
        x0 = x0 * VAE_SCALE_FACTOR
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=generator)
        dropped = (torch.rand(size, generator=generator) < config.caption_dropout).tolist()
        captions = ["" if drop else caption for drop, caption in zip(dropped, batch["captions"], strict=True)]
        context, pooled = encode_prompts(pipe, captions, train=train_text)
        pred = unet(scheduler.add_noise(x0, noise, timesteps), timesteps, context,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": size_time_ids(size)}).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        yield float(loss.detach())
    for model in [unet, *encoders]:
        model.eval()


def decoder_parameters(vae: Any) -> list[torch.nn.Parameter]:
    """What stage 3 trains: post_quant_conv and the decoder; the encoder and quant_conv (the latents) stay."""
    return [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]


def train_decoder(vae: Any, stream: SceneStream, config: TinyTrainingConfig) -> Iterator[float]:
    """Stage 3, one loss per optimizer step: the decoder reconstructs whole scenes from the posterior means the U-Net
    was trained on (`stream.encode` set), MSE plus `decoder_l1_weight` times L1; the encoder is not touched."""
    trained = decoder_parameters(vae)
    optimizer = torch.optim.AdamW(trained, lr=config.decoder_lr, weight_decay=0.0)
    vae.decoder.train()
    for step in range(config.decoder_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.decoder_lr * _lr_factor(step, config.decoder_steps, config.warmup_steps)
        batch = stream.batch(step, config.decoder_batch, ["pixels", "latents"])
        recon = vae.decode(batch["latents"]).sample
        loss = torch.nn.functional.mse_loss(recon, batch["pixels"])
        if config.decoder_l1_weight:
            loss = loss + config.decoder_l1_weight * torch.nn.functional.l1_loss(recon, batch["pixels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        yield float(loss.detach())
    vae.eval()


@torch.no_grad()
def psnr(vae: Any, pixels: torch.Tensor) -> float:
    """Mean per-image PSNR (dB, images in [0, 1]) of decode(posterior mean) against `pixels` in [-1, 1]."""
    recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((recon - pixels) / 2).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def noise_prediction_mse(pipe: Any, pixels: torch.Tensor, captions: list[str],
                         timesteps: Sequence[int] = EVAL_TIMESTEPS, seed: int = 0) -> dict[str, float]:
    """fit/loss as the trainer measures it: eps MSE at fixed timesteps with fixed noise (seeded), per image the
    posterior mean scaled by 0.13025, with its caption; {"mse": mean, "mse_t100": ..., ...}."""
    from lora_sweep.model.loading import kohya_noise_scheduler

    scheduler = kohya_noise_scheduler()
    generator = torch.Generator().manual_seed(seed)
    t = torch.tensor(list(timesteps))
    values = []
    for image, caption in zip(pixels, captions, strict=True):
        x0 = pipe.vae.encode(image[None]).latent_dist.mean * VAE_SCALE_FACTOR
        x0 = x0.expand(len(t), -1, -1, -1)
        noise = torch.randn(x0.shape, generator=generator)
        context, pooled = encode_prompts(pipe, [caption] * len(t))
        pred = pipe.unet(scheduler.add_noise(x0, noise, t), t, context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": size_time_ids(len(t))}).sample
        values.append((pred - noise).pow(2).mean(dim=(1, 2, 3)))
    table = torch.stack(values)
    return {"mse": float(table.mean()), **{f"mse_t{s:03d}": float(table[:, j].mean()) for j, s in enumerate(timesteps)}}


@torch.no_grad()
def samples(pipe: Any, captions: Sequence[str], seeds: Sequence[int], steps: int = 20,
            guidance: float = 5.0) -> np.ndarray:
    """(len(captions), len(seeds), 64, 64, 3) float images in [0, 1] from the pipeline's own sampler (Euler)."""
    negative, negative_pooled = encode_prompts(pipe, [""])  # the empty caption trained on, as kohya's samples use
    rows = []
    for caption in captions:
        context, pooled = encode_prompts(pipe, [caption])
        row = []
        for seed in seeds:
            out = pipe(prompt_embeds=context, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                       negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=steps,
                       guidance_scale=guidance, output_type="np", generator=torch.Generator().manual_seed(seed))
            row.append(out.images[0])
        rows.append(row)
    return np.asarray(rows, dtype=np.float32)


STEERING_PAIRS = (("red", "blue"), ("green", "purple"), ("yellow", "black"), ("orange", "cyan"), ("white", "brown"),
                  ("pink", "grey"))
STEERING_CAPTION = "on {1}, small {0} circle center"  # a small shape leaves the corners to the background
CORNER = 10  # pixels: the corners a small centred shape never reaches


def corner_colour(images: np.ndarray) -> np.ndarray:
    """(..., 64, 64, 3) -> (..., 3): the mean colour of the four CORNER x CORNER corners (the background's)."""
    corners = [images[..., rows, cols, :] for rows in (slice(0, CORNER), slice(-CORNER, None))
               for cols in (slice(0, CORNER), slice(-CORNER, None))]
    return np.mean([c.mean(axis=(-3, -2)) for c in corners], axis=0)


def caption_steering(pipe: Any, seeds: Sequence[int] = (0, 1, 2), pairs: Sequence[tuple[str, str]] = STEERING_PAIRS,
                     guidance: float = 5.0, steps: int = 20) -> dict[str, float]:
    """Do captions steer the samples? For caption pairs that differ only in the background colour ("on red" / "on
    blue"), at the same seeds: the share of samples whose corner colour is nearer the named colour than the pair's
    other (`background_hits`), and the mean |difference| between the pair's samples over that between seeds."""
    from lora_sweep.model.tiny_world import COLOURS

    pipe.set_progress_bar_config(disable=True)
    hits, across, within = [], [], []
    for first, second in pairs:
        shape = next(c for c in ("white", "black", "yellow") if c not in (first, second))
        images = samples(pipe, [STEERING_CAPTION.format(shape, first), STEERING_CAPTION.format(shape, second)], seeds,
                         steps=steps, guidance=guidance)
        named = np.array([COLOURS[first], COLOURS[second]])
        distance = np.linalg.norm(corner_colour(images)[..., None, :] - named[None, None], axis=-1)  # (2, seeds, 2)
        hits += [bool(distance[0, i, 0] < distance[0, i, 1]) for i in range(len(seeds))]
        hits += [bool(distance[1, i, 1] < distance[1, i, 0]) for i in range(len(seeds))]
        across += [float(np.abs(images[0, i] - images[1, i]).mean()) for i in range(len(seeds))]
        within += [float(np.abs(images[c, i] - images[c, j]).mean()) for c in range(2)
                   for i in range(len(seeds)) for j in range(i + 1, len(seeds))]
    seed_difference = float(np.mean(within)) if within else float("nan")  # one seed: no seed-to-seed difference
    return {"background_hits": float(np.mean(hits)), "samples": len(hits), "guidance": guidance,
            "caption_difference": float(np.mean(across)), "seed_difference": seed_difference,
            "caption_over_seed": float(np.mean(across)) / seed_difference}


def photo_pixels(photos: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) photos -> (N, 3, 64, 64) in [-1, 1]: shorter side to 64 px, centre crop."""
    from PIL import Image

    out = []
    for array in photos:
        image = Image.fromarray(array).convert("RGB")
        scale = TINY_RESOLUTION / min(image.size)
        image = image.resize((max(TINY_RESOLUTION, round(image.width * scale)),
                              max(TINY_RESOLUTION, round(image.height * scale))), Image.Resampling.LANCZOS)
        left, top = (image.width - TINY_RESOLUTION) // 2, (image.height - TINY_RESOLUTION) // 2
        image = image.crop((left, top, left + TINY_RESOLUTION, top + TINY_RESOLUTION))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(out)


def measure(pipe: Any, config: TinyTrainingConfig, photos: dict[str, tuple[np.ndarray, str]] | None = None,
            ) -> dict[str, Any]:
    """The recorded figures: held-out PSNR and fit MSE (the trained model and `build_tiny_sdxl(seed)`'s random one),
    the same on the demo `photos` (name -> (uint8 image, caption)), and the caption steering."""
    held_out = SceneStream(config.seed, HELD_OUT_SPLIT, config.held_out_scenes)
    pixels = torch.cat([held_out.chunk(k)["pixels"] for k in range(math.ceil(config.held_out_scenes / CHUNK))])
    captions = [c for k in range(math.ceil(config.held_out_scenes / CHUNK)) for c in held_out.chunk(k)["captions"]]
    pixels, captions = pixels[: config.held_out_scenes], captions[: config.held_out_scenes]
    figures: dict[str, Any] = {"held_out_scenes": len(captions), "vae_psnr_db": psnr(pipe.vae, pixels)}
    fit = noise_prediction_mse(pipe, pixels[:16], captions[:16], config.eval_timesteps)
    figures["fit_mse_held_out"] = fit
    figures["fit_mse_held_out_random_model"] = noise_prediction_mse(
        build_tiny_sdxl(config.seed), pixels[:16], captions[:16], config.eval_timesteps)
    if photos:
        photo_tensor = photo_pixels([image for image, _ in photos.values()])
        figures["vae_psnr_db_photos"] = psnr(pipe.vae, photo_tensor)
        figures["fit_mse_photos"] = noise_prediction_mse(
            pipe, photo_tensor, [caption for _, caption in photos.values()], config.eval_timesteps)
    figures["steering"] = caption_steering(pipe)
    return figures


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(config: TinyTrainingConfig, out: Path, photos: dict[str, tuple[np.ndarray, str]] | None = None,
          log: Callable[[str], None] = print, stages_from: Path | None = None) -> dict[str, Any]:
    """Train from `config`, save the diffusers folder `out` and `out`.json (the record: config, sha256 of each
    weight file, the first losses of each stage, the last losses, timings and `measure`'s figures); returns it.
    `stages_from`: a folder (and its .json) written by stages 1-2 of this seed: read, and stage 3 alone runs."""
    torch.manual_seed(config.seed)  # nothing below should draw from it; a fixed state in case a library does
    stream = SceneStream(config.seed, TRAIN_SPLIT, config.train_scenes)
    if stages_from is None:
        pipe = initial_pipeline(config)
        record, vae_losses, unet_losses = _stages_1_2(pipe, stream, config, log)
    else:
        pipe, record = _read_stages_1_2(stages_from, config)
    stream.encode = encoder_for(pipe)
    started = time.monotonic()
    decoder_losses = _run("decoder", train_decoder(pipe.vae, stream, config), config.decoder_steps, log)
    record["decoder_seconds"] = round(time.monotonic() - started, 1)
    if stages_from is None:
        record["first_losses"] = {"vae": vae_losses[:FIRST_STEPS], "unet": unet_losses[:FIRST_STEPS]}
        record["last_losses_mean"] = {"vae": float(np.mean(vae_losses[-50:])),
                                      "unet": float(np.mean(unet_losses[-50:]))}
    record["first_losses"]["decoder"] = decoder_losses[:FIRST_STEPS]
    record["last_losses_mean"]["decoder"] = float(np.mean(decoder_losses[-50:]))
    started = time.monotonic()
    record["figures"] = measure(pipe, config, photos)
    record["measure_seconds"] = round(time.monotonic() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_tiny_sdxl(pipe, out)
    for path in out.rglob("*.safetensors"):
        path.chmod(0o644)  # safetensors writes 0600; package data is read by everyone
    record["sha256"] = {p.relative_to(out).as_posix(): sha256(p) for p in sorted(out.rglob("*.safetensors"))}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _stages_1_2(pipe: Any, stream: SceneStream, config: TinyTrainingConfig,
                log: Callable[[str], None]) -> tuple[dict[str, Any], list[float], list[float]]:
    """Stage 1 (the VAE, then the latents' rescale) and stage 2 (the U-Net and text encoders) on `pipe`."""
    record: dict[str, Any] = {"config": asdict(config), "torch": torch.__version__}
    started = time.monotonic()
    vae_losses = _run("vae", train_vae(pipe.vae, stream, config), config.vae_steps, log)
    record["vae_seconds"] = round(time.monotonic() - started, 1)
    record["latent_factor"] = rescale_latents(pipe.vae, stream)
    stream.encode = encoder_for(pipe)
    started = time.monotonic()
    unet_losses = _run("unet", train_unet(pipe, stream, config), config.unet_steps, log)
    record["unet_seconds"] = round(time.monotonic() - started, 1)
    return record, vae_losses, unet_losses


def _read_stages_1_2(folder: Path, config: TinyTrainingConfig) -> tuple[Any, dict[str, Any]]:
    """The pipeline and record that stages 1-2 of `config` wrote to `folder`, checked to be those and no more."""
    from diffusers import StableDiffusionXLPipeline

    from lora_sweep.errors import UserError

    path, wanted = folder.with_suffix(".json"), asdict(config)
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    stage_keys = [k for k in wanted if not k.startswith("decoder_")]
    if (record is None or "decoder" in record["first_losses"]
            or any(record["config"].get(k) != wanted[k] for k in stage_keys)):
        raise UserError(f"--stages-from {folder}: it needs {path.name} beside it, the record of stages 1-2 of this "
                        "seed and config without stage 3 (first_losses without 'decoder'); or leave --stages-from "
                        "out to train all three stages.")
    record["config"] = asdict(config)
    record["stages_1_2_from"] = {"sha256": record.pop("sha256"), "torch": record["torch"]}
    record["torch"] = torch.__version__
    return StableDiffusionXLPipeline.from_pretrained(folder), record


def _run(stage: str, losses: Iterator[float], steps: int, log: Callable[[str], None]) -> list[float]:
    """Drain a stage's losses, logging every 50th step's running mean."""
    seen: list[float] = []
    started = time.monotonic()
    for step, loss in enumerate(losses):
        seen.append(loss)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"{stage} step {step + 1}/{steps}: loss {np.mean(seen[-50:]):.4f} "
                f"({time.monotonic() - started:.0f} s)")
    return seen
