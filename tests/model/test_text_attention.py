"""The text encoders compute attention as kohya v0.8.7's CLIP (transformers 4.36.2) does: eager, not transformers 5's
SDPA default (issue 33). The reference transcribes 4.36.2's `CLIPAttention.forward` (models/clip/modeling_clip.py
L249-324) and the causal mask of `_make_causal_mask` (modeling_attn_mask_utils.py L144-159)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.models.clip.modeling_clip import CLIPAttention

from lora_sweep.model.loading import TEXT_ENCODER_ATTENTION, load_sdxl, tiny_model_dir


def attention_v436(attn: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """transformers 4.36.2's CLIP self-attention on `attn`'s weights: q scaled before q.k^T, the causal mask
    (finfo.min above the diagonal) added, softmax, then v; no padding mask, no dropout (as SDXL's encoding)."""
    bsz, length, dim = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.view(bsz, -1, heads, head_dim).transpose(1, 2).contiguous().view(bsz * heads, -1, head_dim)

    query = per_head(attn.q_proj(hidden) * attn.scale)
    key, value = per_head(attn.k_proj(hidden)), per_head(attn.v_proj(hidden))
    weights = torch.bmm(query, key.transpose(1, 2))
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)
    weights = (weights.view(bsz, heads, length, length) + causal).view(bsz * heads, length, length)
    out = torch.bmm(torch.nn.functional.softmax(weights, dim=-1), value)
    out = out.view(bsz, heads, length, head_dim).transpose(1, 2).reshape(bsz, length, dim)
    return attn.out_proj(out)


def attention_gaps(model: CLIPTextModel, ids: torch.Tensor) -> list[float]:
    """Each layer's max |self-attention output - attention_v436 on the same input|, from one forward pass."""
    gaps: list[float] = []

    def compare(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        gaps.append((output[0] - attention_v436(module, hidden)).abs().max().item())

    layers = [m for m in model.modules() if isinstance(m, CLIPAttention)]
    hooks = [layer.register_forward_hook(compare, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return gaps


IDS = torch.tensor([[0, 5, 17, 300, 2] + [2] * 72, [0, 9, 2] + [2] * 74])


@pytest.fixture(scope="module")
def sdxl_head_clip() -> CLIPTextModel:
    """A small CLIP text encoder with SDXL's head width (64: ViT-L's and bigG's), whose scale 1/8 is a power of two."""
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2)
    return CLIPTextModel(config).eval()


def test_eager_attention_is_v436s_bit_for_bit_at_sdxls_head_width(sdxl_head_clip):
    model = copy.deepcopy(sdxl_head_clip)
    model.set_attn_implementation(TEXT_ENCODER_ATTENTION)
    assert attention_gaps(model, IDS) == [0.0, 0.0]
    model.set_attn_implementation("sdpa")
    assert 0 < max(attention_gaps(model, IDS)) < 1e-5  # 2-5e-7 here: the gap kohya's LoRA would not share


def test_loaded_text_encoders_compute_eager_attention_not_sdpa():
    parts = load_sdxl(tiny_model_dir())
    for encoder in (parts.text_encoder, parts.text_encoder_2):
        assert encoder.config._attn_implementation == "eager"
        ids = IDS % encoder.config.vocab_size
        sdpa = copy.deepcopy(encoder)
        sdpa.set_attn_implementation("sdpa")
        with torch.no_grad():
            eager_out = encoder(ids, output_hidden_states=True).hidden_states[-2]
            sdpa_out = sdpa(ids, output_hidden_states=True).hidden_states[-2]
        # measured 4.2e-7 (TE1) and 6.0e-7 (TE2) on the penultimate layer kohya reads
        assert 0 < (eager_out - sdpa_out).abs().max().item() < 1e-5
