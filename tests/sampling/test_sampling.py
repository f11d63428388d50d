"""Sampling with the tiny SDXL and a real PEFT LoRA: fixed noise per prompt, training state untouched, MLflow logs."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GridCells, RecordingSink, new_store
from PIL import Image

from lora_sweep.sampling.images import (
    grid_layout,
    log_samples,
    make_grid,
    preserved_rng_state,
    prompts_grid,
    sample_images,
)
from lora_sweep.sampling.prompts import PromptSpec
from lora_sweep.sampling.schedulers import SDXL_EULER_CONFIG

SPECS = [
    PromptSpec("a photo of a cat", width=64, height=64, seed=1, steps=3, cfg=5.0),
    PromptSpec("a photo of a dog", negative="blurry", width=64, height=64, seed=2, steps=3, cfg=5.0),
]


@pytest.fixture(scope="module")
def pipe():
    """The tiny SDXL with a LoRA on kohya's UNet targets, its up-weights made non-zero so it changes the output."""
    from lora_sweep.model.network import UNET_TARGETS, add_lora, lora_parameters
    from lora_sweep.model.tiny_sdxl import build_tiny_sdxl

    pipeline = build_tiny_sdxl(seed=0)
    add_lora(pipeline.unet, rank=4, alpha=4, targets=UNET_TARGETS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in lora_parameters(pipeline.unet):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return pipeline


def draw(pipeline, specs=SPECS, **kwargs) -> list[np.ndarray]:
    images = sample_images(
        unet=pipeline.unet, vae=pipeline.vae, text_encoder=pipeline.text_encoder,
        text_encoder_2=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer, tokenizer_2=pipeline.tokenizer_2,
        prompts=specs, **kwargs,
    )
    assert all(isinstance(image, Image.Image) and image.size == (64, 64) for image in images)
    return [np.asarray(image) for image in images]


def test_same_seed_same_image_and_seed_matters(pipe):
    first, second = draw(pipe), draw(pipe)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    reseeded = draw(pipe, [SPECS[0], PromptSpec(**{**SPECS[0].__dict__, "seed": 99})])
    assert not np.array_equal(reseeded[0], reseeded[1])


def test_a_prompts_kohya_sampler_draws_with_it(pipe):
    import dataclasses

    specs = [SPECS[0], dataclasses.replace(SPECS[0], sampler="euler"), dataclasses.replace(SPECS[0], sampler="heun")]
    base, kohya_euler, heun = draw(pipe, specs)
    assert not np.array_equal(base, kohya_euler)  # kohya's Euler spaces the timesteps "linspace", SDXL's "leading"
    assert not np.array_equal(kohya_euler, heun)


def test_lora_weights_change_the_samples(pipe):
    from lora_sweep.model.network import lora_parameters

    before = draw(pipe, SPECS[:1])[0]
    saved = [p.detach().clone() for p in lora_parameters(pipe.unet)]
    try:
        with torch.no_grad():
            for parameter in lora_parameters(pipe.unet):
                parameter.mul_(2.0)
        after = draw(pipe, SPECS[:1])[0]
    finally:
        with torch.no_grad():
            for parameter, value in zip(lora_parameters(pipe.unet), saved, strict=True):
                parameter.copy_(value)
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 1.0


def test_training_rng_streams_and_mode_are_restored(pipe):
    def noisy_autocast():
        # Something inside sampling that draws from every global generator, as a sampler or a hook might.
        torch.rand(3), np.random.rand(3), random.random()
        return torch.autocast("cpu", enabled=False)

    def next_draws():
        return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]

    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = next_draws()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    pipe.unet.train(), pipe.text_encoder.train()
    draw(pipe, SPECS[:1], autocast=noisy_autocast)
    assert pipe.unet.training and pipe.text_encoder.training and not pipe.vae.training  # modes as they were
    assert next_draws() == expected
    pipe.unet.eval(), pipe.text_encoder.eval()
    draw(pipe, SPECS[:1])
    assert not pipe.unet.training and not pipe.text_encoder.training


def test_kohyas_dropouts_are_off_while_sampling_and_on_again_after(pipe):
    """Samples are drawn in eval mode: a LoRA with kohya's dropouts samples as the plain LoRA (v0.8.7 samples with
    them on: docs/kohya-reference.md §11), and its layers train with them again afterwards."""
    import copy

    from lora_sweep.model.regularization import Dropouts, install_dropouts, lora_layers

    plain = draw(pipe, SPECS[:1])[0]
    dropped = copy.deepcopy(pipe)
    dropped.unet.train()
    assert install_dropouts([dropped.unet], Dropouts(network=0.5, rank=0.5, module=0.5)) > 0
    assert np.array_equal(draw(dropped, SPECS[:1])[0], plain)
    assert all(layer.training for layer in lora_layers(dropped.unet))


def test_preserved_rng_state_restores_after_an_exception():
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    with pytest.raises(RuntimeError), preserved_rng_state():
        torch.rand(10)
        raise RuntimeError("boom")
    assert torch.equal(torch.rand(2), expected)


def test_scheduler_config_is_sdxl_bases():
    asset = Path(__file__).resolve().parents[2] / "lora_sweep/assets/sdxl_base/scheduler/scheduler_config.json"
    if not asset.exists():
        pytest.skip("bundled SDXL scheduler config not present")
    bundled = json.loads(asset.read_text())
    assert {k: bundled[k] for k in SDXL_EULER_CONFIG} == SDXL_EULER_CONFIG


def test_make_grid_geometry_and_labels():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (16, 32), (0, 0, 255))
    grid = make_grid([red, None, blue], rows=2, cols=2, labels=["red", "", "blue"], padding=4)
    cell_h = 32 + max(10, min(18, 32 // 14)) + 6
    assert grid.size == (2 * (32 + 4) + 4, 2 * (cell_h + 4) + 4)
    assert grid.getpixel((4 + 16, 4 + 16)) == (255, 0, 0)
    assert grid.getpixel((4 + 36 + 16, 4 + 16)) == (255, 255, 255)  # the empty cell
    assert grid.getpixel((4 + 16, 4 + cell_h + 4 + 16)) == (0, 0, 255)  # narrower image, centred
    with pytest.raises(ValueError):
        make_grid([red] * 5, rows=2, cols=2)


def test_grid_layout_is_prompts_by_seeds():
    specs = [PromptSpec("cat", seed=1), PromptSpec("cat", seed=2), PromptSpec("dog", seed=1)]
    assert grid_layout(specs) == [[0, 1], [2, None]]
    distinct = [PromptSpec(str(i), seed=i) for i in range(3)]
    assert grid_layout(distinct) == [[0, 1, 2]]  # one seed per prompt: a single row
    images = [Image.new("RGB", (64, 64), (i * 100, 0, 0)) for i in range(3)]
    two_by_two, one_row = prompts_grid(images, specs), prompts_grid(images, distinct)
    assert (two_by_two.width, one_row.width) == (2 * 68 + 4, 3 * 68 + 4)
    assert two_by_two.height > one_row.height


def test_log_samples_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from lora_sweep.compare.runs import logged_images

    client = MlflowClient(tracking_uri=new_store(tmp_path / "mlflow.db"))
    experiment = client.create_experiment("s", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    images = [Image.new("RGB", (64, 64), (200, 100, 0)), Image.new("RGB", (64, 64), (0, 100, 200))]
    for step in (0, 5):
        log_samples(images, SPECS, step, client=client, run_id=run_id)
    found = logged_images(client, run_id)
    assert set(found) == {("sample_p00", 0), ("sample_p01", 0), ("sample_p00", 5), ("sample_p01", 5)}
    grids = {Path(f.path).name for f in client.list_artifacts(run_id, "samples")}
    assert {"grid_step000000.png", "grid_step000005.png", "prompts.json"} <= grids
    specs = json.loads(Path(client.download_artifacts(run_id, "samples/prompts.json", str(tmp_path))).read_text())
    assert [s["seed"] for s in specs] == [1, 2]
    with pytest.raises(ValueError):
        log_samples(images[:1], SPECS, 0, client=client, run_id=run_id)


def test_log_samples_to_a_sink():
    sink = RecordingSink()
    log_samples([Image.new("RGB", (64, 64))] * 2, SPECS, 12, sink=sink)
    assert sink.images == [("sample_p00", 12, (64, 64)), ("sample_p01", 12, (64, 64))]
    assert [(n, a) for n, a, _ in sink.artifacts] == [("grid_step000012.png", "samples"), ("prompts.json", "samples")]
    assert all(size > 0 for _, _, size in sink.artifacts)


@pytest.mark.slow
def test_three_variants_sampled_logged_and_compared(pipe, tmp_path):
    """Sampling -> metrics -> MLflow -> report with real samples: three 'variants' (LoRA scaled by 0, 1, 2), each
    sampled at steps 0 and 4; the report's grid cell for each run is that run's own sample."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from lora_sweep.compare.report import build_report
    from lora_sweep.model.network import lora_parameters
    from lora_sweep.sampling.metrics import mean_metrics

    uri = new_store(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e2e", artifact_location=(tmp_path / "mlruns").as_uri())
    parent = client.create_run(experiment, run_name="sweep", tags={"lora_sweep.role": "sweep"}).info.run_id
    saved = [p.detach().clone() for p in lora_parameters(pipe.unet)]
    final_samples = {}
    try:
        for index, scale in enumerate((0.0, 1.0, 2.0)):
            name = f"scale{scale:g}"
            run_id = client.create_run(experiment, run_name=name, start_time=1000 + index, tags={
                "lora_sweep.role": "job", "mlflow.parentRunId": parent, "variant": name}).info.run_id
            client.log_param(run_id, "network.scale", str(scale))
            for step in (0, 4):
                with torch.no_grad():
                    for parameter, value in zip(lora_parameters(pipe.unet), saved, strict=True):
                        parameter.copy_(value * scale * step / 4)
                images = [Image.fromarray(a) for a in draw(pipe)]
                log_samples(images, SPECS, step, client=client, run_id=run_id)
                metrics = {**mean_metrics(images), "val/loss": 0.1 + 0.01 * index}
                client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in metrics.items()])
            final_samples[run_id] = [np.asarray(image, dtype=np.float64) for image in images]
            client.set_terminated(run_id)
    finally:
        with torch.no_grad():
            for parameter, value in zip(lora_parameters(pipe.unet), saved, strict=True):
                parameter.copy_(value)

    html_text = build_report(sweep_run_id=parent, out_dir=tmp_path / "report", tracking_uri=uri).read_text()
    assert all(f"scale{s}" in html_text for s in ("0", "1", "2"))
    assert "img/edge_energy" in html_text and "val/loss" in html_text
    parser = GridCells()
    parser.feed(html_text)
    assert len(parser.cells) == 3 * len(SPECS) and {c["data-step"] for c in parser.cells} == {"4"}
    for cell in parser.cells:
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(cell["src"].split(",", 1)[1]))).convert("RGB"),
                           dtype=np.float64)
        prompt = int(cell["data-key"][len("sample_p"):])
        errors = {run: np.abs(samples[prompt] - shown).mean() for run, samples in final_samples.items()}
        assert min(errors, key=errors.get) == cell["data-run-id"], errors


def test_modules_on_leaves_modules_already_there_untouched():
    from lora_sweep.sampling.images import modules_on

    module = torch.nn.Linear(2, 2)
    weight = module.weight
    with modules_on(torch.device("cpu"), module):
        assert module.weight is weight
    assert module.weight is weight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move a module away and back")
def test_modules_on_moves_and_returns():
    from lora_sweep.sampling.images import modules_on

    parked = torch.nn.Linear(2, 2)
    with modules_on(torch.device("cuda", 0), parked):
        assert parked.weight.device.type == "cuda"
    assert parked.weight.device.type == "cpu"


def test_the_log_line_counts_prompts_and_seeds_apart():
    """The fresh-user test: one prompt at sampling.seeds=[1, 2] logged '2 prompts, p00 ..., p01 ...'."""
    from lora_sweep.sampling.images import sampling_line

    seeds = [PromptSpec("a cat", seed=seed, width=64, height=64, steps=2) for seed in (1, 2)]
    assert sampling_line(seeds, n_seeds=2) == "1 prompt x 2 seeds, p00_s1 64x64 2 steps, p00_s2 64x64 2 steps"
    assert sampling_line(seeds) == "2 prompts, p00 64x64 2 steps, p01 64x64 2 steps"


def test_sampling_shows_its_progress_prompt_by_prompt(pipe, caplog, capfd, monkeypatch):
    """A long sample is never a silent `0step`: one log line with every prompt's size and steps, then on a terminal
    a bar over all denoising steps (3 + 3 here) naming the prompt being drawn."""
    import logging

    monkeypatch.setattr("lora_sweep.progress.on_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="lora_sweep.sampling.images"):
        draw(pipe, label="step 0")
    assert caplog.messages == ["sampling at step 0: 2 prompts, p00 64x64 3 steps, p01 64x64 3 steps"]
    bar = capfd.readouterr().err
    assert "sampling at step 0: prompt 1/2, 64x64" in bar and "sampling at step 0: prompt 2/2, 64x64" in bar
    assert "0/6 [" in bar  # one bar over every denoising step of the call


def test_out_of_memory_while_drawing_names_the_prompt_its_size_and_steps(pipe):
    """An allocator failure inside the pipeline becomes a SamplingOutOfMemory naming the prompt (its `where`), so the
    run's failure blames the sample, not training; the allocator's error stays its cause."""
    from lora_sweep.errors import SamplingOutOfMemory

    calls = []

    def should_stop():  # asked before prompt 1, then after each denoising step: fail inside the pipeline
        calls.append(1)
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37.25 GiB")
        return False

    spec = PromptSpec("a car", width=64, height=64, seed=1, steps=3, where="sampling.prompt_file 'p6.txt', line 1")
    with pytest.raises(SamplingOutOfMemory) as error:
        draw(pipe, specs=[spec, SPECS[0]], should_stop=should_stop)
    assert str(error.value) == ("out of memory while sampling prompt 1 of 2 (sampling.prompt_file 'p6.txt', line 1: "
                                "64x64, 3 steps)")
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)
