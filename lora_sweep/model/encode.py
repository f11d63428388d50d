"""Text and image encoding for SDXL, with kohya sd-scripts v0.8.7's choices (`get_hidden_states_sdxl`, 75 + 2 tokens).

- Both tokenizers give 77 ids (padding "max_length", truncation).
- context = concat(TE1, TE2 penultimate hidden states), no final layer norm; kohya's TE1 hidden_states[11] is written
  hidden_states[-2], the same for CLIP ViT-L and the penultimate layer of the tiny encoders. SDXL ignores clip_skip.
- pooled = TE2's text_projection of the final-layer-normed state at the first eos (kohya's `pool_workaround`).
- Latents are returned unscaled: one posterior sample (what kohya caches) or its mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

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


def encode_prompts(parts: Any, captions: Sequence[str], *, train: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (context (B, 77, hidden1 + hidden2), pooled (B, TE2 projection_dim)), on text_encoder's device and
    dtype. `parts`: anything with the two tokenizers and encoders. No graph unless `train`."""
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


def encode_images(vae: Any, pixels: torch.Tensor, *, sample: bool = True,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> unscaled latents (B, 4, H/8, W/8) in the VAE's dtype: one posterior sample
    (`generator` for reproducibility) or, sample=False, the mean."""
    with torch.no_grad():
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return posterior.sample(generator=generator) if sample else posterior.mean


def time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int],
             target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL's six micro-conditioning numbers (orig_h, orig_w, crop_top, crop_left, target_h, target_w) as float32 (6,);
    kohya's crop is the letterbox offset (docs/kohya-reference.md §7)."""
    values = (*original_hw, *crop_top_left, *target_hw)
    if len(values) != 6:
        raise ValueError(f"time_ids needs three (h, w)-style pairs, got {original_hw}, {crop_top_left}, {target_hw}")
    return torch.tensor(values, dtype=torch.float32)
