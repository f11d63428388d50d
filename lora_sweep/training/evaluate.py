"""What a training does between optimizer steps to make variants comparable: samples and validation loss.

Both draw only from their own seeded generators and restore every RNG, so turning them on or off does not change
the training (a test checks that the LoRA is bit-identical).
- Samples: the same prompts and seeds for every variant, at step 0, every `sampling.every` steps and at the end;
  logged as MLflow images (`sample_pNN`), a grid PNG, and image statistics (`img/...`).
- Validation: held-out images at fixed timesteps with fixed noise, plain epsilon MSE (no loss weighting, no noise
  offset), so `val/loss` measures fitting and overfitting the same way for every variant.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from lora_sweep.training import precision
from lora_sweep.training.noise import add_noise

log = logging.getLogger(__name__)


def split_validation(n_items: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation): a seeded choice of round(fraction * n) items, at least one, never all."""
    if fraction <= 0 or n_items < 2:
        return list(range(n_items)), []
    k = min(n_items - 1, max(1, round(fraction * n_items)))
    held_out = set(random.Random(seed).sample(range(n_items), k))
    return [i for i in range(n_items) if i not in held_out], sorted(held_out)


def due(step: int, every: int, final: bool) -> bool:
    return step == 0 or final or (every > 0 and step % every == 0)


@dataclass
class Sampler:
    """Draw the prompts with the current LoRA and log images, the grid and image metrics."""

    prompts: list

    @classmethod
    def from_config(cls, cfg, resolution: int) -> "Sampler | None":
        from lora_sweep.compare.prompts import load_prompts

        sc = cfg.sampling
        if not sc.prompts and not sc.prompt_file:
            return None
        specs = load_prompts(
            list(sc.prompts), prompt_file=sc.prompt_file, default_width=sc.width or resolution,
            default_height=sc.height or resolution, default_steps=sc.steps, default_cfg=sc.cfg,
            default_seed=sc.seed, default_negative=sc.negative,
        )
        return cls(specs)

    def __call__(self, s, step: int, final: bool) -> None:
        if not due(step, s.cfg.sampling.every, final):
            return
        from lora_sweep.compare.metrics import mean_metrics
        from lora_sweep.compare.sampling import log_samples, sample_images

        parts = s.parts  # sample_images brings encoders parked on the CPU to the UNet's device and back
        images = sample_images(
            unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder,
            text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2,
            prompts=self.prompts, autocast=lambda: precision.autocast(s.policy, s.device.type),
        )
        log_samples(images, self.prompts, step, sink=s.sink)
        s.sink.metrics(mean_metrics(images), step)


@dataclass
class Validator:
    """Fixed-timestep, fixed-noise epsilon MSE on held-out examples."""

    examples: list
    timesteps: list[int]
    seed: int

    @staticmethod
    def _text(s, example) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached embeddings, or the caption encoded as written (never shuffled: that would draw from `random`)."""
        if example.context is not None:
            return example.context.unsqueeze(0).to(s.device), example.pooled.unsqueeze(0).to(s.device)
        from lora_sweep.model.encode import encode_prompts

        return encode_prompts(s.parts, [example.item.caption])

    @torch.no_grad()
    def __call__(self, s, step: int, final: bool) -> None:
        if not self.examples or not due(step, s.cfg.validation.every, final):
            return
        unet, was_training = s.unet, s.unet.training
        unet.eval()
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        per_t: dict[int, list[float]] = {t: [] for t in self.timesteps}
        try:
            for example in self.examples:
                x0 = (example.latents * s.vae_scale).unsqueeze(0).to(s.device, s.policy.latent_dtype)
                context, pooled = self._text(s, example)
                for t in self.timesteps:
                    noise = torch.randn(x0.shape, generator=generator).to(s.device, x0.dtype)
                    timesteps = torch.tensor([t], device=s.device)
                    noisy = add_noise(x0, noise, timesteps, s.alphas_cumprod)
                    with precision.autocast(s.policy, s.device.type):
                        pred = unet(noisy, timesteps, context, added_cond_kwargs={
                            "text_embeds": pooled, "time_ids": example.time_ids.unsqueeze(0).to(s.device, pooled.dtype),
                        }).sample
                    per_t[t].append(float(torch.mean((pred.float() - noise.float()) ** 2)))
        finally:
            unet.train(was_training)
        metrics = {f"val/loss_t{t:03d}": sum(v) / len(v) for t, v in per_t.items()}
        metrics["val/loss"] = sum(metrics.values()) / len(metrics)
        s.sink.metrics(metrics, step)
