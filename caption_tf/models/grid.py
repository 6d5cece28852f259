"""The image side of every decoder: project the cached feature grid, and say where each cell is.

A backbone grid [B, h*w, C] (row-major, cell 0 at the top left) becomes [B, h*w, width]:
a `Dense(width, relu)` projection per cell, an optional small trainable adapter that
mixes neighbouring cells (`adapter="conv"`: a residual 3x3 convolution; the backbone
itself stays frozen), and a 2-D position embedding added to every cell. Without
positions, attention is a bag of cells: the decoder can tell what is there but not where,
so it cannot say "to the left of".

Example:

>>> encoder = GridEncoder(32, positions="learned")
>>> tuple(encoder(keras.random.normal((2, 25, 64))).shape)
(2, 25, 32)
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

POSITIONS = ("learned", "sinusoidal", "none")
ADAPTERS = ("none", "conv")


def grid_side(cells: int) -> tuple[int, int]:
    """(h, w) of a square grid of `cells` cells; backbones here all give square grids.

    Example:

    >>> grid_side(64)
    (8, 8)
    """
    side = math.isqrt(int(cells))
    if side * side != cells:
        raise ValueError(f"expected a square feature grid (h*w with h == w), got {cells} cells")
    return side, side


def sinusoidal_grid_positions(h: int, w: int, width: int) -> np.ndarray:
    """[h*w, width] fixed codes: half the channels encode the row, half the column (sin/cos pairs).

    Example:

    >>> sinusoidal_grid_positions(2, 2, 8).shape
    (4, 8)
    """
    if width % 4:
        raise ValueError(f"sinusoidal grid positions need a width divisible by 4, got {width}")
    quarter = width // 4
    freqs = 1.0 / (10000.0 ** (np.arange(quarter) / quarter))

    def code(positions):
        angles = positions[:, None] * freqs[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], -1)  # [n, width / 2]

    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.concatenate([code(rows.reshape(-1)), code(cols.reshape(-1))], -1).astype("float32")


@keras.saving.register_keras_serializable("caption_tf")
class GridPositionEmbedding(keras.layers.Layer):
    """Adds a 2-D position code to each cell of a square grid [B, h*w, D].

    `kind="learned"`: a learned row vector plus a learned column vector per cell (as in
    DETR); `"sinusoidal"`: fixed sin/cos codes of row and column (Vaswani et al. in 2-D).
    """

    def __init__(self, kind: str = "learned", **kwargs):
        super().__init__(**kwargs)
        if kind not in ("learned", "sinusoidal"):
            raise ValueError(f"grid position embedding must be 'learned' or 'sinusoidal', got {kind!r}")
        self.kind = kind

    def build(self, input_shape):
        h, w = grid_side(input_shape[1])
        width = input_shape[-1]
        if self.kind == "learned":
            init = keras.initializers.RandomNormal(stddev=0.1)
            self.rows = self.add_weight(shape=(h, 1, width), initializer=init, name="rows")
            self.cols = self.add_weight(shape=(1, w, width), initializer=init, name="cols")
        else:
            self.table = ops.convert_to_tensor(sinusoidal_grid_positions(h, w, width))

    def positions(self):
        """The [h*w, D] codes added to the cells."""
        if self.kind == "learned":
            return ops.reshape(self.rows + self.cols, (-1, self.rows.shape[-1]))
        return self.table

    def call(self, cells):
        return cells + ops.cast(self.positions(), cells.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "kind": self.kind}


@keras.saving.register_keras_serializable("caption_tf")
class GridEncoder(keras.layers.Layer):
    """grid [B, h*w, C] -> cells [B, h*w, width]: projection, optional adapter, 2-D positions.

    Args:
        width: channels of the projected cells.
        positions: "learned", "sinusoidal" or "none".
        adapter: "none" or "conv" (a residual 3x3 convolution over the projected grid).
    """

    def __init__(self, width: int, positions: str = "learned", adapter: str = "none", **kwargs):
        super().__init__(**kwargs)
        if positions not in POSITIONS:
            raise ValueError(f"grid positions must be one of {POSITIONS}, got {positions!r}")
        if adapter not in ADAPTERS:
            raise ValueError(f"grid adapter must be one of {ADAPTERS}, got {adapter!r}")
        self.width, self.positions_kind, self.adapter_kind = width, positions, adapter
        self.project = keras.layers.Dense(width, activation="relu", name="project")
        self.adapter = (
            keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="adapter") if adapter == "conv" else None
        )
        self.positions = GridPositionEmbedding(positions, name="positions") if positions != "none" else None

    def build(self, input_shape):
        self.project.build(input_shape)
        cells_shape = (*input_shape[:-1], self.width)
        if self.adapter is not None:
            h, w = grid_side(input_shape[1])
            self.adapter.build((None, h, w, self.width))
        if self.positions is not None:
            self.positions.build(cells_shape)

    def call(self, grid):
        cells = self.project(ops.cast(grid, self.compute_dtype))
        if self.adapter is not None:
            h, w = grid_side(cells.shape[1])
            image = ops.reshape(cells, (-1, h, w, self.width))
            cells = cells + ops.reshape(self.adapter(image), (-1, h * w, self.width))
        if self.positions is not None:
            cells = self.positions(cells)
        return cells

    def get_config(self):
        return {**super().get_config(), "width": self.width, "positions": self.positions_kind, "adapter": self.adapter_kind}
