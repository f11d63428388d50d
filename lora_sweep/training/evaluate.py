"""What a training does between optimizer steps to make variants comparable: samples, validation and fitting loss.

Each draws only from its own seeded generators and restores every mode it changes, so turning it on or off leaves
the LoRA bit-identical (tests/training/test_evaluate.py). At step 0, every `*.every` steps and at the end:
- samples: the same prompts and seeds for every variant (`sample_pNN` images, a grid, `img/...` statistics and the
  scorecard's img/copying, img/diversity, img/drift: sampling/scorecard.py);
- `val/loss` (held-out images) and `fit/loss` (`validation.fit_images` training images chosen with
  `validation.seed`): plain eps (or v) MSE at fixed timesteps with fixed noise, whatever the variant's loss, so
  every variant is measured on the same (image, t, eps) points. At the end: the per-point values
  (`evaluation/<prefix>_points.json`) and `fit/loss_auc`, `fit/steps_to_half` (`sampling.metrics.fitting_speed`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_sweep.training import precision
from lora_sweep.training.noise import add_noise, prediction_target, scale_cached_latents

log = logging.getLogger(__name__)


def split_validation(n_items: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation): a seeded choice of round(fraction * n) items, at least one, never all."""
    if fraction <= 0 or n_items < 2:
        return list(range(n_items)), []
    k = min(n_items - 1, max(1, round(fraction * n_items)))
    held_out = set(random.Random(seed).sample(range(n_items), k))
    return [i for i in range(n_items) if i not in held_out], sorted(held_out)


def split_training(reg: list[bool], fraction: float, seed: int) -> tuple[list[int], list[int], list[int]]:
    """(trained, fit candidates, held out): indices of a training's examples, `reg` flagging each regularization
    image. `split_validation` of the others (a reg image is never held out); trained = the kept ones and every reg
    image, in index order."""
    candidates = [i for i, is_reg in enumerate(reg) if not is_reg]
    kept, held_out = split_validation(len(candidates), fraction, seed)
    fit_candidates = [candidates[i] for i in kept]
    trained = sorted(fit_candidates + [i for i, is_reg in enumerate(reg) if is_reg])
    return trained, fit_candidates, [candidates[i] for i in held_out]


def fit_subset(train_indices: list[int], k: int, seed: int) -> list[int]:
    """The `fit/loss` images: k of the training examples chosen with `seed` (validation.seed), in index order; all when
    there are fewer. Never touches train.seed's RNG."""
    ordered = sorted(train_indices)
    if k <= 0:
        return []
    if k >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, k))


def image_id(example) -> str:
    """A point's image, as the report names it: '<subfolder>/<file name>'."""
    path = example.item.path
    return f"{path.parent.name}/{path.name}"


def due(step: int, every: int, final: bool) -> bool:
    return step == 0 or final or (every > 0 and step % every == 0)


def read_prompts(cfg) -> tuple[list, list[str], list]:
    """`sampling.prompts` and `sampling.prompt_file` as the Sampler draws them: `check_prompts`' (specs, problems,
    fallbacks) with the sampling group's defaults (width/height: sampling.width/height, else the shorter side of
    data.resolution), each prompt at every seed of `sampling.seeds` (`prompts.at_seeds`, prompt-major; [] is
    [sampling.seed]); nothing when neither is set."""
    from lora_sweep.data.buckets import parse_resolution
    from lora_sweep.sampling.prompts import at_seeds, check_prompts

    sc = cfg.sampling
    if not sc.prompts and not sc.prompt_file:
        return [], [], []
    side = min(parse_resolution(cfg.data.resolution))
    seeds = list(sc.seeds) or [sc.seed]

    def parsed(default_seed: int):
        return check_prompts(
            list(sc.prompts), prompt_file=sc.prompt_file, default_width=sc.width or side,
            default_height=sc.height or side, default_steps=sc.steps, default_cfg=sc.cfg, default_seed=default_seed,
            default_negative=sc.negative, default_sampler=sc.sampler,
        )

    specs, problems, fallbacks = parsed(seeds[0])
    if len(seeds) > 1 and not problems:
        specs = at_seeds(specs, parsed(seeds[0] + 1)[0], seeds)
    return specs, problems, fallbacks


def n_seeds(cfg) -> int:
    """Samples per prompt line: the length of `sampling.seeds`, at least 1."""
    return max(1, len(cfg.sampling.seeds))


STEP0_FOLDER = "samples-step0"  # in a run's state folder: its step-0 samples as PNGs, what img/drift compares with


def embedding_scorer(cfg, training: list[Path]):
    """The scorer of img/clip_t, img/clip_i and img/dino (evaluation.clip_model, evaluation.dino_model) against the
    `training` image files (`training_images`: those compare --score finds too). Their embeddings are cached under
    the cache root, keyed by the model folder's and the images' content: each dataset is embedded once per model."""
    from lora_sweep.data.cache import TensorCache
    from lora_sweep.data.cache_keys import cache_key
    from lora_sweep.paths import cache_root
    from lora_sweep.sampling.embeddings import EmbeddingScorer

    cache = TensorCache(cache_root(cfg))

    def cached(kind, model, paths, compute) -> torch.Tensor:
        key = cache_key(embedder=kind, model=cache.model_identity(model),
                        images=[cache.file_sha256(path) for path in paths])
        return cache.get_or_compute("embeddings", key, lambda: {"embeddings": compute()})["embeddings"]

    return EmbeddingScorer(cfg.evaluation.clip_model, cfg.evaluation.dino_model, list(training), cached)


@dataclass
class Sampler:
    """Draw the prompts with the current LoRA and log images, the grid, image statistics and the scorecard's pixel
    metrics (sampling/scorecard.py). `training`: the training image files img/copying compares with. `kept`: the
    folder where this run keeps its step-0 samples (its states' folder / STEP0_FOLDER; None: in memory only);
    `found`: where a resumed run finds them (the resumed state's folder), so its img/drift is an unbroken run's."""

    prompts: list
    training: list = field(default_factory=list)
    kept: Path | None = None
    found: Path | None = None
    _training_thumbs: list | None = field(default=None, repr=False)
    _reference: dict | None = field(default=None, repr=False)
    _embeddings: Any = field(default=None, repr=False)  # sampling.embeddings.EmbeddingScorer, made at first use

    def __call__(self, s, step: int, final: bool) -> bool:
        """Sample if due at `step`; False if a stop request cut the sampling short (then nothing is logged)."""
        if not due(step, s.cfg.sampling.every, final):
            return True
        from lora_sweep.sampling.images import log_samples, sample_images
        from lora_sweep.sampling.metrics import mean_metrics

        parts = s.parts  # sample_images brings encoders parked on the CPU to the UNet's device and back
        images = sample_images(
            unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder,
            text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2,
            prompts=self.prompts, autocast=lambda: precision.autocast(s.policy, s.device.type),
            label=f"step {step}",
            should_stop=s.should_stop, v_prediction=s.v_prediction, n_seeds=n_seeds(s.cfg),
        )
        if len(images) < len(self.prompts):
            log.info("sampling at step %d stopped after %d of %d prompts (stop requested): not logged", step,
                     len(images), len(self.prompts))
            return False
        log_samples(images, self.prompts, step, sink=s.sink, n_seeds=n_seeds(s.cfg))
        s.sink.metrics(mean_metrics(images) | self.scores(s.cfg, step, images) | self.likeness(s, images, final), step)
        return True

    def likeness(self, s, images: list, final: bool) -> dict[str, float]:
        """img/clip_t, img/clip_i and img/dino of `images` when evaluation.* names weights folders; the models are
        freed after the final step's."""
        if self._embeddings is None:
            self._embeddings = embedding_scorer(s.cfg, self.training)
        if not self._embeddings.active:
            return {}
        metrics = self._embeddings(images, [p.prompt for p in self.prompts], s.device)
        if final:
            self._embeddings.close()
        return metrics

    def scores(self, cfg, step: int, images: list) -> dict[str, float]:
        """The scorecard's pixel metrics of this step's `images`; at step 0 they become img/drift's reference."""
        from lora_sweep.sampling import scorecard
        from lora_sweep.sampling.images import sample_keys, seed_groups

        n = n_seeds(cfg)
        samples = scorecard.StepSamples(step, sample_keys(self.prompts, n), list(images),
                                        [p.prompt for p in self.prompts], seed_groups(len(images), n))
        if self._training_thumbs is None:
            self._training_thumbs = scorecard.training_thumbnails(self.training)
        if step == 0:
            self._keep(dict(zip(samples.keys, images, strict=True)), write=True)
        return scorecard.pixel_scores(samples, self._training_thumbs, self._references(samples.keys))

    def _keep(self, images: dict, *, write: bool) -> None:
        """Hold `images` (step 0's, by key) as drift's reference; `write`: also to `kept` (PNG: lossless)."""
        from lora_sweep.sampling.scorecard import thumbnail

        self._reference = {key: thumbnail(image) for key, image in images.items()}
        if write and self.kept is not None:
            self.kept.mkdir(parents=True, exist_ok=True)
            for key, image in images.items():
                image.save(self.kept / f"{key}.png")

    def _references(self, keys: list[str]) -> dict:
        """The step-0 thumbnails: this process's, else read back from `found` or `kept` (a resumed run; copied into
        `kept` when read from another run's folder); {} when none was kept, said once."""
        if self._reference is not None:
            return self._reference
        from PIL import Image

        folder = next((f for f in (self.found, self.kept) if f is not None and f.is_dir()), None)
        paths = {key: folder / f"{key}.png" for key in keys} if folder is not None else {}
        loaded = {}
        for key, path in paths.items():
            if path.is_file():
                with Image.open(path) as image:
                    loaded[key] = image.copy()
        if not loaded:
            log.info("img/drift not logged: this process did not sample step 0 and found no kept step-0 samples (%s)",
                     self.found or self.kept or "no state folder")
        self._keep(loaded, write=bool(loaded) and folder != self.kept)
        return self._reference


def training_images(data) -> list[Path]:
    """The training image files (regularization images left out) as the dataset scan lists them: img/copying's."""
    return [item.path for scan in data.scans for item in scan.items if not (item.subset and item.subset.is_reg)]


def keep_step0_samples(s, states) -> None:
    """Point the Sampler at the state folder (train.StateTarget `states`) where step-0 samples are kept and, when
    resuming, at the resumed state's folder where they were kept."""
    for hook in s.hooks:
        if isinstance(hook, Sampler) and states is not None:
            hook.kept = Path(states.folder) / STEP0_FOLDER
            hook.found = Path(states.resume_from).parent / STEP0_FOLDER if states.resume_from else None


@dataclass
class Validator:
    """Fixed-timestep, fixed-noise MSE over fixed examples, logged as `<prefix>/loss` and `<prefix>/loss_tNNN` ("val":
    held-out examples; "fit": a fixed subset of the training ones). Noise: drawn once on the CPU from a generator
    seeded with `seed`, in example order, noise[i] of shape (len(timesteps), C, h, w) float32. Each example's
    timesteps are one UNet batch, in eval mode, without gradients."""

    examples: list
    timesteps: list[int]
    seed: int
    prefix: str = "val"
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, <prefix>/loss) seen by this process
    _noise: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def noise(self) -> list[torch.Tensor]:
        if self._noise is None:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            self._noise = [torch.randn((len(self.timesteps), *e.latents.shape), generator=generator)
                           for e in self.examples]
        return self._noise

    @staticmethod
    def _text(s, example) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached embeddings, or the caption encoded as written (never shuffled: that would draw from `random`)."""
        if example.context is not None:
            return example.context.unsqueeze(0).to(s.device), example.pooled.unsqueeze(0).to(s.device)
        from lora_sweep.model.encode import encode_prompts

        return encode_prompts(s.parts, [example.item.caption], max_token_length=s.cfg.data.max_token_length)

    @torch.no_grad()
    def point_losses(self, s, step: int | None = None) -> torch.Tensor | None:
        """(len(examples), len(timesteps)) float64 on the CPU: each point's mean over latent channels and pixels of
        (prediction - target)^2, target eps (v for model.v_prediction). None after a stop request."""
        from lora_sweep.progress import Progress

        modules = [m for m in (s.unet, s.parts.text_encoder, s.parts.text_encoder_2) if m is not None]
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()  # no dropout draws: the training RNG is not touched
        rows, n = [], len(self.timesteps)
        at = "" if step is None else f" at step {step}"
        shown = Progress(f"{self.prefix}/loss{at}: {len(self.examples)} images x {n} timesteps", len(self.examples),
                         "image", leave=False, announce=False)  # each validation: lines only when it runs long
        try:
            timesteps = torch.tensor(self.timesteps, device=s.device)
            for example, noise in zip(self.examples, self.noise, strict=True):
                if s.should_stop():
                    return None
                x0 = scale_cached_latents(example.latents.unsqueeze(0).to(s.device), s.vae_scale,
                                          s.policy.latent_dtype).expand(n, *example.latents.shape)
                eps = noise.to(s.device, x0.dtype)
                context, pooled = self._text(s, example)
                pred = s.unet_forward(add_noise(x0, eps, timesteps, s.alphas_cumprod), timesteps,
                                      context.repeat(n, 1, 1), pooled.repeat(n, 1),
                                      example.time_ids.unsqueeze(0).to(s.device).repeat(n, 1))
                target = prediction_target(x0, eps, timesteps, s.alphas_cumprod, s.v_prediction)
                rows.append(((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).double().cpu())
                shown.update()
        finally:
            shown.close()
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)
        return torch.stack(rows)

    def __call__(self, s, step: int, final: bool) -> bool:
        """Measure if due at `step`; False if a stop request cut it short (then nothing is logged)."""
        if not self.examples or not due(step, s.cfg.validation.every, final):
            return True
        values = self.point_losses(s, step)
        if values is None:
            return False
        p = self.prefix
        metrics = {f"{p}/loss_t{t:03d}": float(values[:, j].mean()) for j, t in enumerate(self.timesteps)}
        metrics[f"{p}/loss"] = float(values.mean())
        self.history.append((step, metrics[f"{p}/loss"]))
        if final:
            self._write_points(s, step, values)
            if p == "fit":
                metrics |= self._fitting_speed()
        s.sink.metrics(metrics, step)
        return True

    def _fitting_speed(self) -> dict[str, float]:
        """fit/loss_auc and fit/steps_to_half from this process's curve; nothing when it does not start at step 0
        (resumed: the report computes them from the whole history)."""
        from lora_sweep.sampling.metrics import fitting_speed

        if not self.history or self.history[0][0] != 0:
            log.info("fit/loss_auc and fit/steps_to_half not logged: this process saw the fit/loss curve only from "
                     "step %s (resumed); the report computes them from the run's whole history",
                     self.history[0][0] if self.history else "-")
            return {}
        speed = fitting_speed(self.history)
        if speed is None:
            return {}
        out = {"fit/loss_auc": speed.loss_auc}
        if speed.steps_to_half is not None:
            out["fit/steps_to_half"] = speed.steps_to_half
        else:
            log.info("fit/steps_to_half not logged: %s", speed.why_none)
        return out

    def _write_points(self, s, step: int, values: torch.Tensor) -> None:
        """`<output_dir>/evaluation/<prefix>_points.json`, also logged to the run under `evaluation/`."""
        from lora_sweep.atomic import write_text

        points = [{"image": image_id(e), "t": t, "value": float(values[i, j])}
                  for i, e in enumerate(self.examples) for j, t in enumerate(self.timesteps)]
        payload = {"metric": f"{self.prefix}/loss", "step": step, "seed": self.seed,
                   "target": "v" if s.v_prediction else "eps", "points": points}
        path = write_text(s.output_dir / "evaluation" / f"{self.prefix}_points.json", json.dumps(payload, indent=1))
        s.sink.artifact(path, "evaluation")
