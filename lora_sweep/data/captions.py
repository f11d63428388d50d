"""Captions as kohya sd-scripts v0.8.7 reads and shuffles them.

A caption is the first line of `<image stem><caption_extension>` beside the image (kohya's `read_caption`); without
that file the caller falls back to the folder's class tokens. The policy, as kohya's: an empty file (0 bytes) is an
error; a file whose first line is blank gives an empty caption (the dataset scan warns, naming the files); bytes
that are not UTF-8 are an error naming the byte. `shuffle_caption` is kohya's `process_caption` with
`shuffle_caption=True`: split on the separator, keep the first `keep_tokens` in place, shuffle the rest, re-join with
", ". The random generator is passed in, so a run can seed it (kohya uses the global `random`).
"""

from __future__ import annotations

import random
from pathlib import Path

from lora_sweep.errors import UserError


def caption_path(image_path: str | Path, caption_extension: str = ".txt") -> Path:
    """The caption file of an image: same folder and stem, `caption_extension` ("txt" is read as ".txt", as kohya
    adds the missing dot)."""
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + caption_extension)


def read_caption(image_path: str | Path, caption_extension: str = ".txt") -> str | None:
    """The first line of the image's caption file, stripped; None when there is no such file.

    Like kohya, an empty file is an error (kohya asserts), and only the first line counts. A UTF-8 byte-order mark
    is dropped (kohya keeps it as a character of the first tag, which editors on Windows add unseen)."""
    path = caption_path(image_path, caption_extension)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")  # universal newlines, like kohya's readlines()
    except UnicodeDecodeError as error:
        raise UserError(
            f"caption file '{path}' is not valid UTF-8 ({error.reason} at byte {error.start}). Save it as UTF-8."
        ) from None
    if not text:
        raise UserError(
            f"caption file '{path}' is empty. Write the caption on its first line, or delete the file to use the "
            "folder's class tokens (the <name> of <repeats>_<name>) instead."
        )
    return text.split("\n", 1)[0].strip()


def shuffle_caption(
    caption: str,
    *,
    keep_tokens: int,
    separator: str = ",",
    rng: random.Random,
    keep_tokens_separator: str | None = None,
) -> str:
    """kohya's caption shuffle: tags = caption split on `separator`, each stripped; the first `keep_tokens` stay,
    the rest are shuffled with `rng`; the result is joined with ", " (whatever the separator was).

    Empty tags are kept, as in kohya ("a,,b" has an empty middle tag). With `keep_tokens_separator` present in the
    caption (kohya's option of that name), the part before it is the fixed prefix instead of `keep_tokens`, a second
    occurrence starts a fixed suffix, and empty tags are dropped, as kohya does in that branch."""
    if keep_tokens < 0:
        raise UserError(f"data.keep_tokens: {keep_tokens} must be >= 0.")
    suffix: list[str] = []
    if keep_tokens_separator and keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(keep_tokens_separator, 1)
        if keep_tokens_separator in flex_part:
            flex_part, suffix_part = flex_part.split(keep_tokens_separator, 1)
            suffix = _tags(suffix_part, separator, drop_empty=True)
        fixed = _tags(fixed_part, separator, drop_empty=True)
        flex = _tags(flex_part, separator, drop_empty=True)
    else:
        tags = _tags(caption.strip(), separator, drop_empty=False)
        fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(flex)
    return ", ".join(fixed + flex + suffix)


def _tags(text: str, separator: str, *, drop_empty: bool) -> list[str]:
    tags = [tag.strip() for tag in text.split(separator)]
    return [tag for tag in tags if tag] if drop_empty else tags
