"""Captions as kohya sd-scripts v0.8.7 reads and shuffles them (`read_caption`, `process_caption`). The shuffle's random
generator is passed in, so a run seeds it (kohya uses the global `random`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from lora_sweep.errors import UserError


def caption_path(image_path: str | Path, caption_extension: str = ".txt") -> Path:
    """The caption file of an image: same folder and stem, `caption_extension` ("txt" read as ".txt", as kohya)."""
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + caption_extension)


def read_caption(image_path: str | Path, caption_extension: str = ".txt") -> str | None:
    """The first line of the image's caption file, stripped; None without the file. An empty file, or one that cannot be
    read (a link to nothing, no permission, a folder), is an error (kohya asserts or raises). A UTF-8 BOM is dropped
    (kohya keeps it in the first tag)."""
    path = caption_path(image_path, caption_extension)
    if not os.path.lexists(path):
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
    return text.split("\n", 1)[0].strip()


def shuffle_caption(
    caption: str,
    *,
    keep_tokens: int,
    separator: str = ",",
    rng: random.Random,
    keep_tokens_separator: str | None = None,
) -> str:
    """kohya's caption shuffle: split on `separator`, strip, keep the first `keep_tokens`, shuffle the rest with `rng`,
    join with ", ". Empty tags are kept, as kohya. With `keep_tokens_separator` in the caption, the part before it is
    the fixed prefix, a second one starts a fixed suffix, and empty tags are dropped (kohya's branch)."""
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
