"""img/clip_t, img/clip_i and img/dino: tiny random-weight CLIP, DINOv2 and ViT models built from configs, saved as
local folders and loaded through the code a user's folder takes; the pre-flight's refusals; a training logs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image

from lora_sweep.checks.preflight import check_job
from lora_sweep.compare.report import likeness_scorers
from lora_sweep.model.tiny_sdxl import BOS_TOKEN, EOS_TOKEN, TINY_MERGES, _tokenizer_kwargs, clip_vocab
from lora_sweep.paths import make_paths_absolute
from lora_sweep.sampling.embeddings import (
    EmbeddingScorer,
    clip_score,
    folder_problem,
    load_embedder,
    mean_pair_similarity,
)

TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION = {**TINY, "image_size": 32, "patch_size": 8}
KEYS = ("img/clip_t", "img/clip_i", "img/dino")
SIZE = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """{"clip", "dinov2", "vit"}: transformers folders as save_pretrained writes them, random weights (seed 0)."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("weights")
    vocab = clip_vocab(TINY_MERGES)
    torch.manual_seed(0)
    text = {**TINY, "vocab_size": len(vocab), "bos_token_id": vocab[BOS_TOKEN], "eos_token_id": vocab[EOS_TOKEN],
            "pad_token_id": vocab[EOS_TOKEN]}
    CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=8)).save_pretrained(root / "clip")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(TINY_MERGES), **_tokenizer_kwargs("tokenizer"))
    CLIPProcessor(image_processor=CLIPImageProcessor(**SIZE), tokenizer=tokenizer).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(**VISION)).save_pretrained(root / "dinov2")
    BitImageProcessor(**SIZE).save_pretrained(root / "dinov2")
    ViTModel(ViTConfig(**VISION)).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    return {name: root / name for name in ("clip", "dinov2", "vit")}


def noise_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize(("name", "kind", "width"), [("clip", "clip", 8), ("dinov2", "dino", 16), ("vit", "dino", 16)])
def test_a_saved_folder_loads_and_identical_images_have_similarity_one(folders, name, kind, width):
    setting = "evaluation.clip_model" if kind == "clip" else "evaluation.dino_model"
    assert folder_problem(folders[name], setting) is None
    embedder = load_embedder(folders[name], kind)
    assert not embedder.model.training
    images = noise_images(3)
    embeddings = embedder.image_embeddings(images)
    assert embeddings.shape == (3, width) and embeddings.dtype == torch.float32
    assert mean_pair_similarity(embeddings[:1], embedder.image_embeddings(images[:1])) == pytest.approx(1.0, abs=1e-5)
    others = embeddings @ embeddings.T
    assert -1.0 <= float(others.min()) and float(others[0, 1]) < 0.9999
    if kind == "clip":
        scores = clip_score(embeddings[:2], embedder.text_embeddings(["a (photo:1.2) of the dog", "and"]))
        assert scores.shape == (2,) and bool(((scores >= 0) & (scores <= 100)).all())


def test_the_scorer_logs_likeness_and_adherence_and_embeds_the_training_images_once(folders, tmp_path):
    reference = noise_images(1, seed=5)[0]
    reference.save(tmp_path / "train.png")
    calls = []

    def cache(kind, model, paths, compute):
        calls.append((kind, model, list(paths)))
        return compute()

    scorer = EmbeddingScorer(str(folders["clip"]), str(folders["dinov2"]), [tmp_path / "train.png"], cache)
    same = scorer([reference], ["a photo"], torch.device("cpu"))
    assert set(same) == {"img/clip_t", "img/clip_i", "img/dino"}
    assert same["img/clip_i"] == pytest.approx(1.0, abs=1e-5) and same["img/dino"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= same["img/clip_t"] <= 100.0
    other = scorer(noise_images(2), ["a photo", "the dog"], torch.device("cpu"))
    assert -1.0 <= other["img/clip_i"] < 0.9999 and -1.0 <= other["img/dino"] < 0.9999
    assert [(kind, model.name) for kind, model, _ in calls] == [("clip", "clip"), ("dino", "dinov2")]
    scorer.close()
    assert scorer([reference], ["a photo"], torch.device("cpu")) == same  # reloaded, same weights


def test_open_clip_checkpoints_and_other_folders_are_refused_naming_what_they_lack(folders, tmp_path):
    open_clip = tmp_path / "laion"
    open_clip.mkdir()
    (open_clip / "open_clip_config.json").write_text("{}")
    (open_clip / "open_clip_pytorch_model.bin").write_bytes(b"")
    refused = folder_problem(open_clip, "evaluation.clip_model")
    assert refused.startswith(f"evaluation.clip_model: '{open_clip}' is an open_clip checkpoint")
    assert "open_clip cannot be installed beside this torch" in refused and "docs/comparing.md" in refused
    (tmp_path / "ViT-B-32.pt").write_bytes(b"")
    assert "is an open_clip checkpoint" in folder_problem(tmp_path / "ViT-B-32.pt", "evaluation.clip_model")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert folder_problem(empty, "evaluation.dino_model") == (
        f"evaluation.dino_model: '{empty}' is not a transformers model folder: it lacks config.json and "
        "model.safetensors or pytorch_model.bin. Give a folder holding a Dinov2Model or ViTModel saved with "
        "save_pretrained.")
    wrong = folder_problem(folders["dinov2"], "evaluation.clip_model")
    assert "holds a 'dinov2' model; it must be a CLIPModel" in wrong
    # LAION's repositories ship transformers files beside the open_clip ones: those load
    both = tmp_path / "both"
    both.mkdir()
    for file in folders["clip"].iterdir():
        (both / file.name).write_bytes(file.read_bytes())
    (both / "open_clip_pytorch_model.bin").write_bytes(b"")
    assert folder_problem(both, "evaluation.clip_model") is None


def test_a_weights_file_given_for_its_folder_is_called_a_file_and_the_folder_is_suggested(folders, tmp_path):
    weights = folders["clip"] / "model.safetensors"  # a transformers model's file, not an open_clip checkpoint
    assert folder_problem(weights, "evaluation.clip_model") == (
        f"evaluation.clip_model: '{weights}' is a file, and a folder is expected: give the folder holding a CLIPModel "
        "in transformers format (config.json and model.safetensors, saved with save_pretrained). The folder holding "
        f"this file is one: set evaluation.clip_model to '{folders['clip']}'.")
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "weights.bin").write_bytes(b"")  # no model beside it: nothing to suggest, and not called open_clip
    assert folder_problem(loose / "weights.bin", "evaluation.clip_model").endswith("saved with save_pretrained).")
    (loose / "open_clip_config.json").write_text("{}")  # now it is one
    assert "is an open_clip checkpoint" in folder_problem(loose / "weights.bin", "evaluation.clip_model")


def test_the_preflight_refuses_a_missing_folder_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative folder is read from where the command started
    assert make_paths_absolute(compose_config("evaluation.clip_model=models/clip")) == {
        "evaluation.clip_model": str(tmp_path / "models" / "clip")}
    missing = tmp_path / "no-such-clip"
    report = check_job(compose_config(f"evaluation.clip_model={missing}", f"evaluation.dino_model={tmp_path}"))
    assert f"evaluation.clip_model: '{missing}' does not exist." in " ".join(report.problems)
    assert any(p.startswith(f"evaluation.dino_model: '{tmp_path}' is not a transformers model folder")
               for p in report.problems)
    unused = check_job(compose_config(f"evaluation.clip_model={missing}", "sampling.prompts=[]")).fallbacks
    assert [f.line() for f in unused] == [
        f"evaluation.clip_model: 1 folder not used (nothing is sampled, so nothing is scored): '{missing}'. Set "
        "sampling.prompts or sampling.prompt_file to log img/clip_t and img/clip_i."]


def test_a_training_logs_the_three_metrics_and_compare_score_computes_them_afterwards(folders, tmp_path,
                                                                                        mlflow_uri, cache_dir, capsys):
    from mlflow.tracking import MlflowClient

    from lora_sweep.compare.report import main as compare_main
    from lora_sweep.compare.runs import download_image, logged_images
    from lora_sweep.compare.score import score_logged_run
    from lora_sweep.job.run import run_job

    cfg = compose_config("train.max_steps=2", "train.batch_size=2", "train.save_every=0", "validation.fit_images=0",
                         "sampling.prompts=['a photo']", "sampling.steps=2", "sampling.width=64",
                         "sampling.height=64", f"evaluation.clip_model={folders['clip']}",
                         f"evaluation.dino_model={folders['vit']}")
    outcome = run_job(cfg, output_dir=tmp_path / "out")
    assert outcome.status == "FINISHED"
    client = MlflowClient(mlflow_uri)
    logged = {key: {m.step: m.value for m in client.get_metric_history(outcome.run_id, key)} for key in KEYS}
    assert all(sorted(values) == [0, 2] for values in logged.values()), logged
    assert all(0 <= v <= 100 for v in logged["img/clip_t"].values())
    assert all(-1 <= v <= 1 for key in ("img/clip_i", "img/dino") for v in logged[key].values())
    assert len(list((cache_dir / "embeddings").rglob("*.safetensors"))) >= 2  # the training images, once per model

    # A run logged without them (same samples and dataset record) gets the same numbers from compare --score.
    old = client.create_run(client.get_run(outcome.run_id).info.experiment_id, run_name="old").info.run_id
    for (key, step), image in logged_images(client, outcome.run_id).items():
        client.log_image(old, download_image(client, outcome.run_id, image.path, tmp_path), key=key, step=step)
    for artifact in ("data/datasets.json", "samples/prompts.json"):
        client.log_artifact(old, client.download_artifacts(outcome.run_id, artifact, str(tmp_path)),
                            artifact.split("/")[0])
    scorers = likeness_scorers(str(folders["clip"]), str(folders["vit"]))
    score_logged_run(client, client.get_run(old), scorers, scratch=tmp_path / "scratch")
    for key in KEYS:
        assert {m.step: m.value for m in client.get_metric_history(old, key)} == pytest.approx(logged[key]), key
    assert compare_main(["--score", "--clip-model", str(tmp_path / "missing")]) == 2
    assert f"--clip-model: '{tmp_path / 'missing'}' does not exist." in capsys.readouterr().err
