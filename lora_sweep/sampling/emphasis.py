"""Sample prompts encoded as kohya sd-scripts v0.8.7's SDXL sampling encodes them: its long-prompt-weighting pipeline,
`library/sdxl_lpw_stable_diffusion.py` (docs/kohya-reference.md §9, docs/comparing.md "Emphasis and long prompts").

- A1111 emphasis (`parse_prompt_attention`): `(text)` x1.1, `[text]` /1.1, `(text:1.5)` x1.5, nested brackets
  multiply, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal; an unclosed bracket weights the rest of the prompt.
- Each weighted piece is tokenized alone (no BOS/EOS) and its weight repeated per token; at most `MAX_CHUNKS` x 75
  = 225 tokens are kept.
- The ids are BOS + tokens + EOS + padding to 75·n + 2, n = the chunks the longer of prompt and negative needs; each
  77-id window (stride 75) is encoded alone and the windows' states concatenated whole (77·n positions).
- Each encoder's states are multiplied by the token weights, then scaled so their mean is the unweighted one; the
  pooled output is TE2's, of the first window, unweighted.

A prompt and negative without emphasis that fit in 75 tokens give diffusers' `encode_prompt` values bit for bit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHUNK = 77  # CLIP's context: BOS + 75 tokens + EOS
MAX_CHUNKS = 3  # v0.8.7's `max_embeddings_multiples` default: prompts up to 3 x 75 = 225 tokens
EMPHASIS, DEEMPHASIS = 1.1, 1 / 1.1

# A1111's attention syntax: escapes, brackets, ":weight)", and runs of plain text (one match per token of syntax).
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")
_said_cut: set[tuple[str, str]] = set()  # (where, text) of the prompts already warned about in this process


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """`text` as (piece, weight) pairs, A1111's rules as v0.8.7 has them: adjacent pieces of equal weight merged, an
    empty prompt is [("", 1.0)], a lone backslash is dropped, a `:` outside `(text:number)` is plain text."""
    pieces: list[list] = []
    round_opens: list[int] = []  # where each open "(" starts in `pieces`
    square_opens: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_opens.append(len(pieces))
        elif token == "[":
            square_opens.append(len(pieces))
        elif weight is not None and round_opens:
            multiply_from(round_opens.pop(), _number(weight))
        elif token == ")" and round_opens:
            multiply_from(round_opens.pop(), EMPHASIS)
        elif token == "]" and square_opens:
            multiply_from(square_opens.pop(), DEEMPHASIS)
        else:  # plain text, or a closing bracket with no opening one
            pieces.append([token, 1.0])
    for start in round_opens:  # unclosed brackets close at the end
        multiply_from(start, EMPHASIS)
    for start in square_opens:
        multiply_from(start, DEEMPHASIS)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


def _number(weight: str) -> float:
    try:
        return float(weight)
    except ValueError:  # v0.8.7 stops sampling with float()'s error here
        raise ValueError(f"the emphasis weight '{weight}' is not a number") from None


def emphasis_problem(text: str) -> str | None:
    """Why `text`'s emphasis cannot be read (a `(text:weight)` whose weight is not a number, e.g. `1.2.3`), or None."""
    try:
        parse_prompt_attention(text)
    except ValueError as error:
        return str(error)
    return None


def tokens_with_weights(tokenizer: Any, prompt: str, limit: int) -> tuple[list[int], list[float], bool]:
    """(ids, weight per id, cut): each parsed piece tokenized alone without BOS/EOS, at most `limit` ids kept; `cut`
    says ids were dropped. Pieces after the one that overflows are not tokenized (as v0.8.7)."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(prompt):
        piece_ids = tokenizer(piece, verbose=False).input_ids[1:-1]  # verbose=False: no "longer than 77" notice
        ids += piece_ids
        weights += [weight] * len(piece_ids)
        if len(ids) > limit:
            break
    return ids[:limit], weights[:limit], len(ids) > limit


def chunks_for(*lengths: int) -> int:
    """The number of 77-id windows for the longest of `lengths` tokens: 1 to `MAX_CHUNKS`."""
    return max(1, min(MAX_CHUNKS, (max(lengths) - 1) // (CHUNK - 2) + 1))


def pad_ids_and_weights(ids: Sequence[int], weights: Sequence[float], chunks: int, *, bos: int, eos: int,
                        pad: int) -> tuple[list[int], list[float]]:
    """BOS + ids + EOS + pad to 75·chunks + 2 ids; weights laid out per window (1.0 at each window's BOS and EOS
    slots and after the text) to 77·chunks, the length of the concatenated states."""
    length = (CHUNK - 2) * chunks + 2
    padded = [bos, *ids, eos] + [pad] * (length - 2 - len(ids))
    body = CHUNK - 2
    laid_out: list[float] = []
    for index in range(chunks if weights else 0):
        laid_out += [1.0, *weights[index * body : (index + 1) * body], 1.0]
    return padded, laid_out + [1.0] * (CHUNK * chunks - len(laid_out))


def windows(ids: torch.Tensor, chunks: int, *, eos: int, pad: int) -> list[torch.Tensor]:
    """The 77-id windows of (B, 75·chunks + 2) `ids`, stride 75, as v0.8.7 fixes their ends: BOS first; with pad ==
    eos (TE1) the sequence's last id last; otherwise (TE2) EOS where text would end the window and EOS after a BOS
    that only padding follows. One window is `ids` itself, unchanged."""
    if chunks == 1:
        return [ids]
    body = CHUNK - 2
    out = []
    for index in range(chunks):
        window = ids[:, index * body : index * body + CHUNK].clone()
        window[:, 0] = ids[0, 0]
        if pad == eos:
            window[:, -1] = ids[0, -1]
        else:
            for row in window:
                if row[-1] != eos and row[-1] != pad:  # text runs to the window's end
                    row[-1] = eos
                if row[1] == pad:  # a window of padding only
                    row[1] = eos
        out.append(window)
    return out


def encode_windows(text_encoder: Any, ids: torch.Tensor, chunks: int, *, eos: int, pad: int,
                   pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 77·chunks, hidden) penultimate states, each window encoded alone, and with `pooled` the first window's
    pooled output (TE2's text_projection at its first EOS, kohya's `pool_workaround`)."""
    import torch

    from lora_sweep.model.encode import first_eos_index

    states, pool = [], None
    for index, window in enumerate(windows(ids, chunks, eos=eos, pad=pad)):
        window = window.to(text_encoder.device)
        out = text_encoder(window, output_hidden_states=True, return_dict=True)
        states.append(out.hidden_states[-2])  # kohya: TE1 hidden_states[11] (of 12 layers), TE2 [-2]
        if pooled and index == 0:
            rows = torch.arange(window.shape[0], device=window.device)
            # no cast back to the states' dtype (kohya casts): the pooled values are diffusers' text_embeds
            pool = text_encoder.text_projection(out.last_hidden_state[rows, first_eos_index(window, eos)])
    return torch.cat(states, dim=1), pool


def rescale_to_mean(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`states` (B, T, C) times `weights` (B, T, the states' dtype), scaled so the mean over T and C is the unweighted
    one (means in float32, rounded to the states' dtype, as v0.8.7)."""
    previous = states.float().mean(dim=[-2, -1]).to(states.dtype)
    weighted = states * weights.unsqueeze(-1)
    current = weighted.float().mean(dim=[-2, -1]).to(states.dtype)
    return weighted * (previous / current).unsqueeze(-1).unsqueeze(-1)


def encode_sample_prompt(*, tokenizer: Any, tokenizer_2: Any, text_encoder: Any, text_encoder_2: Any, prompt: str,
                         negative: str, guidance: bool, where: str = "") -> dict[str, torch.Tensor | None]:
    """The prompt (and, with `guidance`, the negative) as v0.8.7's SDXL sampling encodes them, as the keyword
    arguments of diffusers' SDXL pipeline: prompt_embeds (1, 77·n, h1 + h2), pooled_prompt_embeds and the negative
    pair (None without guidance). A prompt cut at 225 tokens is warned about once per process, naming `where`."""
    import torch

    limit = (CHUNK - 2) * MAX_CHUNKS
    texts = {"prompt": prompt, "negative prompt": negative} if guidance else {"prompt": prompt}
    states: dict[str, list[torch.Tensor]] = {name: [] for name in texts}
    pools: dict[str, torch.Tensor | None] = {}
    with torch.no_grad():
        for tok, encoder, second in ((tokenizer, text_encoder, False), (tokenizer_2, text_encoder_2, True)):
            parsed = {name: tokens_with_weights(tok, text, limit) for name, text in texts.items()}
            chunks = chunks_for(*(len(ids) for ids, _, _ in parsed.values()))
            for name, (ids, weights, cut) in parsed.items():
                if cut:
                    _say_cut(where, name, texts[name])
                padded, laid_out = pad_ids_and_weights(ids, weights, chunks, bos=tok.bos_token_id,
                                                       eos=tok.eos_token_id, pad=tok.pad_token_id)
                hidden, pool = encode_windows(encoder, torch.tensor([padded]), chunks, eos=tok.eos_token_id,
                                              pad=tok.pad_token_id, pooled=second)
                weights_tensor = torch.tensor([laid_out], dtype=hidden.dtype, device=hidden.device)
                states[name].append(rescale_to_mean(hidden, weights_tensor))
                if second:
                    pools[name] = pool
    embeds = {name: torch.cat(parts, dim=-1) for name, parts in states.items()}
    return {
        "prompt_embeds": embeds["prompt"],
        "pooled_prompt_embeds": pools["prompt"],
        "negative_prompt_embeds": embeds.get("negative prompt"),
        "negative_pooled_prompt_embeds": pools.get("negative prompt"),
    }


def _say_cut(where: str, name: str, text: str) -> None:
    if (where, text) in _said_cut:
        return
    _said_cut.add((where, text))
    log.warning("%s: the %s has more than %d tokens; sampled with the first %d, as kohya v0.8.7 samples it "
                "(shorten it to silence this): %r", where or "sampling", name, (CHUNK - 2) * MAX_CHUNKS,
                (CHUNK - 2) * MAX_CHUNKS, text if len(text) <= 80 else text[:77] + "...")
