"""Sample images with the LoRA being trained, drawn the same way for every variant and step so they compare:

- each prompt's seed seeds its own CPU `torch.Generator` (the same noise on every device);
- SDXL base's Euler, or the prompt's kohya sampler (`sampling.sampler`, `--ss`; sampling/schedulers.py), a fresh
  scheduler per prompt as v0.8.7 builds one; CFG and a negative prompt, size conditioning original = target = (h, w),
  crop (0, 0);
- torch (CPU, CUDA), numpy and `random` RNG states are restored after, and module modes too (kohya restores only
  torch's), so sampling does not change the training;
- prompts are encoded as kohya's SDXL sampling encodes them (`sampling.emphasis`): A1111 emphasis, up to 225 tokens;
  an empty negative prompt is encoded as the empty text, as kohya does (not zeros).

`log_samples` logs one MLflow image per sample (`sample_pNN`; `sample_pNN_sSEED` with several seeds) at the step
and a grid PNG per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import numpy as np
from PIL import Image, ImageDraw

from lora_sweep.sampling.fonts import default_font, label_font
from lora_sweep.sampling.prompts import PromptSpec

log = logging.getLogger(__name__)

@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore torch CPU, all CUDA devices', numpy's and Python's RNG states on exit, whatever ran inside: a run with
    sampling trains exactly as one without."""
    import torch

    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def modules_on(device, *modules) -> Iterator[None]:
    """Move the modules that live elsewhere (e.g. encoders parked on the CPU) to `device` for the duration, and back
    after: the pipeline computes every stage on one device."""
    moved = []
    for module in modules:
        home = next(module.parameters()).device
        if home != device:
            module.to(device)
            moved.append((module, home))
    try:
        yield
    finally:
        for module, home in moved:
            module.to(home)


def build_pipeline(*, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2):
    """An SDXL pipeline around the training modules themselves (LoRA included, no copies) with SDXL base's Euler (each
    prompt sets its own scheduler); no watermarker (it would change the pixels the metrics measure)."""
    from diffusers import StableDiffusionXLPipeline

    from lora_sweep.sampling.schedulers import build_scheduler

    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=build_scheduler(None),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_images(
    *,
    unet,
    vae,
    text_encoder,
    text_encoder_2,
    tokenizer,
    tokenizer_2,
    prompts: Sequence[PromptSpec],
    autocast: Callable[[], AbstractContextManager] | None = None,
    label: str = "",
    should_stop: Callable[[], bool] | None = None,
    v_prediction: bool = False,
    n_seeds: int = 1,
) -> list[Image.Image]:
    """One image per prompt with the current (LoRA-equipped) UNet, leaving training state as found.

    `unet`: the unwrapped module; the VAE and text encoders move to its device for the call. `autocast`: a factory of
    the training precision's autocast context (fp8/fp16 base weights, mixed dtypes). `should_stop`: asked before each
    prompt and after each denoising step; once True, the finished images are returned (fewer than `prompts`). Logs
    one line of every prompt's size and steps, then a `Progress` over all denoising steps (a bar that leaves no line
    behind on a terminal). `v_prediction`: the model's target, as kohya's samplers take it (SDXL base's Euler keeps
    epsilon, as before). `n_seeds`: samples per prompt line (`sampling.seeds`), for the log line.
    """
    pipeline = build_pipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
    )
    device = next(unet.parameters()).device
    with preserved_rng_state(), modules_on(device, vae, text_encoder, text_encoder_2), \
            _in_eval_mode(unet, vae, text_encoder, text_encoder_2):
        log.info("sampling%s: %s", f" at {label}" if label else "", sampling_line(prompts, n_seeds))
        return _draw_all(pipeline, prompts, autocast=autocast, label=label, should_stop=should_stop,
                         v_prediction=v_prediction)


@contextlib.contextmanager
def _in_eval_mode(*modules) -> Iterator[None]:
    """eval() for the duration, then each module's own mode back (text encoders train too when their LoRA does)."""
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, was_training, strict=True):
            module.train(mode)


def _draw_all(pipeline, prompts: Sequence[PromptSpec], *, autocast, label: str,
              should_stop: Callable[[], bool] | None, v_prediction: bool) -> list[Image.Image]:
    """One image per prompt, each with a fresh scheduler of its sampler, under a `Progress` over all their denoising
    steps; once `should_stop` answers True, the image under way is dropped and the finished ones are returned."""
    from lora_sweep.progress import Progress
    from lora_sweep.sampling.schedulers import build_scheduler

    bar = Progress(f"sampling{f' at {label}' if label else ''}", sum(p.steps for p in prompts), "step", leave=False,
                   announce=False)  # sample_images' line names the prompts
    stop_check = _stop_check(should_stop) if should_stop is not None else None

    def advance(pipe, step, timestep, tensors):  # diffusers' callback_on_step_end: after each denoising step
        bar.update(1)
        return stop_check(pipe, step, timestep, tensors) if stop_check is not None else tensors

    images: list[Image.Image] = []
    try:
        for index, spec in enumerate(prompts):
            if should_stop is not None and should_stop():
                break
            bar.describe(f"prompt {index + 1}/{len(prompts)}, {spec.width}x{spec.height}")
            pipeline.scheduler = build_scheduler(spec.sampler, v_prediction=v_prediction)
            with autocast() if autocast is not None else contextlib.nullcontext(), _says_prompt(
                    index, len(prompts), spec):
                images.append(_draw(pipeline, spec, advance))
    except _Stopped:
        pass
    finally:
        bar.close()
    return images


def _draw(pipeline, spec: PromptSpec, callback) -> Image.Image:
    """`spec`'s image: its prompts encoded as kohya's sampling encodes them, noise from its seed's CPU generator, SDXL's
    size conditioning original = target = (h, w)."""
    import torch

    from lora_sweep.sampling.emphasis import encode_sample_prompt

    size = (spec.height, spec.width)
    embeddings = encode_sample_prompt(
        tokenizer=pipeline.tokenizer, tokenizer_2=pipeline.tokenizer_2, text_encoder=pipeline.text_encoder,
        text_encoder_2=pipeline.text_encoder_2, prompt=spec.prompt, negative=spec.negative,
        guidance=spec.cfg > 1, where=spec.where,
    )
    output = pipeline(
        **embeddings,
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.cfg,
        generator=torch.Generator(device="cpu").manual_seed(spec.seed),
        original_size=size,
        target_size=size,
        crops_coords_top_left=(0, 0),
        output_type="pil",
        callback_on_step_end=callback,
    )
    return output.images[0]


@contextlib.contextmanager
def _says_prompt(index: int, count: int, spec: PromptSpec):
    """An out-of-memory error while drawing `spec` becomes a `SamplingOutOfMemory` naming the prompt, size and steps, so
    the run's failure blames the sample (training.failures)."""
    from lora_sweep.errors import SamplingOutOfMemory, is_out_of_memory

    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc) or isinstance(exc, SamplingOutOfMemory):
            raise
        where = spec.where or f"sampling.prompts[{index}]"
        raise SamplingOutOfMemory(index, count, where, spec.width, spec.height, spec.steps) from exc


class _Stopped(Exception):
    """Raised out of the pipeline's denoising loop by `_stop_check`."""


def _stop_check(should_stop: Callable[[], bool]):
    """A diffusers `callback_on_step_end` that raises `_Stopped` once a stop is requested (one 1024 px image can take
    minutes on a CPU)."""

    def check(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        if should_stop():
            raise _Stopped
        return callback_kwargs

    return check


def grid_layout(prompts: Sequence[PromptSpec]) -> list[list[int | None]]:
    """Sample indices as rows = distinct prompts, columns = that prompt's seeds in file order (one row when each prompt
    has one seed); short rows padded with None."""
    rows: dict[PromptSpec, list[int]] = {}
    for index, spec in enumerate(prompts):
        rows.setdefault(dataclasses.replace(spec, seed=0), []).append(index)
    width = max((len(row) for row in rows.values()), default=0)
    if width == 1:
        return [[row[0] for row in rows.values()]]
    return [row + [None] * (width - len(row)) for row in rows.values()]


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `max_width` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def make_grid(
    images: Sequence[Image.Image | None],
    rows: int,
    cols: int,
    labels: Sequence[str] | None = None,
    *,
    caption: str = "",
    padding: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Paste `images` (row-major; None = empty cell) into a rows x cols grid, labels underneath (shortened to the cell,
    each in a font that has its glyphs: sampling/fonts.py), `caption` in a line below the grid; cells take the largest
    image's size, smaller ones centred."""
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    present = [image for image in images if image is not None]
    cell_w = max((image.width for image in present), default=64)
    cell_h = max((image.height for image in present), default=64)
    font_size = max(10, min(18, cell_w // 14))
    label_h = font_size + 6 if labels else 0
    caption_h = font_size + 6 if caption else 0
    grid = Image.new("RGB", (cols * (cell_w + padding) + padding,
                             rows * (cell_h + label_h + padding) + padding + caption_h), background)
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        x = padding + col * (cell_w + padding)
        y = padding + row * (cell_h + label_h + padding)
        if image is not None:
            grid.paste(image.convert("RGB"), (x + (cell_w - image.width) // 2, y + (cell_h - image.height) // 2))
        if labels and index < len(labels) and labels[index]:
            font = label_font(labels[index], font_size) or default_font(font_size)
            draw.text((x, y + cell_h + 2), _fit(draw, labels[index], font, cell_w), fill=(0, 0, 0), font=font)
    if caption:
        font = default_font(font_size)
        draw.text((padding, grid.height - caption_h), _fit(draw, caption, font, grid.width - 2 * padding),
                  fill=(90, 90, 90), font=font)
    return grid


def prompts_grid(images: Sequence[Image.Image], prompts: Sequence[PromptSpec], n_seeds: int = 1) -> Image.Image:
    """The per-step grid: prompts x seeds (see `grid_layout`), each cell labelled with prompt index, seed and the
    prompt's first words, in a font that has their glyphs (CJK needs one installed: sampling/fonts.py); where no font
    here has them, only `p00 s42`, and the grid's caption says which prompts and where their text is (the step's
    `samples/prompts.json`). `n_seeds`: samples per prompt line (`sampling.seeds`), each labelled with its line."""
    layout = grid_layout(prompts)
    n = max(1, n_seeds)
    cells = [images[i] if i is not None else None for row in layout for i in row]
    unlabelled: list[str] = []

    def label(i: int) -> str:
        text = prompts[i].label(i // n)
        if label_font(text, 10) is not None:
            return text
        if f"p{i // n:02d}" not in unlabelled:
            unlabelled.append(f"p{i // n:02d}")
        return text.split(":", 1)[0]

    labels = [label(i) if i is not None else "" for row in layout for i in row]
    caption = (f"{', '.join(unlabelled)}: labelled by number (no font on this machine draws the prompt's "
               "characters); the prompts are in samples/prompts.json") if unlabelled else ""
    return make_grid(cells, rows=len(layout), cols=len(layout[0]) if layout else 0, labels=labels, caption=caption)


def sample_key(prompt_index: int, seed: int | None = None) -> str:
    """The MLflow image key of a prompt's samples, `sample_pNN`, or `sample_pNN_sSEED` when the prompt is drawn at
    several seeds (`sampling.seeds`); the report reads images back by this key."""
    return f"sample_p{prompt_index:02d}" + (f"_s{seed}" if seed is not None else "")


def sampling_line(prompts: Sequence[PromptSpec], n_seeds: int = 1) -> str:
    """'2 prompts, p00 64x64 2 steps, p01 64x64 2 steps'; with `sampling.seeds`, prompt lines and seeds counted apart:
    '1 prompt x 2 seeds, p00_s1 64x64 2 steps, p00_s2 64x64 2 steps' (each sample named as its key)."""
    keys = [key.removeprefix("sample_") for key in sample_keys(prompts, n_seeds)]
    sizes = ", ".join(f"{key} {p.width}x{p.height} {p.steps} steps{f' {p.sampler}' if p.sampler else ''}"
                      for key, p in zip(keys, prompts, strict=True))
    lines = len(seed_groups(len(prompts), n_seeds))
    count = f"{lines} prompt{'s' * (lines != 1)}" + (f" x {n_seeds} seeds" if n_seeds > 1 else "")
    return f"{count}, {sizes}"


def sample_keys(prompts: Sequence[PromptSpec], n_seeds: int = 1) -> list[str]:
    """Each sample's key: prompts are prompt-major, `n_seeds` samples per prompt line (`sampling.seeds`)."""
    if n_seeds <= 1:
        return [sample_key(i) for i in range(len(prompts))]
    return [sample_key(i // n_seeds, spec.seed) for i, spec in enumerate(prompts)]


def seed_groups(count: int, n_seeds: int = 1) -> list[list[int]]:
    """The sample indices of each prompt line: its `n_seeds` consecutive samples."""
    n = max(1, n_seeds)
    return [list(range(start, min(start + n, count))) for start in range(0, count, n)]


def log_samples(
    images: Sequence[Image.Image],
    prompts: Sequence[PromptSpec],
    step: int,
    *,
    client=None,
    run_id: str | None = None,
    sink=None,
    n_seeds: int = 1,
) -> None:
    """Log a sampling step: each image under its key (`sample_keys`) at `step`, the step's grid PNG and
    `samples/prompts.json` (the specs, for the report's column titles; each with its "key" when `n_seeds` > 1). To
    `sink` (its `image` and `artifact`; the file is copied when `artifact` returns), else `client`/`run_id`, else the
    active MLflow run."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    grid = prompts_grid(images, prompts, n_seeds)
    keys = sample_keys(prompts, n_seeds)
    specs = [dataclasses.asdict(spec) | ({"key": key} if n_seeds > 1 else {})
             for spec, key in zip(prompts, keys, strict=True)]
    if sink is not None:
        import json
        import tempfile
        from pathlib import Path

        for key, image in zip(keys, images, strict=True):
            sink.image(image, key, int(step))
        with tempfile.TemporaryDirectory(prefix="lora_sweep_samples_") as folder:
            grid_path = Path(folder) / f"grid_step{int(step):06d}.png"
            grid.save(grid_path)
            specs_path = Path(folder) / "prompts.json"
            specs_path.write_text(json.dumps(specs, indent=1, ensure_ascii=False), encoding="utf-8")
            sink.artifact(grid_path, "samples")
            sink.artifact(specs_path, "samples")
        return
    import mlflow

    if client is None:
        client = mlflow.MlflowClient()
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("log_samples needs sink=, run_id= or an active MLflow run")
        run_id = active.info.run_id
    for key, image in zip(keys, images, strict=True):
        client.log_image(run_id, image, key=key, step=int(step))
    client.log_image(run_id, grid, artifact_file=f"samples/grid_step{int(step):06d}.png")
    client.log_dict(run_id, specs, "samples/prompts.json")
