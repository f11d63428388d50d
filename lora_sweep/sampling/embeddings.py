"""Scorecard metrics that need a local weights folder (`evaluation.clip_model`, `evaluation.dino_model`):

- `img/clip_t`: CLIP score of each sample with its prompt, 100 * max(cos(image, text), 0) as torchmetrics'
  `CLIPScore` defines it (Hessel et al. 2021, arXiv 2104.08718, with w = 100), mean over the samples;
- `img/clip_i`: mean cosine similarity of CLIP image embeddings over all (sample, training image) pairs;
- `img/dino`: the same with the DINO CLS token (last_hidden_state[:, 0]) of a `Dinov2Model` or `ViTModel`.
  CLIP-I and DINO are DreamBooth's subject-fidelity metrics (Ruiz et al. 2022, arXiv 2208.12242, section 4.1).

Folders load with transformers' `from_pretrained(local_files_only=True)`: never a hub download. `folder_problem`
is the pre-flight's check; an open_clip checkpoint is refused by name (open_clip cannot be installed beside this
torch; docs/comparing.md gives the route to transformers files).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

BATCH = 16  # images per forward pass: bounded memory for any number of training images
CLIP_TYPES = ("clip",)
DINO_TYPES = ("dinov2", "vit")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# open_clip's (and OpenAI clip's) model names, as their checkpoint files are named: ViT-B-32.pt, RN50.pt, EVA02-L-14
OPEN_CLIP_NAME = re.compile(r"(ViT|RN\d|convnext|EVA\d*|coca)[-_]", re.IGNORECASE)
SKIPPED = {"clip": ("img/clip_t", "img/clip_i"), "dino": ("img/dino",)}


def open_clip_refusal(setting: str, path: Path) -> str:
    return (f"{setting}: '{path}' is an open_clip checkpoint, which lora-sweep cannot load (open_clip cannot be "
            "installed beside this torch, and transformers ships no open_clip converter). Point it at the same "
            "model's transformers folder instead (config.json, model.safetensors, preprocessor_config.json and the "
            "tokenizer files; LAION's model repositories ship them beside the open_clip files): see "
            "docs/comparing.md, section 'Likeness and prompt adherence'.")


def folder_problem(path: str | Path, setting: str) -> str | None:
    """Why `path` cannot load, one paragraph naming `setting` (evaluation.clip_model or evaluation.dino_model, or
    compare's --clip-model / --dino-model); None when it is a transformers folder of the right model type. Reads file
    names and config.json only."""
    kind = "clip" if "clip" in setting else "dino"
    wanted = "a CLIPModel" if kind == "clip" else "a Dinov2Model or ViTModel"
    path = Path(path).expanduser()
    if not path.exists():
        return (f"{setting}: '{path}' does not exist. Give a local folder holding {wanted} in transformers format "
                "(config.json and model.safetensors, saved with save_pretrained), or leave it unset to skip "
                f"{' and '.join(SKIPPED[kind])}.")
    if path.is_file():
        return _file_problem(path, setting, kind, wanted)
    names = {p.name for p in path.iterdir()}
    has_weights = any(name in names for name in WEIGHT_FILES)
    if "config.json" not in names or not has_weights:
        if names & set(OPEN_CLIP_FILES):
            return open_clip_refusal(setting, path)
        lacking = [n for n, ok in (("config.json", "config.json" in names),
                                   ("model.safetensors or pytorch_model.bin", has_weights)) if not ok]
        return (f"{setting}: '{path}' is not a transformers model folder: it lacks {' and '.join(lacking)}. "
                f"Give a folder holding {wanted} saved with save_pretrained.")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        return f"{setting}: '{path / 'config.json'}' cannot be read as JSON ({error}); save the model again."
    types = CLIP_TYPES if kind == "clip" else DINO_TYPES
    if model_type not in types:
        return (f"{setting}: '{path}' holds a '{model_type}' model; it must be {wanted} (config.json model_type "
                f"{' or '.join(repr(t) for t in types)}).")
    lacking = [] if names & {"preprocessor_config.json", "processor_config.json"} else ["preprocessor_config.json"]
    if kind == "clip" and "tokenizer.json" not in names:
        lacking += [n for n in ("vocab.json", "merges.txt") if n not in names]
    if lacking:
        return (f"{setting}: '{path}' lacks {', '.join(lacking)}: save the model's processor beside it "
                "(CLIPProcessor or AutoImageProcessor .save_pretrained into the same folder).")
    return None


def _file_problem(path: Path, setting: str, kind: str, wanted: str) -> str:
    """Why a file cannot stand for a model folder: an open_clip checkpoint (named as open_clip names them, or with
    open_clip_config.json beside it) is refused as such; another file points at its folder when that folder loads."""
    beside = {p.name for p in path.parent.iterdir()}
    if kind == "clip" and path.suffix.lower() in CHECKPOINT_SUFFIXES and (
            path.name in OPEN_CLIP_FILES or "open_clip_config.json" in beside or OPEN_CLIP_NAME.match(path.name)):
        return open_clip_refusal(setting, path)
    found = (f"{setting}: '{path}' is a file, and a folder is expected: give the folder holding {wanted} in "
             "transformers format (config.json and model.safetensors, saved with save_pretrained).")
    if "config.json" in beside and folder_problem(path.parent, setting) is None:
        found += f" The folder holding this file is one: set {setting} to '{path.parent}'."
    return found


def _features(output) -> torch.Tensor:
    """transformers 5's get_*_features return an output whose pooler_output is projected; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def open_image(path: str | Path) -> Image.Image:
    """A training image as its viewer sees it: EXIF orientation applied, RGB."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def plain_prompt(text: str) -> str:
    """The prompt's words without A1111 emphasis brackets and weights (CLIP reads the words, not the syntax)."""
    from lora_sweep.sampling.emphasis import parse_prompt_attention

    return "".join(piece for piece, weight in parse_prompt_attention(text) if weight >= 0)


@dataclass
class Embedder:
    """A loaded image (and for CLIP, text) encoder; `image_embeddings` / `text_embeddings` return (N, D) float32,
    L2-normalised, on the CPU. Runs on `device` in eval mode without gradients; parked on the CPU between calls."""

    kind: str  # "clip" or "dino"
    path: Path
    model: torch.nn.Module
    processor: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), BATCH):
            batch = [image.convert("RGB") for image in images[start:start + BATCH]]
            pixels = self._image_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            if self.kind == "clip":
                rows.append(_features(self.model.get_image_features(pixel_values=pixels)))
            else:  # DINO's image embedding is the CLS token of the last layer (DreamBooth section 4.1)
                rows.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])
        return torch.nn.functional.normalize(torch.cat(rows).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return torch.nn.functional.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1).cpu()

    @property
    def _image_processor(self):
        return getattr(self.processor, "image_processor", self.processor)

    def on(self, device: torch.device) -> Embedder:
        self.model.to(device)
        self.device = device
        return self


def load_embedder(path: str | Path, kind: str) -> Embedder:
    """The CLIP (`kind` "clip") or DINO ("dino") model and processor of a local transformers folder, on the CPU in
    eval mode; local_files_only, so nothing is downloaded. The pre-flight's `folder_problem` has passed."""
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    path = Path(path).expanduser().resolve()  # absolute: from_pretrained never reads it as a hub repo id
    if kind == "clip":
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    model.eval().requires_grad_(False)
    return Embedder(kind, path, model, processor)


def clip_score(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(N,) CLIP scores of normalised image and text embeddings paired by row: 100 * max(cos, 0), in [0, 100]."""
    return 100.0 * (images * texts).sum(dim=-1).clamp(min=0)


def mean_pair_similarity(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine similarity over all (sample, reference) pairs of normalised embeddings, in [-1, 1]."""
    return float((samples @ references.T).mean())


# (kind, model folder, reference image paths, compute) -> the references' embeddings, from a cache or computed
ReferenceCache = Callable[[str, Path, Sequence[Path], Callable[[], torch.Tensor]], torch.Tensor]


def uncached(kind: str, model: Path, paths: Sequence[Path], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    return compute()


@dataclass
class EmbeddingScorer:
    """img/clip_t, img/clip_i and img/dino of a sampling step's images. Models load at the first call and stay on the
    CPU between calls; `close` frees them. `references`: the training images (clip_i and dino need at least one);
    `cache` gives their embeddings once per (model, image set)."""

    clip_model: str | None
    dino_model: str | None
    references: Sequence[Path]
    cache: ReferenceCache = uncached
    _embedders: list[Embedder] | None = field(default=None, repr=False)
    _reference_embeddings: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _said: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        skipped = [m for kind, p in (("clip", self.clip_model), ("dino", self.dino_model)) if not p
                   for m in SKIPPED[kind]]
        if skipped:
            log.info("%s not logged: no local weights folder given (evaluation.clip_model / evaluation.dino_model; "
                     "compare --score: --clip-model / --dino-model; docs/comparing.md, section 'Likeness and prompt "
                     "adherence')", ", ".join(skipped))

    @property
    def active(self) -> bool:
        return bool(self.clip_model or self.dino_model)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str], device: torch.device) -> dict:
        """The metrics of `images` (sample i was drawn from prompts[i]), each a mean over the samples."""
        if self._embedders is None:
            self._embedders = [load_embedder(p, kind) for kind, p in (("clip", self.clip_model),
                                                                       ("dino", self.dino_model)) if p]
        metrics = {}
        for embedder in self._embedders:
            embedder.on(device)
            try:
                metrics |= self._score(embedder, images, prompts)
            finally:
                embedder.on(torch.device("cpu"))
        return metrics

    def score_step(self, samples, training: Sequence[Path]) -> dict:
        """`compare --score`'s scorer (`sampling.scorecard.Scorer`): a logged step's samples (their images and
        prompts) against a finished run's `training` images, on CUDA when there is one."""
        if not self.active:
            return {}
        self.references = list(training)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return self(samples.images, samples.prompts, device)

    def _score(self, embedder: Embedder, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
        samples = embedder.image_embeddings(images)
        metrics = {}
        if embedder.kind == "clip":
            texts = embedder.text_embeddings([plain_prompt(p) for p in prompts])
            metrics["img/clip_t"] = float(clip_score(samples, texts).mean())
        name = "img/clip_i" if embedder.kind == "clip" else "img/dino"
        if self.references:
            metrics[name] = mean_pair_similarity(samples, self.reference_embeddings(embedder))
        elif name not in self._said:
            self._said.add(name)
            log.info("%s not logged: no training image to compare with (every image is a regularization image, or "
                     "the run's dataset folders are gone)", name)
        return metrics

    def reference_embeddings(self, embedder: Embedder) -> torch.Tensor:
        """The training images' embeddings, computed once per image set (and once per dataset with a cache)."""
        paths = [Path(p) for p in self.references]
        key = (embedder.kind, *paths)
        if key not in self._reference_embeddings:
            def compute() -> torch.Tensor:  # a batch of files open at a time
                return torch.cat([embedder.image_embeddings([open_image(p) for p in paths[i:i + BATCH]])
                                  for i in range(0, len(paths), BATCH)])

            self._reference_embeddings[key] = self.cache(embedder.kind, embedder.path, paths, compute)
        return self._reference_embeddings[key]

    def close(self) -> None:
        """Free the models (the reference embeddings stay: a few KB)."""
        self._embedders = None
