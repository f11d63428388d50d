"""Captions as kohya sd-scripts v0.8.7 reads and processes them (docs/data.md#caption-processing): `read_caption`
at scan time, `process_caption` each time an image enters a batch. Draws come from the `rng` passed in: Python's
global `random` in training (kohya's one Py stream), a `random.Random` in tests.
"""

from __future__ import annotations

import math
import os
import random
import re
from pathlib import Path

from lora_sweep.data.subsets import Subset
from lora_sweep.errors import Fallback, UserError

WILDCARD = re.compile(r"\{([^}]+)\}")  # v0.8.7's pattern: any {...}, one choice each, no nesting
WILDCARD_SYNTAX = re.compile(r"\{[^{}|]*\|[^{}]*\}")  # what reads as a wildcard someone meant: {a|b}
FOLDER_SETTINGS = ("data.dir", "data.reg_data_dir")  # subsets whose options are the data.* keys


def caption_path(image_path: str | Path, caption_extension: str = ".txt") -> Path:
    """The caption file of an image: same folder and stem, `caption_extension` ("txt" read as ".txt", as kohya)."""
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + caption_extension)


def caption_file(image_path: str | Path, caption_extension: str = ".txt") -> Path | None:
    """The caption file `read_caption` reads, or None: the image's own, else (a face-crop name `<stem>_cx_cy_w_h`,
    five or more `_` tokens) the stem without its last four tokens, as v0.8.7. v0.8.7 splits the whole path, so
    underscores in folder names count; lora-sweep splits the file name, so the file stays in the image's folder."""
    path = caption_path(image_path, caption_extension)
    if os.path.lexists(path):
        return path
    tokens = path.stem.split("_")
    if len(tokens) >= 5:
        face_crop = path.with_name("_".join(tokens[:-4]) + path.suffix)
        if os.path.lexists(face_crop):
            return face_crop
    return None


def read_caption(image_path: str | Path, caption_extension: str = ".txt", *,
                 enable_wildcard: bool = False) -> str | None:
    """The image's caption (`caption_file`); None without the file. Without `enable_wildcard` the first line, stripped;
    with it every non-blank line, stripped, joined with "\\n" (`process_caption` picks one). An empty file, or one that
    cannot be read (a link to nothing, no permission, a folder), is an error (kohya asserts or raises). A UTF-8 BOM
    is dropped (kohya keeps it in the first tag)."""
    path = caption_file(image_path, caption_extension)
    if path is None:
        return None
    why = None if path.is_file() else (f"a link to '{os.readlink(path)}', which is gone" if not path.exists()
                                       else "not a regular file")
    try:
        text = "" if why else path.read_text(encoding="utf-8-sig")  # universal newlines, like kohya's readlines()
    except OSError as error:
        why = error.strerror or str(error)
    except UnicodeDecodeError as error:
        raise UserError(
            f"caption file '{path}' is not valid UTF-8 ({error.reason} at byte {error.start}). Save it as UTF-8."
        ) from None
    if why:
        raise UserError(f"caption file '{path}' cannot be read ({why}). Restore or fix it, or delete it to use the "
                        "folder's class tokens (the <name> of <repeats>_<name>) instead.")
    if not text:
        raise UserError(
            f"caption file '{path}' is empty. Write the caption on its first line, or delete the file to use the "
            "folder's class tokens (the <name> of <repeats>_<name>) instead."
        )
    if enable_wildcard:
        return "\n".join(line.strip() for line in text.split("\n") if line.strip())
    return text.split("\n", 1)[0].strip()


def process_caption(caption: str, subset: Subset, *, epoch: int, step: int, max_train_steps: int,
                    rng=random) -> str:
    """v0.8.7's `BaseDataset.process_caption` (docs/data.md#caption-processing), with its draws in its order.

    `epoch` and `step` are what the v0.8.7 dataset holds when it builds the batch (`seen_position`): the 1-based
    epoch, lagging by one at each epoch's first batch (0 at the very first), and the optimizer step, lagging.
    `max_train_steps` turns a `token_warmup_step` below 1 into a fraction of the run. A dropped caption is "" with
    its prefix and suffix, and draws nothing after the dropout draw.
    """
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix
    # one draw only with a rate; the epoch rule draws nothing
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every_n = subset.caption_dropout_every_n_epochs
    if dropped or (every_n > 0 and epoch % every_n == 0):
        return ""
    caption = _wildcards(caption, rng) if subset.enable_wildcard else caption.split("\n")[0]
    if _has_tag_pipeline(subset):
        caption = _tag_pipeline(caption, subset, step, max_train_steps, rng)
    if subset.secondary_separator:
        # the bare separator, no space: "d;;;e" comes out as "d,e"
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption


def _wildcards(caption: str, rng) -> str:
    """One line by `rng.choice` if several, then each `{a|b}` left to right by `rng.choice`; `{{` and `}}` are
    literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # placeholders for escaped braces, longer until the caption does not hold them
    open_mark, close_mark = "⦅", "⦆"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "⦅", close_mark + "⦆"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _has_tag_pipeline(subset: Subset) -> bool:
    """Whether captions are split into tags and re-joined (else they pass through untouched)."""
    return subset.shuffle_caption or subset.token_warmup_step > 0 or subset.caption_tag_dropout_rate > 0


def _tag_pipeline(caption: str, subset: Subset, step: int, max_train_steps: int, rng) -> str:
    """Split into fixed and flex tags, truncate for token warmup, shuffle, drop tags, join with ", "."""
    separator, keep_separator = subset.caption_separator, subset.keep_tokens_separator
    fixed_suffix: list[str] = []
    if keep_separator and keep_separator in caption:
        fixed_part, flex_part = caption.split(keep_separator, 1)
        if keep_separator in flex_part:
            flex_part, suffix_part = flex_part.split(keep_separator, 1)
            fixed_suffix = _tags(suffix_part, separator)
        fixed, flex = _tags(fixed_part, separator), _tags(flex_part, separator)
    else:
        # empty tags are kept here: a trailing comma is a "" tag
        tags = [tag.strip() for tag in caption.strip().split(separator)]
        keep = subset.keep_tokens if subset.keep_tokens > 0 else 0
        fixed, flex = tags[:keep], tags[keep:]
    warmup = subset.token_warmup_step
    if warmup < 1:
        # a fraction of the run (v0.8.7 writes this back into its subset; the value is the same every call)
        warmup = math.floor(warmup * max_train_steps)
    if warmup and step < warmup:
        # the first tags in caption order, before the shuffle
        flex = flex[: math.floor(step * ((len(flex) - subset.token_warmup_min) / warmup)) + subset.token_warmup_min]
    if subset.shuffle_caption:
        rng.shuffle(flex)
    if subset.caption_tag_dropout_rate > 0:
        # one draw per flex tag, after the shuffle
        flex = [tag for tag in flex if rng.random() >= subset.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + fixed_suffix)


def _tags(text: str, separator: str) -> list[str]:
    """The non-empty stripped tags of a part split by kohya's keep-tokens separator."""
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def fixed_caption(caption: str, subset: Subset) -> str | None:
    """The processed caption when processing draws nothing and reads neither epoch nor step, else None.

    Training encodes a fixed caption once (cached text-encoder outputs) and the others at every step. The cache holds
    the processed caption (prefix, suffix and secondary separator applied): what v0.8.7 trains on without
    `--cache_text_encoder_outputs`, its default for LoRA. (v0.8.7 with that flag caches the raw caption and ignores
    those options; docs/data.md#caption-processing.) With `enable_wildcard`, a caption without "{" or "\\n" is fixed.
    """
    if subset.caption_dropout_rate > 0 or subset.caption_dropout_every_n_epochs > 0 or _has_tag_pipeline(subset):
        return None
    if subset.enable_wildcard and ("{" in caption or "\n" in caption):
        return None
    # nothing above draws, so no generator is needed
    return process_caption(caption, subset, epoch=1, step=0, max_train_steps=0, rng=None)


def seen_position(epoch: int, batch_index: int, batches_per_epoch: int, grad_accum: int) -> tuple[int, int]:
    """(current_epoch, current_step) the v0.8.7 dataset holds when it builds micro-batch `batch_index` (0-based) of
    0-based `epoch`, with max_data_loader_n_workers=0 and accelerate's DataLoaderShard
    (docs/data.md#caption-processing).

    The batch is built with what the previous batch's collate copied from the loop. The loop sets epoch + 1 before
    each epoch's iterator and the global step at the start of each micro-batch. The iterator fetches b0 and b1 before
    b0's body and b(j+1) after b(j-1)'s body, so the previous batch m was fetched after the body of m-2 (m-1 when m
    opens its epoch), and the batch sees epoch(m) + 1 and that body's global step (0 before any body, and at n = 0).
    Global step at micro-batch j of epoch e: e * ceil(B / grad_accum) + j // grad_accum.
    """
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)

    def global_step(n: int) -> int:
        """The optimizer steps before micro-batch `n` (counted over all epochs) starts; 0 before the first."""
        if n < 0:
            return 0
        return n // batches_per_epoch * steps_per_epoch + n % batches_per_epoch // grad_accum

    n = epoch * batches_per_epoch + batch_index
    if n == 0:
        return 0, 0  # the dataset's initial values: no collate has run
    previous_epoch, previous_index = divmod(n - 1, batches_per_epoch)
    body_before = n - 3 if previous_index >= 1 else n - 2
    return previous_epoch + 1, global_step(body_before)


def caption_syntax_fallbacks(items) -> list[Fallback]:
    """Captions with kohya syntax their subset's option leaves as literal text: "|||" without a
    keep_tokens_separator, `{a|b}` without enable_wildcard. One Fallback per option, naming the caption files (the
    image, for a caption from class tokens); kohya says nothing."""
    keep, wildcard = [], []
    for item in items:
        subset = item.subset
        if "|||" in item.caption and not subset.keep_tokens_separator:
            keep.append(item)
        if not subset.enable_wildcard and WILDCARD_SYNTAX.search(item.caption):
            wildcard.append(item)
    rows = ((keep, "keep_tokens_separator", "'|||'", "'|||'"),
            (wildcard, "enable_wildcard", "'{a|b}' wildcards", "true"))
    return [_syntax_fallback(found, key, syntax, value) for found, key, syntax, value in rows if found]


def _syntax_fallback(items, key: str, syntax: str, value: str) -> Fallback:
    """One Fallback for `items`, whose captions hold `syntax` while their subsets' `key` is off; the hint names the
    setting to turn on: `data.<key>` for data.dir and data.reg_data_dir folders, the subset's own otherwise."""
    paths = tuple(dict.fromkeys(str(caption_file(item.path, item.subset.caption_extension) or item.path)
                                for item in items))
    places = dict.fromkeys(f"data.{key}={value}" if item.subset.setting.startswith(FOLDER_SETTINGS)
                           else f"{key}={value} in {item.subset.setting}" for item in items)
    off = "is empty" if key == "keep_tokens_separator" else "is off"
    return Fallback(f"data.{key}", f"caption files with {syntax} while data.{key} {off}: trained as literal text "
                    "(kohya is silent)", paths, f"Set {' and '.join(places)}, or take {syntax} out of the captions.")


def shuffle_caption(
    caption: str,
    *,
    keep_tokens: int,
    separator: str = ",",
    rng: random.Random,
    keep_tokens_separator: str | None = None,
) -> str:
    """kohya's caption shuffle alone (`process_caption` with shuffle_caption and nothing else, which replaces it)."""
    if keep_tokens < 0:
        raise UserError(f"data.keep_tokens: {keep_tokens} must be >= 0.")
    subset = Subset(Path(), "data.dir", caption_separator=separator, shuffle_caption=True, keep_tokens=keep_tokens,
                    keep_tokens_separator=keep_tokens_separator or "")
    return process_caption(caption, subset, epoch=1, step=0, max_train_steps=0, rng=rng)
