"""Text and image encoding for SDXL LoRA training, with kohya sd-scripts v0.8.7's choices.

Text (kohya `sdxl_train_util` / `train_util.get_hidden_states_sdxl`, max_token_length unset = 75 + 2 tokens):
- each caption is tokenized by both tokenizers to 77 ids (padding "max_length", truncation);
- context = concat(TE1 penultimate hidden state, TE2 penultimate hidden state) along features. Kohya indexes TE1
  as hidden_states[11]: for CLIP ViT-L's 12 layers (hidden_states has 13 entries, the embeddings first) that is
  hidden_states[-2], which is how it is written here so the 3-layer tiny encoders use their penultimate layer too.
  Neither is passed through the final layer norm. SDXL ignores clip_skip (the layers are fixed).
- pooled = TE2's text_projection applied to the final-layer-normed hidden state at the FIRST <|endoftext|> token
  (kohya's `pool_workaround`; equal to transformers' `text_embeds` while no token has an id above eos).

Images: the VAE posterior is sampled once (kohya caches `latent_dist.sample()`) or its mean is taken, and returned
UNSCALED; the trainer multiplies by `VAE_SCALE_FACTOR` (SDXL 0.13025, the tiny VAE uses the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# SDXL's latent scale (kohya sdxl_model_util.VAE_SCALE_FACTOR); equals vae.config.scaling_factor of SDXL-base and of
# the tiny VAE. Applied at train time: latents_for_unet = encode_images(...) * VAE_SCALE_FACTOR.
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
    """Captions -> (context (B, 77, hidden1 + hidden2), pooled (B, projection_dim of TE2)).

    `parts` is an SDXLParts (anything with tokenizer, tokenizer_2, text_encoder, text_encoder_2). Runs under
    torch.no_grad unless `train` (the text encoders are being trained), so a frozen-encoder step builds no graph.
    Both outputs are on text_encoder's device, in its dtype.
    """
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
    """Pixels (B, 3, H, W) in [-1, 1] -> UNSCALED latents (B, 4, H/8, W/8) in the VAE's dtype.

    sample=True draws one posterior sample (what kohya caches; `generator` makes it reproducible), False takes the
    posterior mean. Multiply by VAE_SCALE_FACTOR before noising.
    """
    with torch.no_grad():
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return posterior.sample(generator=generator) if sample else posterior.mean


def time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int],
             target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL's six micro-conditioning numbers, in its order: (orig_h, orig_w, crop_top, crop_left, target_h,
    target_w), as float32 of shape (6,). Stack per-sample rows to (B, 6) for the UNet's `time_ids`.

    Kohya's crop_top_left is the letterbox offset (docs/kohya-reference.md §7), computed by the bucketing code.
    """
    values = (*original_hw, *crop_top_left, *target_hw)
    if len(values) != 6:
        raise ValueError(f"time_ids needs three (h, w)-style pairs, got {original_hw}, {crop_top_left}, {target_hw}")
    return torch.tensor(values, dtype=torch.float32)
