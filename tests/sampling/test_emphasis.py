"""Sample prompts encoded as kohya v0.8.7's SDXL long-prompt-weighting pipeline encodes them; the expected values
were derived by running v0.8.7's `library/sdxl_lpw_stable_diffusion.py` functions on the same inputs."""

from __future__ import annotations

import logging

import pytest
import torch

from lora_sweep.sampling.emphasis import (
    encode_sample_prompt,
    pad_ids_and_weights,
    parse_prompt_attention,
    rescale_to_mean,
    tokens_with_weights,
    windows,
)
from lora_sweep.sampling.images import sample_images
from lora_sweep.sampling.prompts import PromptSpec


@pytest.fixture(scope="module")
def pipe():
    from lora_sweep.model.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(seed=0)


def encode(pipe, prompt: str, negative: str = "", guidance: bool = True, where: str = "") -> dict:
    return encode_sample_prompt(tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
                                text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, prompt=prompt,
                                negative=negative, guidance=guidance, where=where)


@pytest.mark.parametrize(("text", "expected"), [
    # the examples of v0.8.7's parse_prompt_attention docstring (A1111's)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # v0.8.7's quirks: a lone backslash is dropped, ':' outside (text:number) and unopened closers are text
    ("a\\b c", [("ab c", 1.0)]),
    ("a:b (c:d) e", [("a:b ", 1.0), ("c:d", 1.1), (" e", 1.0)]),
    ("x) y] z", [("x) y] z", 1.0)]),
    ("[[a]] (b:0.5) \\\\ c", [("a", 0.8264462809917354), (" ", 1.0), ("b", 0.5), (" \\ c", 1.0)]),
    ("(a [b] c:2.0)", [("a ", 2.0), ("b", 1.8181818181818181), (" c", 2.0)]),
    ("((a) b:0.5)", [("a", 0.55), (" b", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_prompt_attention_as_v087(text, expected):
    assert parse_prompt_attention(text) == expected


def test_a_weight_that_is_no_number_is_a_value_error():
    with pytest.raises(ValueError, match="the emphasis weight '1.2.3' is not a number"):
        parse_prompt_attention("a (red:1.2.3) cat")


def test_weights_per_token_on_the_tiny_tokenizer(pipe):
    """Each piece tokenized alone, its weight repeated per token; v0.8.7 gives these ids and weights."""
    ids, weights, cut = tokens_with_weights(pipe.tokenizer, "a (red:1.5) [cat], photo", 225)
    assert ids == [320, 81, 68, 323, 66, 64, 339, 267, 522]
    assert weights == [1.0, 1.5, 1.5, 1.5, 1 / 1.1, 1 / 1.1, 1 / 1.1, 1.0, 1.0]
    assert not cut
    assert tokens_with_weights(pipe.tokenizer, "(((the cat)))", 225)[:2] == ([513, 66, 64, 339],
                                                                              [1.3310000000000004] * 4)
    assert tokens_with_weights(pipe.tokenizer, "a " * 230, 225)[1:] == ([1.0] * 225, True)


def test_weights_are_laid_out_per_77_id_window():
    """80 tokens of weight 2 in two windows: positions 1-75 and 78-82 (each window's BOS and EOS slots are 1.0)."""
    ids, weights = pad_ids_and_weights([5] * 80, [2.0] * 80, 2, bos=8, eos=9, pad=0)
    assert ids == [8] + [5] * 80 + [9] + [0] * 70
    assert len(weights) == 154
    assert [i for i, w in enumerate(weights) if w != 1.0] == [*range(1, 76), *range(78, 83)]


@pytest.mark.parametrize("pad", [9, 0])
def test_window_ends_as_v087_fixes_them(pad):
    """TE1 (pad == eos) ends every window with the sequence's last id; TE2 puts an EOS where text would end the
    window and after a BOS that only padding follows."""
    ids = torch.tensor([pad_ids_and_weights([1] * 80, [], 3, bos=8, eos=9, pad=pad)[0]])
    first, second, third = windows(ids, 3, eos=9, pad=pad)
    assert first[0].tolist() == [8] + [1] * 75 + [9]
    assert second[0].tolist() == [8, 1, 1, 1, 1, 1, 9] + [pad] * 70
    assert third[0].tolist() == [8, 9] + [pad] * 75


def test_the_rescale_keeps_the_mean():
    """v0.8.7's arithmetic on a small tensor: times the weights, then times previous mean / weighted mean."""
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]]])
    weights = torch.tensor([[1.0, 1.5, 1.1]])
    expected = torch.tensor([[[0.7335907816886902, 1.4671815633773804], [3.3011584281921387, 4.401544570922852],
                              [-0.8069498538970947, 0.40347492694854736]]])
    assert torch.equal(rescale_to_mean(states, weights), expected)
    half = rescale_to_mean(states.half(), weights.half())  # means rounded to float16, weights too (1.1 -> 1.0996)
    assert half.tolist() == [[[0.7333984375, 1.466796875], [3.30078125, 4.3984375], [-0.806640625, 0.4033203125]]]


def test_plain_short_prompts_encode_bit_for_bit_as_diffusers(pipe):
    """No emphasis, under 76 tokens: the embeddings diffusers' encode_prompt gives (the path sampling used before),
    so existing runs' samples and img/* metrics do not change; an empty negative is the encoded empty text."""
    for prompt, negative in [("a photo of a cat", ""), ("the photo of the dog", "blurry, lowres")]:
        expected = pipe.encode_prompt(prompt, negative_prompt=negative, device=torch.device("cpu"),
                                      num_images_per_prompt=1, do_classifier_free_guidance=True)
        got = encode(pipe, prompt, negative)
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        assert all(torch.equal(got[name], want) for name, want in zip(names, expected, strict=True))


def test_emphasis_weights_each_encoders_states_and_not_the_pool(pipe):
    """'(a photo:1.2) of a cat' has the ids of 'a photo of a cat': its states are those times the weights, rescaled to
    the mean per encoder (TE1 and TE2 each by its own); the pooled output is unweighted."""
    plain = pipe.encode_prompt("a photo of a cat", device=torch.device("cpu"), num_images_per_prompt=1,
                               do_classifier_free_guidance=False)
    got = encode(pipe, "(a photo:1.2) of a cat", guidance=False)
    weights = torch.ones(1, 77)
    weights[0, 1:3] = 1.2  # BOS, "a", "photo", ...
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    te1, te2 = (part.contiguous() for part in plain[0].split(widths, dim=-1))  # contiguous: the same mean rounding
    expected = torch.cat([rescale_to_mean(te1, weights), rescale_to_mean(te2, weights)], dim=-1)
    assert torch.equal(got["prompt_embeds"], expected)
    assert torch.equal(got["pooled_prompt_embeds"], plain[2])
    assert got["negative_prompt_embeds"] is None and got["negative_pooled_prompt_embeds"] is None


def test_long_prompts_take_up_to_three_windows_pooled_from_the_first(pipe):
    """A prompt of 100 tokens: two 77-id windows (154 states), the negative padded to the same; the first window and
    the pool are those of its first 75 tokens; over 225 tokens: three windows, the rest cut."""
    long, first75 = encode(pipe, "a " * 100, ""), encode(pipe, "a " * 75, "", guidance=False)
    assert long["prompt_embeds"].shape == long["negative_prompt_embeds"].shape == (1, 154, 80)
    assert torch.equal(long["prompt_embeds"][:, :77], first75["prompt_embeds"])
    assert torch.equal(long["pooled_prompt_embeds"], first75["pooled_prompt_embeds"])
    assert encode(pipe, "a " * 300, "b")["prompt_embeds"].shape == (1, 231, 80)


def test_a_300_token_prompt_samples_quietly_with_one_warning(pipe, caplog, capfd, monkeypatch):
    """No diffusers truncation notice nor tokenizer length notice on the console: one lora-sweep warning naming the
    prompt's place, said once however often it is sampled."""
    monkeypatch.setattr("lora_sweep.sampling.emphasis._said_cut", set())  # this process's earlier warnings
    spec = PromptSpec("a " * 300, width=64, height=64, seed=1, steps=1, cfg=5.0, where="prompts.txt, line 3")
    parts = dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                 tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2)
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            assert len(sample_images(prompts=[spec], **parts)) == 1
    console = capfd.readouterr()
    text = console.out + console.err + caplog.text
    assert "truncated" not in text and "Token indices" not in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("prompts.txt, line 3: the prompt has more than 225 tokens")
