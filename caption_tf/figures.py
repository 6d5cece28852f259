"""Figures that training and evaluation both draw.

The attention grid of one caption (the image, then the image under each
generated word's attention map) is drawn here once: the evaluation report
saves it as a PNG file, training logs the same picture to TensorBoard's image
dashboard each epoch. It is composed with numpy and Pillow, not matplotlib: a
15-panel matplotlib figure took 0.8-1.6 s to lay out and save, and training draws
three every epoch (25-50 s of the 10-epoch minimal run). `save_figure`
writes the report's other (matplotlib) figures. This module sits above the
models (it reads a grid's shape through `models.grid.grid_side`) and below
training and evaluation, so training can use it without importing evaluation.

Example:

>>> png = attention_grid_png(np.zeros((32, 32, 3), np.uint8), ["red"], np.full((1, 4), 0.25))
>>> png[:4]
b'\\x89PNG'
"""

from __future__ import annotations

import io
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from caption_tf.models.grid import grid_side  # noqa: E402 - the grid owns its shape

DPI = 90  # the report's matplotlib figures
ATTENTION_COLUMNS = 5
ATTENTION_ALPHA = 0.55  # the attention map's share of an overlaid pixel
PANEL = 180  # px: one attention panel's picture (the image fitted into a PANEL x PANEL square)
LABEL_HEIGHT, TITLE_LINE_HEIGHT, GAP = 22, 18, 6  # px: the word above a panel, a title line, space between panels
LABEL_FONT_SIZE, TITLE_FONT_SIZE = 15, 13
TITLE_CHARS_PER_COLUMN = 24
PNG_COMPRESS_LEVEL = 1  # zlib level: 6 (the default) took 4x as long for 15% fewer bytes (0.22 vs 0.05 s, 936 x 624 px)


def wrap_title(title: str, width: int) -> str:
    """A title on as many lines as it needs (never cut): run names are long and say what was run.

    Example:

    >>> wrap_title("minimal-shapes-inception_v3-lstm-bahdanau: greedy", 30)
    'minimal-shapes-inception_v3-ls\\ntm-bahdanau: greedy'
    """
    return "\n".join(textwrap.wrap(title, width, break_on_hyphens=False)) if title else ""


def upsample(weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One step's attention [cells] as a smooth [height, width] map (bilinear), for overlays.

    Example:

    >>> upsample(np.full(4, 0.25), (8, 8)).shape
    (8, 8)
    """
    from PIL import Image

    h, w = grid_side(np.asarray(weights).size)
    grid = np.asarray(weights, dtype=np.float32).reshape(h, w)
    height, width = size
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR))


def attention_layout(words: int) -> tuple[int, int]:
    """(rows, columns) of the attention grid of a caption of `words` words: the image, then one panel per word.

    Example:

    >>> attention_layout(7)
    (2, 5)
    """
    panels = words + 1
    columns = min(ATTENTION_COLUMNS, panels)
    return int(np.ceil(panels / columns)), columns


def attention_grid_size(words: int, title: str = "") -> tuple[int, int]:
    """(height, width) in pixels of the attention grid of a caption of `words` words (and `title`).

    Example:

    >>> attention_grid_size(7)
    (416, 936)
    """
    rows, columns = attention_layout(words)
    return _title_height(title, columns) + rows * (LABEL_HEIGHT + PANEL + GAP), columns * (PANEL + GAP) + GAP


def _title_height(title: str, columns: int) -> int:
    lines = wrap_title(title, TITLE_CHARS_PER_COLUMN * columns).count("\n") + 1 if title else 0
    return lines * TITLE_LINE_HEIGHT + (GAP if lines else 0)


@lru_cache(maxsize=4)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: no font files needed


def _fit(image: np.ndarray) -> np.ndarray:
    """`image` as uint8 RGB scaled to fit a PANEL x PANEL square, aspect kept."""
    from PIL import Image

    picture = np.asarray(image)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=-1)
    picture = picture[..., :3]
    if picture.dtype != np.uint8:  # floats in [0, 1], as matplotlib's imshow takes them
        picture = (np.clip(picture, 0.0, 1.0) * 255).round().astype(np.uint8)
    height, width = picture.shape[:2]
    scale = PANEL / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))


def overlay(picture: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`picture` (uint8 [H, W, 3]) under one step's attention [cells]: the map upsampled, scaled to its own
    min..max, coloured with matplotlib's 'jet' and blended at `ATTENTION_ALPHA` (as imshow would draw it).

    Example:

    >>> overlay(np.zeros((8, 8, 3), np.uint8), np.array([1.0, 0.0, 0.0, 0.0])).shape
    (8, 8, 3)
    """
    heat = upsample(weights, picture.shape[:2])
    low, high = float(heat.min()), float(heat.max())
    heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    colours = matplotlib.colormaps["jet"](heat)[..., :3] * 255.0
    blended = (1.0 - ATTENTION_ALPHA) * picture.astype(np.float32) + ATTENTION_ALPHA * colours
    return blended.round().clip(0, 255).astype(np.uint8)


def attention_grid_image(image: np.ndarray, words: Sequence[str], attention: np.ndarray, title: str = "") -> np.ndarray:
    """The attention grid as uint8 [H, W, 3]: `title` on top, then the image and, per generated word,
    the image under that step's attention map (`attention` [words, cells]), the word above each panel.

    Example:

    >>> attention_grid_image(np.zeros((32, 48, 3), np.uint8), ["red", "circle"], np.full((2, 4), 0.25)).shape
    (208, 564, 3)
    """
    from PIL import Image, ImageDraw

    rows, columns = attention_layout(len(words))
    height, width = attention_grid_size(len(words), title)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top = _title_height(title, columns)
    if title:
        draw.multiline_text((width // 2, GAP), wrap_title(title, TITLE_CHARS_PER_COLUMN * columns), fill="black",
                            font=_font(TITLE_FONT_SIZE), anchor="ma", align="center")
    picture = _fit(image)
    panels = [("image", picture)] + [(word, overlay(picture, attention[t])) for t, word in enumerate(words)]
    for k, (label, panel) in enumerate(panels):
        row, column = divmod(k, columns)
        left, upper = GAP + column * (PANEL + GAP), top + row * (LABEL_HEIGHT + PANEL + GAP)
        draw.text((left + PANEL // 2, upper + LABEL_HEIGHT - 3), label, fill="black", font=_font(LABEL_FONT_SIZE), anchor="md")
        offset = ((PANEL - panel.shape[1]) // 2, (PANEL - panel.shape[0]) // 2)  # centred in its square
        canvas.paste(Image.fromarray(panel), (left + offset[0], upper + LABEL_HEIGHT + offset[1]))
    return np.asarray(canvas)


def save_figure(fig, path: str | Path) -> str:
    """Lay out, write as PNG at `DPI`, close (so hundreds of figures do not leak memory)."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return str(path)


def attention_grid(image: np.ndarray, words: Sequence[str], attention: np.ndarray, path: str | Path, title: str = "") -> str:
    """`attention_grid_image` saved as a PNG file (the evaluation report's attention maps).

    Example:

    >>> attention_grid(np.zeros((32, 32, 3), np.uint8), ["red"], np.full((1, 4), 0.25), "a.png")
    'a.png'
    """
    Path(path).write_bytes(attention_grid_png(image, words, attention, title))
    return str(path)


def attention_grid_png(image: np.ndarray, words: Sequence[str], attention: np.ndarray, title: str = "") -> bytes:
    """`attention_grid_image` as PNG bytes (TensorBoard's attention images)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(attention_grid_image(image, words, attention, title)).save(buffer, format="png", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
