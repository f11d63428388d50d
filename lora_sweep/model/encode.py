"""Text and image encoding for SDXL, with kohya sd-scripts v0.8.7's choices (`get_hidden_states_sdxl`, 75 + 2 tokens).

- Both tokenizers give 77 ids (padding "max_length", truncation); with max_token_length 150 or 225, 2 or 3 chunks of
  77 ids, each encoded on its own, and a context of 152 or 227 tokens (docs/data.md#long-captions).
- context = concat(TE1, TE2 penultimate hidden states), no final layer norm; kohya's TE1 hidden_states[11] is written
  hidden_states[-2], the same for CLIP ViT-L and the penultimate layer of the tiny encoders. SDXL ignores clip_skip.
- pooled = TE2's text_projection of the final-layer-normed state at the first eos (kohya's `pool_workaround`).
- Latents are returned unscaled: one posterior sample (what kohya caches) or its mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

CHUNK = 75  # text tokens per 77-id chunk: CLIP's 77 positions less BOS and EOS
# kohya's sdxl_model_util.VAE_SCALE_FACTOR (SDXL-base's and the tiny VAE's scaling_factor); the trainer applies it
VAE_SCALE_FACTOR = 0.13025


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """(B, 77) input ids, padded with the tokenizer's own pad token (eos for TE1, "!" for TE2) and truncated."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def first_eos_index(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) position of the first eos token per row (kohya's pool_workaround; every row has one after tokenize)."""
    is_eos = (input_ids == eos_token_id).int()
    return is_eos.argmax(dim=-1)


def chunked_ids(tokenizer: Any, captions: Sequence[str], max_token_length: int) -> torch.Tensor:
    """(B, n, 77) ids, n = max_token_length // 75, as v0.8.7's `BaseDataset.get_input_ids` (docs/data.md#long-captions).

    The caption is tokenized to max_token_length + 2 ids (padding "max_length", truncation), then cut into chunks
    [ids[0]] + ids[i:i+75] + [ids[-1]]. A tokenizer whose pad is its eos (TE1) takes them as they are; another (TE2,
    pad 0) gets v0.8.7's two fix-ups: eos last after a full chunk of text, eos first in a chunk of padding only.
    """
    length = max_token_length + 2
    ids = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for i in range(1, length - tokenizer.model_max_length + 2, CHUNK):
        chunk = torch.cat([ids[:, :1], ids[:, i : i + CHUNK], ids[:, -1:]], dim=1)
        if pad != eos:  # v0.8.7's "v2" branch
            text_before_end = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)
            chunk[text_before_end, -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def token_counts(tokenizer: Any, captions: Sequence[str]) -> list[int]:
    """Each caption's text tokens (no BOS, no EOS), untruncated and without transformers' too-long notice."""
    return [len(ids) for ids in tokenizer(list(captions), add_special_tokens=False, verbose=False).input_ids]


def encode_prompts(parts: Any, captions: Sequence[str], *, train: bool = False,
                   max_token_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (context (B, 77, hidden1 + hidden2), pooled (B, TE2 projection_dim)), on text_encoder's device and
    dtype. `parts`: anything with the two tokenizers and encoders. No graph unless `train`. max_token_length 150 or
    225: the context is (B, 152 or 227, ...) (`encode_long_prompts`); null and 75 are the same 77 ids."""
    if max_token_length not in (None, CHUNK):
        return encode_long_prompts(parts, captions, max_token_length, train=train)
    grad_mode = torch.enable_grad() if train else torch.no_grad()
    with grad_mode:
        ids_1 = tokenize(parts.tokenizer, captions).to(parts.text_encoder.device)
        ids_2 = tokenize(parts.tokenizer_2, captions).to(parts.text_encoder_2.device)
        out_1 = parts.text_encoder(ids_1, output_hidden_states=True, return_dict=True)
        out_2 = parts.text_encoder_2(ids_2, output_hidden_states=True, return_dict=True)
        hidden_1 = out_1.hidden_states[-2]  # kohya: hidden_states[11] of CLIP ViT-L (12 layers)
        hidden_2 = out_2.hidden_states[-2]
        eos_positions = first_eos_index(ids_2, parts.tokenizer_2.eos_token_id)
        rows = torch.arange(ids_2.shape[0], device=ids_2.device)
        pooled = parts.text_encoder_2.text_projection(out_2.last_hidden_state[rows, eos_positions])
        target = {"device": hidden_1.device, "dtype": hidden_1.dtype}
        context = torch.cat([hidden_1, hidden_2.to(**target)], dim=-1)
    return context, pooled.to(**target)


def encode_long_prompts(parts: Any, captions: Sequence[str], max_token_length: int, *,
                        train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (context (B, 2 + max_token_length, hidden1 + hidden2), pooled (B, projection_dim)) as v0.8.7's
    `get_hidden_states_sdxl` with max_token_length 150 or 225 (docs/data.md#long-captions).

    Each 77-id chunk (`chunked_ids`) is encoded as its own sequence; the context is chunk 0's BOS state, every chunk's
    75 body states and the last chunk's final state, for a short caption too. The pool is chunk 0's alone.
    """
    grad_mode = torch.enable_grad() if train else torch.no_grad()
    with grad_mode:
        ids_1 = chunked_ids(parts.tokenizer, captions, max_token_length).to(parts.text_encoder.device)
        ids_2 = chunked_ids(parts.tokenizer_2, captions, max_token_length).to(parts.text_encoder_2.device)
        batch, n, width = ids_1.shape
        out_1 = parts.text_encoder(ids_1.reshape(-1, width), output_hidden_states=True, return_dict=True)
        out_2 = parts.text_encoder_2(ids_2.reshape(-1, width), output_hidden_states=True, return_dict=True)
        hidden_1 = _rejoin(out_1.hidden_states[-2], batch)  # kohya: hidden_states[11] of CLIP ViT-L (12 layers)
        hidden_2 = _rejoin(out_2.hidden_states[-2], batch)
        first_ids = ids_2[:, 0]
        eos_positions = first_eos_index(first_ids, parts.tokenizer_2.eos_token_id)
        rows = torch.arange(batch, device=first_ids.device) * n  # chunk 0 of each caption (kohya's pool2[::n])
        pooled = parts.text_encoder_2.text_projection(out_2.last_hidden_state[rows, eos_positions])
        target = {"device": hidden_1.device, "dtype": hidden_1.dtype}
        context = torch.cat([hidden_1, hidden_2.to(**target)], dim=-1)
    return context, pooled.to(**target)


def _rejoin(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*n, 77, D) chunk states -> (B, 2 + 75n, D): chunk 0's first state, each chunk's states 1..75, the last
    chunk's final state (v0.8.7's slices h[:, i:i+75] for i in range(1, 75n, 77) of the (B, 77n, D) view)."""
    chunks = hidden.reshape(batch, -1, *hidden.shape[1:])
    bodies = chunks[:, :, 1 : 1 + CHUNK].reshape(batch, -1, hidden.shape[-1])
    return torch.cat([chunks[:, 0, :1], bodies, chunks[:, -1, -1:]], dim=1)


def encode_images(vae: Any, pixels: torch.Tensor, *, sample: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> unscaled latents (B, 4, H/8, W/8) in the VAE's dtype: one posterior sample
    (`generator` for reproducibility) or, sample=False, the mean."""
    posterior = encode_posterior(vae, pixels)
    return posterior.sample(generator=generator) if sample else posterior.mean


def encode_posterior(vae: Any, pixels: torch.Tensor) -> Any:
    """Pixels (B, 3, H, W) in [-1, 1] -> the VAE's posterior (diffusers' DiagonalGaussianDistribution: mean, std and
    `sample`, (B, 4, H/8, W/8) in the VAE's dtype), unscaled."""
    with torch.no_grad():
        return vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist


def time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int],
             target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL's six micro-conditioning numbers (orig_h, orig_w, crop_top, crop_left, target_h, target_w) as float32 (6,);
    kohya's crop is the letterbox offset (docs/kohya-reference.md §7)."""
    values = (*original_hw, *crop_top_left, *target_hw)
    if len(values) != 6:
        raise ValueError(f"time_ids needs three (h, w)-style pairs, got {original_hw}, {crop_top_left}, {target_hw}")
    return torch.tensor(values, dtype=torch.float32)
