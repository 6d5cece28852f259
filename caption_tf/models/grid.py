"""The image side of every decoder: project the cached feature grid, and say where each cell is.

A backbone grid [B, h*w, C] (row-major, cell 0 at the top left) becomes [B, h*w, width]:
a `Dense(width, relu)` projection per cell, an optional small trainable adapter that
mixes neighbouring cells (`adapter="conv"`: a residual 3x3 convolution; the backbone
itself stays frozen), a 2-D position embedding added to every cell, and optionally
Transformer encoder layers over the positioned cells (`encoder_layers`, as in the keras-io
captioning example), through which each cell sees every other. Without positions,
attention is a bag of cells: the decoder can tell what is there but not where, so it
cannot say "to the left of".

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


def append_tokens(cells, tokens):
    """cells [B, N, D] followed by the same learned `tokens` [R, D] for every image: [B, N + R, D]."""
    tokens = ops.cast(tokens, cells.dtype)[None]
    return ops.concatenate([cells, ops.repeat(tokens, ops.shape(cells)[0], axis=0)], axis=1)


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
class GridEncoderLayer(keras.layers.Layer):
    """A Transformer encoder layer over the cells [B, h*w, D]: self-attention, then feed-forward.

    Pre-norm residual blocks; the feed-forward is `2 * D` wide. After it a cell carries what
    is where in the whole image, not only in its 3x3 neighbourhood: "to the left of" relates
    two objects that can be many cells apart.

    Args:
        num_heads: attention heads; `D` must be divisible by it.
    """

    def __init__(self, num_heads: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="attention_norm")
        self.feed_forward_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="feed_forward_norm")

    def build(self, input_shape):
        width = input_shape[-1]
        if width % self.num_heads:
            raise ValueError(f"grid encoder layers need a cell width divisible by num_heads, got width {width} and {self.num_heads} heads")
        self.attention = keras.layers.MultiHeadAttention(self.num_heads, width // self.num_heads, name="self_attention")
        self.hidden = keras.layers.Dense(2 * width, activation="relu", name="hidden")
        self.out = keras.layers.Dense(width, name="out")
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.feed_forward_norm.build(input_shape)
        self.hidden.build(input_shape)
        self.out.build((*input_shape[:-1], 2 * width))

    def call(self, cells):
        x = self.attention_norm(cells)
        cells = cells + self.attention(x, x)
        return cells + self.out(self.hidden(self.feed_forward_norm(cells)))

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


@keras.saving.register_keras_serializable("caption_tf")
class GridEncoder(keras.layers.Layer):
    """grid [B, h*w, C] -> cells [B, h*w, width]: projection, optional adapter, 2-D positions,
    optional encoder layers.

    Args:
        width: channels of the projected cells.
        positions: "learned", "sinusoidal" or "none".
        adapter: "none" or "conv" (a residual 3x3 convolution over the projected grid).
        encoder_layers: `GridEncoderLayer`s over the positioned cells (0: none).
        num_heads: their attention heads.
        registers: learned tokens appended after the cells, before the encoder layers, and returned
            after them (Darcet et al. 2024, "Vision Transformers Need Registers"): the layers can
            gather what is in the whole image there instead of in background cells. Output
            [B, h*w + registers, width].
    """

    def __init__(self, width: int, positions: str = "learned", adapter: str = "none", encoder_layers: int = 0, num_heads: int = 4,
                 registers: int = 0, **kwargs):
        super().__init__(**kwargs)
        if positions not in POSITIONS:
            raise ValueError(f"grid positions must be one of {POSITIONS}, got {positions!r}")
        if adapter not in ADAPTERS:
            raise ValueError(f"grid adapter must be one of {ADAPTERS}, got {adapter!r}")
        if encoder_layers < 0:
            raise ValueError(f"encoder_layers must be >= 0, got {encoder_layers}")
        if registers < 0:
            raise ValueError(f"registers must be >= 0 (0: none), got {registers}")
        self.width, self.positions_kind, self.adapter_kind = width, positions, adapter
        self.encoder_layers, self.num_heads, self.registers = encoder_layers, num_heads, registers
        self.project = keras.layers.Dense(width, activation="relu", name="project")
        self.adapter = (
            keras.layers.Conv2D(width, 3, padding="same", activation="relu", name="adapter") if adapter == "conv" else None
        )
        self.positions = GridPositionEmbedding(positions, name="positions") if positions != "none" else None
        # One attribute per layer, not a list: `tf.train.Checkpoint` does not track layers in a list attribute.
        for i in range(encoder_layers):
            setattr(self, f"encoder_{i}", GridEncoderLayer(num_heads, name=f"encoder_{i}"))

    def build(self, input_shape):
        self.project.build(input_shape)
        cells_shape = (*input_shape[:-1], self.width)
        if self.adapter is not None:
            h, w = grid_side(input_shape[1])
            self.adapter.build((None, h, w, self.width))
        if self.positions is not None:
            self.positions.build(cells_shape)
        for i in range(self.encoder_layers):
            getattr(self, f"encoder_{i}").build(cells_shape)
        if self.registers:
            self.register_tokens = self.add_weight(
                shape=(self.registers, self.width), initializer=keras.initializers.RandomNormal(stddev=0.02), name="registers"
            )

    def call(self, grid):
        cells = self.project(ops.cast(grid, self.compute_dtype))
        if self.adapter is not None:
            h, w = grid_side(cells.shape[1])
            image = ops.reshape(cells, (-1, h, w, self.width))
            cells = cells + ops.reshape(self.adapter(image), (-1, h * w, self.width))
        if self.positions is not None:
            cells = self.positions(cells)
        if self.registers:
            cells = append_tokens(cells, self.register_tokens)
        for i in range(self.encoder_layers):
            cells = getattr(self, f"encoder_{i}")(cells)
        return cells

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "positions": self.positions_kind,
            "adapter": self.adapter_kind,
            "encoder_layers": self.encoder_layers,
            "num_heads": self.num_heads,
            "registers": self.registers,
        }
