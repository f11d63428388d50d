"""Fonts that draw a label's characters: Pillow's default font (Latin letters only), else the first font matplotlib's
font manager knows that has a glyph for every character (Noto Sans CJK, Droid Sans Fallback, ... when installed;
nothing is downloaded), else none, and the caller labels by number.
"""

from __future__ import annotations

import functools

from PIL import ImageFont

NO_GLYPH = "\U000f0000"  # a private-use code point: fonts draw it as their missing-glyph box
# fonts whose "glyphs" are placeholder boxes for every character of a Unicode block: they draw nothing legible
PLACEHOLDER_FONTS = ("Last Resort",)


def default_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def has_glyphs(text: str, font) -> bool:
    """True if the Pillow `font` draws every character of `text` (none comes out as the font's missing-glyph box)."""
    def drawn(char: str) -> tuple:
        mask = font.getmask(char)
        return mask.size, bytes(mask)

    missing = drawn(NO_GLYPH)
    return all(drawn(char) != missing for char in set(text) if not char.isspace())


def font_file_for(text: str) -> str | None:
    """The file of the first font in matplotlib's font list (regular faces first, then by name) with a glyph for every
    non-space character of `text`; None when there is none."""
    return next((path for path in _candidate_files() if covers(path, text)), None)


def covers(path: str, text: str) -> bool:
    """True if the font file at `path` has a glyph for every non-space character of `text`."""
    return {ord(char) for char in text if not char.isspace()} <= _charmap(path)


def label_font(text: str, size: int):
    """A Pillow font of `size` px that draws `text`: the default one if it can, else `font_file_for`'s; None when no
    font here has the glyphs."""
    font = default_font(size)
    if has_glyphs(text, font):
        return font
    path = font_file_for(text)
    return ImageFont.truetype(path, size) if path is not None else None


def _candidate_files() -> list[str]:
    from matplotlib import font_manager

    entries = [entry for entry in font_manager.fontManager.ttflist if not entry.name.startswith(PLACEHOLDER_FONTS)]
    entries.sort(key=lambda e: (e.style != "normal", e.weight not in (400, "normal", "regular"), e.name, e.fname))
    return [entry.fname for entry in entries]


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):  # an unreadable font file draws nothing
        return frozenset()
