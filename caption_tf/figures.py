"""Figures that training and evaluation both draw: matplotlib, Agg backend.

The attention grid of one caption (the image, then the image under each
generated word's attention map) is drawn here once: the evaluation report
saves it as a PNG file, training logs the same figure to TensorBoard's image
dashboard each epoch. It sits above the models (it reads a grid's shape through
`models.grid.grid_side`) and below training and evaluation, so training can use it
without importing evaluation.

Example:

>>> png = attention_grid_png(np.zeros((32, 32, 3), np.uint8), ["red"], np.full((1, 4), 0.25))
>>> png[:4]
b'\\x89PNG'
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from caption_tf.models.grid import grid_side  # noqa: E402 - the grid owns its shape

DPI = 90
ATTENTION_COLUMNS = 5
ATTENTION_ALPHA = 0.55
PANEL_WIDTH_IN, PANEL_HEIGHT_IN = 2.2, 2.3  # one attention panel, in inches


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


def attention_grid_size(words: int) -> tuple[int, int]:
    """(height, width) in pixels of the attention grid of a caption of `words` words.

    Example:

    >>> attention_grid_size(7)
    (414, 990)
    """
    rows, columns = attention_layout(words)
    return round(PANEL_HEIGHT_IN * rows * DPI), round(PANEL_WIDTH_IN * columns * DPI)


def attention_figure(image: np.ndarray, words: Sequence[str], attention: np.ndarray, title: str = ""):
    """The image, then one subplot per generated word with that step's attention overlaid (a matplotlib Figure)."""
    rows, columns = attention_layout(len(words))
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_WIDTH_IN * columns, PANEL_HEIGHT_IN * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("image", fontsize=9)
    height, width = image.shape[:2]
    for t, word in enumerate(words):
        ax = axes.flat[t + 1]
        ax.imshow(image)
        ax.imshow(upsample(attention[t], (height, width)), cmap="jet", alpha=ATTENTION_ALPHA)
        ax.set_title(word, fontsize=10)
    if title:
        fig.suptitle(wrap_title(title, 22 * columns), fontsize=10)
    return fig


def save_figure(fig, path: str | Path) -> str:
    """Lay out, write as PNG at `DPI`, close (so hundreds of figures do not leak memory)."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return str(path)


def figure_png(fig) -> bytes:
    """The PNG bytes `save_figure` would write."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, dpi=DPI, format="png")
    plt.close(fig)
    return buffer.getvalue()


def attention_grid(image: np.ndarray, words: Sequence[str], attention: np.ndarray, path: str | Path, title: str = "") -> str:
    """`attention_figure` saved as a PNG file (the evaluation report's attention maps).

    Example:

    >>> attention_grid(np.zeros((32, 32, 3), np.uint8), ["red"], np.full((1, 4), 0.25), "a.png")
    'a.png'
    """
    return save_figure(attention_figure(image, words, attention, title), path)


def attention_grid_png(image: np.ndarray, words: Sequence[str], attention: np.ndarray, title: str = "") -> bytes:
    """`attention_figure` as PNG bytes (TensorBoard's attention images)."""
    return figure_png(attention_figure(image, words, attention, title))
