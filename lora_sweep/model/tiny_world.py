"""The tiny model's world: procedurally drawn 64 px scenes with captions that describe them (numpy + scikit-image).

A scene is a background (plain, a gradient or stripes in one or two named colours), one or two shapes (circle,
square, triangle, ring; a colour, a size, a place) and a lighting (bright, dark, lit from a side), softened a little
so edges are not aliased. `scenes(n, seed)` gives the same images and captions for a seed on every machine; captions
stay short because the tiny tokenizer spends about one token per character (77 tokens in all).
"""

from __future__ import annotations

import numpy as np

SIZE = 64
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.1), "green": (0.15, 0.7, 0.2), "blue": (0.12, 0.25, 0.85), "yellow": (0.95, 0.85, 0.15),
    "purple": (0.55, 0.2, 0.7), "orange": (0.95, 0.55, 0.1), "white": (0.95, 0.95, 0.95), "black": (0.06, 0.06, 0.06),
    "grey": (0.5, 0.5, 0.5), "cyan": (0.15, 0.8, 0.85), "pink": (0.95, 0.5, 0.7), "brown": (0.45, 0.28, 0.12),
}
SHAPES = ("circle", "square", "triangle", "ring")
BACKGROUNDS = ("plain", "gradient", "stripes")
PLACES = {"left": (32, 18), "right": (32, 46), "top": (18, 32), "bottom": (46, 32), "center": (32, 32)}
SIZES = {"small": 8, "big": 15}  # radius in pixels
LIGHTS = ("", "bright", "dark", "lit left", "lit right")


def scenes(n: int, seed: int | list[int]) -> tuple[np.ndarray, list[str]]:
    """`n` scenes drawn from `seed` (an int or numpy SeedSequence entropy such as [seed, split, chunk]):
    (n, 64, 64, 3) float32 in [0, 1] and their captions."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        image, caption = scene(rng)
        images.append(image)
        captions.append(caption)
    return np.stack(images), captions


def scene(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One scene and its caption, e.g. "on green white stripes, big red circle left, small blue ring top, dark"."""
    from skimage.filters import gaussian

    names = list(COLOURS)
    background, back_words = _background(rng, names)
    image = background
    shape_words = []
    places = rng.choice(list(PLACES), size=2, replace=False)
    for place in places[: rng.integers(1, 3)]:
        shape, colour, size = rng.choice(SHAPES), rng.choice(names), rng.choice(list(SIZES))
        mask = _shape_mask(shape, PLACES[place], SIZES[size], rng)
        image = image * (1 - mask[..., None]) + mask[..., None] * np.array(COLOURS[colour])
        shape_words.append(f"{size} {colour} {shape} {place}")
    light = LIGHTS[rng.integers(len(LIGHTS))]
    image = _light(image, light)
    image = gaussian(image, sigma=0.6, channel_axis=-1, preserve_range=True)
    caption = ", ".join([f"on {back_words}", *shape_words, *([light] if light else [])])  # the largest area first
    return np.clip(image, 0, 1).astype(np.float32), caption


def _background(rng: np.random.Generator, names: list[str]) -> tuple[np.ndarray, str]:
    """A plain, gradient or striped background and its words ("grey", "red to blue gradient", "green stripes")."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    first, second = rng.choice(names, size=2, replace=False)
    a, b = np.array(COLOURS[first]), np.array(COLOURS[second])
    if kind == "plain":
        return np.broadcast_to(a, (SIZE, SIZE, 3)).copy(), str(first)
    ramp = np.linspace(0, 1, SIZE)
    if kind == "gradient":
        weight = ramp[None, :] if rng.integers(2) else ramp[:, None]
        weight = np.broadcast_to(weight, (SIZE, SIZE))[..., None]
        return (1 - weight) * a + weight * b, f"{first} to {second} gradient"
    period = int(rng.integers(10, 17))
    stripes = ((np.arange(SIZE) // (period // 2)) % 2).astype(float)
    weight = np.broadcast_to(stripes[None, :] if rng.integers(2) else stripes[:, None], (SIZE, SIZE))[..., None]
    return (1 - weight) * a + weight * b, f"{first} {second} stripes"


def _shape_mask(shape: str, centre: tuple[int, int], radius: int, rng: np.random.Generator) -> np.ndarray:
    """(64, 64) float mask of one shape around `centre`, jittered by a few pixels."""
    from skimage.draw import disk, polygon

    row, col = (np.array(centre) + rng.integers(-3, 4, size=2)).tolist()
    mask = np.zeros((SIZE, SIZE), dtype=float)
    if shape in ("circle", "ring"):
        mask[disk((row, col), radius, shape=mask.shape)] = 1
        if shape == "ring":
            mask[disk((row, col), radius * 0.55, shape=mask.shape)] = 0
    elif shape == "square":
        side = radius * 0.85
        mask[polygon([row - side, row - side, row + side, row + side],
                     [col - side, col + side, col + side, col - side], shape=mask.shape)] = 1
    else:
        mask[polygon([row - radius, row + radius * 0.8, row + radius * 0.8],
                     [col, col - radius, col + radius], shape=mask.shape)] = 1
    return mask


def _light(image: np.ndarray, light: str) -> np.ndarray:
    """Brighten, darken or shade the scene from one side."""
    if light == "bright":
        return 1 - (1 - image) * 0.55
    if light == "dark":
        return image * 0.4
    if light:
        ramp = np.linspace(1.0, 0.35, SIZE) if light == "lit left" else np.linspace(0.35, 1.0, SIZE)
        return image * ramp[None, :, None]
    return image
