"""Text and image encoding on the tiny SDXL loaded through the real loader.

(transformers prints a harmless "CLIPImageProcessor requires torchvision" warning on import.)
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from lora_sweep.model.encode import (
    VAE_SCALE_FACTOR,
    chunked_ids,
    encode_images,
    encode_prompts,
    first_eos_index,
    time_ids,
    token_counts,
    tokenize,
)
from lora_sweep.model.loading import load_sdxl, tiny_model_dir
from lora_sweep.model.tiny_sdxl import sdxl_asset_config

CAPTIONS = ["a photo of the cat", "an astronaut riding a horse on the moon, oil painting"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return load_sdxl(tiny_model_dir(tmp_path_factory.mktemp("cache")))


def test_encode_prompts_shapes_and_layers(parts):
    context, pooled = encode_prompts(parts, CAPTIONS)
    assert context.shape == (2, 77, 32 + 48) and pooled.shape == (2, 40)
    assert not context.requires_grad and not pooled.requires_grad
    ids_1, ids_2 = tokenize(parts.tokenizer, CAPTIONS), tokenize(parts.tokenizer_2, CAPTIONS)
    with torch.no_grad():
        out_1 = parts.text_encoder(ids_1, output_hidden_states=True)
        out_2 = parts.text_encoder_2(ids_2, output_hidden_states=True)
    # TE1 first, then TE2, each its penultimate layer (kohya's hidden_states[11] for 12-layer CLIP-L).
    assert len(out_1.hidden_states) == parts.text_encoder.config.num_hidden_layers + 1
    assert torch.equal(context[..., :32], out_1.hidden_states[-2])
    assert torch.equal(context[..., 32:], out_2.hidden_states[-2])
    assert not torch.allclose(context[..., :32], out_1.last_hidden_state)
    # First-eos pooling equals transformers' text_embeds (argmax pooling) for an unextended vocabulary.
    torch.testing.assert_close(pooled, out_2.text_embeds)


def test_rows_are_independent_and_captions_matter(parts):
    context, pooled = encode_prompts(parts, CAPTIONS)
    single_context, single_pooled = encode_prompts(parts, CAPTIONS[1:])
    torch.testing.assert_close(single_context[0], context[1])
    torch.testing.assert_close(single_pooled[0], pooled[1])
    assert not torch.allclose(pooled[0], pooled[1])


def test_tokenizers_pad_like_sdxl(parts):
    ids_1, ids_2 = tokenize(parts.tokenizer, ["a cat"]), tokenize(parts.tokenizer_2, ["a cat"])
    assert ids_1.shape == ids_2.shape == (1, 77)
    eos, end = parts.tokenizer.eos_token_id, len(parts.tokenizer("a cat").input_ids) - 1  # bos ... eos
    assert (ids_1[0, end:] == eos).all()  # TE1 pads with eos
    assert ids_2[0, end] == eos and (ids_2[0, end + 1 :] == parts.tokenizer_2.convert_tokens_to_ids("!")).all()
    assert first_eos_index(ids_1, eos).tolist() == first_eos_index(ids_2, eos).tolist() == [end]
    long_caption = " ".join(["cat"] * 200)
    assert tokenize(parts.tokenizer_2, [long_caption])[0, -1] == eos  # truncated, eos kept last


def test_encode_prompts_builds_a_graph_only_when_training_the_encoders(parts):
    parts.text_encoder.requires_grad_(True)
    try:
        context, _ = encode_prompts(parts, CAPTIONS[:1], train=True)
        assert context.requires_grad
        context.sum().backward()
        assert parts.text_encoder.get_input_embeddings().weight.grad is not None
    finally:
        parts.text_encoder.requires_grad_(False)
        parts.text_encoder.zero_grad(set_to_none=True)


def test_encode_images_shape_sampling_and_mean(parts):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sample_a = encode_images(parts.vae, pixels, generator=torch.Generator().manual_seed(5))
    sample_b = encode_images(parts.vae, pixels, generator=torch.Generator().manual_seed(5))
    mean = encode_images(parts.vae, pixels, sample=False)
    assert sample_a.shape == mean.shape == (2, 4, 8, 8) and not sample_a.requires_grad
    assert torch.equal(sample_a, sample_b) and not torch.allclose(sample_a, mean)
    with torch.no_grad():
        expected_mean = parts.vae.encode(pixels).latent_dist.mean
    assert torch.equal(mean, expected_mean)  # unscaled: no VAE_SCALE_FACTOR applied
    wide = encode_images(parts.vae, torch.zeros(1, 3, 64, 96), sample=False)
    assert wide.shape == (1, 4, 8, 12)


def test_vae_scale_factor_matches_the_configs(parts):
    assert VAE_SCALE_FACTOR == parts.vae.config.scaling_factor == sdxl_asset_config("vae")["scaling_factor"] == 0.13025


def test_time_ids_in_sdxl_order():
    ids = time_ids((1500, 1000), (0, 10), (1216, 832))
    assert ids.dtype == torch.float32 and ids.tolist() == [1500, 1000, 0, 10, 1216, 832]
    assert torch.stack([ids, time_ids((64, 64), (0, 0), (64, 64))]).shape == (2, 6)
    with pytest.raises(ValueError):
        time_ids((64, 64), (0,), (64, 64))


def test_time_ids_feed_the_unet(parts):
    context, pooled = encode_prompts(parts, CAPTIONS)
    added = {"text_embeds": pooled, "time_ids": torch.stack([time_ids((64, 64), (0, 0), (64, 64)),
                                                            time_ids((32, 64), (16, 0), (64, 64))])}
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * VAE_SCALE_FACTOR
    with torch.no_grad():
        out = parts.unet(latents, torch.tensor([500, 500]), encoder_hidden_states=context, added_cond_kwargs=added)
        same_size = parts.unet(latents, torch.tensor([500, 500]), encoder_hidden_states=context,
                               added_cond_kwargs={**added, "time_ids": added["time_ids"][:1].repeat(2, 1)})
    assert out.sample.shape == (2, 4, 8, 8)
    torch.testing.assert_close(out.sample[0], same_size.sample[0])
    assert not torch.allclose(out.sample[1], same_size.sample[1])  # the size conditioning reaches the output


# The tiny tokenizers: BOS 525, EOS 526; TE1 pads with EOS, TE2 with "!" = 0 (kohya forces TE2's pad id to 0).
# "cat" is 3 byte tokens (66, 64, 339) and "dog" 3 more (67, 78, 326).
BOS, EOS, CAT, DOG = 525, 526, [66, 64, 339], [67, 78, 326]


def test_tiny_tokenizers_have_sdxls_special_ids(parts):
    assert (parts.tokenizer.bos_token_id, parts.tokenizer.eos_token_id, parts.tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert (parts.tokenizer_2.bos_token_id, parts.tokenizer_2.eos_token_id, parts.tokenizer_2.pad_token_id) == (
        BOS, EOS, 0)
    assert parts.tokenizer("cat dog").input_ids == [BOS, *CAT, *DOG, EOS]


def test_chunk_ids_of_a_short_caption_at_150(parts):
    """v0.8.7 get_input_ids: 152 ids cut at i = 1, 76; TE1 as is, TE2 with an empty chunk's EOS moved to slot 1."""
    te1, te2 = chunked_ids(parts.tokenizer, ["cat dog"], 150), chunked_ids(parts.tokenizer_2, ["cat dog"], 150)
    assert te1.tolist() == [[[BOS, *CAT, *DOG] + [EOS] * 70, [BOS] + [EOS] * 76]]
    assert te2.tolist() == [[[BOS, *CAT, *DOG, EOS] + [0] * 69, [BOS, EOS] + [0] * 75]]


def test_chunk_ids_of_a_caption_over_75_tokens_at_150(parts):
    """30 cats = 90 tokens: chunk 0 is full (TE2's last id, a pad, becomes EOS), chunk 1 holds the other 15."""
    caption = " ".join(["cat"] * 30)
    te1, te2 = chunked_ids(parts.tokenizer, [caption], 150), chunked_ids(parts.tokenizer_2, [caption], 150)
    assert te1.tolist() == [[[BOS, *CAT * 25, EOS], [BOS, *CAT * 5] + [EOS] * 61]]
    assert te2.tolist() == [[[BOS, *CAT * 25, EOS], [BOS, *CAT * 5, EOS] + [0] * 60]]


def test_chunk_ids_of_a_caption_that_fills_one_chunk_exactly(parts):
    """25 cats = 75 tokens: its EOS opens chunk 1 (TE2 then needs no fix-up there)."""
    caption = " ".join(["cat"] * 25)
    te1, te2 = chunked_ids(parts.tokenizer, [caption], 150), chunked_ids(parts.tokenizer_2, [caption], 150)
    assert te1.tolist() == [[[BOS, *CAT * 25, EOS], [BOS] + [EOS] * 76]]
    assert te2.tolist() == [[[BOS, *CAT * 25, EOS], [BOS, EOS] + [0] * 75]]


def test_a_caption_over_225_tokens_is_cut_to_three_full_chunks(parts):
    caption = " ".join(["cat"] * 80)  # 240 tokens
    assert token_counts(parts.tokenizer, [caption, "cat dog"]) == [240, 6]
    for tokenizer in (parts.tokenizer, parts.tokenizer_2):
        assert chunked_ids(tokenizer, [caption], 225).tolist() == [[[BOS, *CAT * 25, EOS]] * 3]


@pytest.mark.parametrize("max_token_length", [150, 225])
def test_long_context_is_each_chunk_encoded_alone_and_rejoined_as_v087(parts, max_token_length):
    """Context (B, 2 + max_token_length, 32 + 48) even for a short caption; v0.8.7's reassembly of the (B, 77n, D)
    states: h[:, 0], h[:, i:i+75] for i in range(1, max_token_length, 77), h[:, -1]; the pool is chunk 0's."""
    captions = ["cat dog", " ".join(["cat"] * 60)]
    context, pooled = encode_prompts(parts, captions, max_token_length=max_token_length)
    assert context.shape == (2, 2 + max_token_length, 32 + 48) and pooled.shape == (2, 40)
    n = max_token_length // 75
    expected = []
    for tokenizer, encoder in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        ids = chunked_ids(tokenizer, captions, max_token_length).reshape(-1, 77)
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        h = out.hidden_states[-2].reshape(2, n * 77, -1)
        states = [h[:, :1], *(h[:, i : i + 75] for i in range(1, max_token_length, 77)), h[:, -1:]]
        expected.append(torch.cat(states, dim=1))
        if encoder is parts.text_encoder_2:
            torch.testing.assert_close(pooled, out.text_embeds[::n])  # first-EOS pool of chunk 0 (argmax = EOS)
    torch.testing.assert_close(context, torch.cat(expected, dim=-1))


def test_chunk_0_of_a_long_context_is_the_77_token_encoding(parts):
    """Chunk 0 holds the same ids as the 77-token path (BOS, the first 75 tokens, EOS; TE2 pads with 0 either way),
    so the pool and the first 76 states agree, for a short caption and for one the 77-token path cuts."""
    captions = ["cat dog", " ".join(["cat"] * 60)]
    short_context, short_pooled = encode_prompts(parts, captions)
    context, pooled = encode_prompts(parts, captions, max_token_length=225)
    torch.testing.assert_close(pooled, short_pooled)
    torch.testing.assert_close(context[:, :76], short_context[:, :76])
    assert not torch.allclose(context[:, 76:151], short_context[:, 1:76])


def test_null_and_75_are_the_77_token_path(parts):
    context, pooled = encode_prompts(parts, CAPTIONS)
    same_context, same_pooled = encode_prompts(parts, CAPTIONS, max_token_length=75)
    assert torch.equal(context, same_context) and torch.equal(pooled, same_pooled)


def test_long_encoding_builds_a_graph_only_when_training_the_encoders(parts):
    assert not encode_prompts(parts, ["cat"], max_token_length=150)[0].requires_grad
    parts.text_encoder_2.requires_grad_(True)
    try:
        context, pooled = encode_prompts(parts, ["cat"], max_token_length=150, train=True)
        (context.sum() + pooled.sum()).backward()
        assert parts.text_encoder_2.get_input_embeddings().weight.grad is not None
    finally:
        parts.text_encoder_2.requires_grad_(False)
        parts.text_encoder_2.zero_grad(set_to_none=True)
