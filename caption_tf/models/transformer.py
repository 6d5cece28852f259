"""The Transformer decoder: masked self-attention over the words, cross-attention over the grid.

As in "Attention Is All You Need" (Vaswani et al., 2017) with pre-layer normalisation
(Xiong et al., 2020), the decoder of the TensorFlow and keras-io Transformer captioning
examples. The grid goes through `GridEncoder` (projection + 2-D positions) and a layer
normalisation; words get a learned position embedding. Each layer:

    x = x + dropout(self_attention(norm(x)))          causal: word t sees words <= t
    x = x + dropout(cross_attention(norm(x), grid))   the attention maps come from here
    x = x + dropout(feed_forward(norm(x)))

Teacher forcing runs every position at once (the weights of `keras.layers.MultiHeadAttention`,
computed by `attend` with a causal mask, the same function decoding uses). Decoding runs one
position per `step` with a key/value cache: the decoder state is each caption's position and
each layer's self-attention keys and values, in buffers of `max_length` positions
([B, max_length, heads, head_dim]) that a step fills one row at a time and attends up to its
position. Fixed shapes let the decoding loops be `tf.while_loop`s (one trace of the step, XLA
included). `encode` computes the cross-attention keys and values of the grid once. Causal
masking makes teacher forcing and decoding identical.

Sizes: `embedding_dim` is the model width (embeddings, attention, residual stream),
`units` the feed-forward width (the keras-io example's EMBED_DIM and FF_DIM).
The attention map of a step (`return_attention`, the decoding functions) is the last
layer's cross-attention averaged over the heads (with registers: its heads' attention on
the cells, summed and normalised; `cell_attention`); with `readout_attention`, the one head of
the attention the output layer reads.

Example:

>>> model = TransformerCaptionDecoder(vocab_size=100, max_length=10, embedding_dim=32, units=64)
>>> grid = keras.random.normal((2, 49, 64)); tokens = keras.ops.ones((2, 9), "int32")
>>> tuple(model((grid, tokens)).shape)
(2, 9, 100)
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from caption_tf.models.base import CHECKPOINT_BLOCK_STEPS, CaptionModel, TiedOutput, checkpointed_head_loss, flat_captions
from caption_tf.models.grid import GridEncoder, append_tokens
from caption_tf.models.losses import doubly_stochastic_penalty
from caption_tf.models.recompute import recompute_grad


def project(dense: keras.layers.EinsumDense, x):
    """`dense(x)` for one of `MultiHeadAttention`'s `EinsumDense` projections, as one 2-D matmul.

    Keras runs the projection of [B, T, D] as a matmul broadcast over the batch, whose kernel
    gradient is one product per caption, summed afterwards; flattening batch and time into the
    rows of one `tf.matmul` contracts them in one product (forward and kernel gradient), 2.3x
    faster than Keras's and 1.6x faster than `tf.einsum` on a CPU (`[32, 14, 64] x [64, 4, 16]`,
    three projections forward + backward: 0.25 vs 0.42 ms). Same weights, same result.
    """
    inputs, kernel_axes = dense.equation.split("->")[0].split(",")
    contracted = sum(axis in kernel_axes for axis in inputs)  # x's trailing axes the kernel's leading ones reduce
    kernel = ops.cast(dense.kernel, x.dtype)
    width = math.prod(kernel.shape[:contracted])  # static, where x's may not be (a step traced with open shapes)
    out = tf.matmul(tf.reshape(x, [-1, width]), tf.reshape(kernel, [width, -1]))
    out = tf.reshape(out, tf.concat([tf.shape(x)[:-contracted], kernel.shape[contracted:]], 0))
    return out if dense.bias is None else out + ops.cast(dense.bias, out.dtype)


def attend(attention: keras.layers.MultiHeadAttention, query, keys, values, causal: bool = False, key_mask=None):
    """`attention`'s output and weights for `query` [B, Tq, D] over projected `keys`/`values` [B, Tk, H, d].

    The computation of `MultiHeadAttention.call` (without its dropout, which is 0 here), from
    keys and values already projected by its `key_dense`/`value_dense` (`project`): teacher
    forcing projects all positions, decoding fills a cache one position per step. `causal`:
    query position q sees keys 0..q only (self-attention over a whole caption, Tq == Tk).
    `key_mask` [B, Tk] bool: the keys each caption may see (the filled part of a cache).
    Returns (output [B, Tq, D], weights [B, H, Tq, Tk]).
    """
    q = project(attention.query_dense, query) * ops.cast(1.0 / ops.sqrt(float(attention.key_dim)), query.dtype)
    scores = ops.cast(ops.einsum("bkhd,bqhd->bhqk", keys, q), "float32")
    # -1e9 as in MultiHeadAttention's masked softmax: masked keys get a weight of exactly 0.
    if causal:
        steps = ops.shape(query)[1]
        seen = tf.linalg.band_part(tf.ones((steps, steps)), -1, 0) > 0  # lower triangle: k <= q
        scores = tf.where(seen, scores, -1e9)
    if key_mask is not None:
        scores = tf.where(key_mask[:, None, None, :], scores, -1e9)
    # tf.nn.softmax: keras.ops.softmax warns about the size-1 axis of the first decoding step.
    weights = tf.nn.softmax(scores, axis=-1)
    mixed = ops.einsum("bhqk,bkhd->bqhd", ops.cast(weights, values.dtype), values)
    return project(attention.output_dense, mixed), weights


@keras.saving.register_keras_serializable("caption_tf")
class TransformerDecoderLayer(keras.layers.Layer):
    """One pre-norm decoder layer; dropout masks are passed in, so a recomputed replay reuses them.

    Args:
        width: model width.
        ff_units: feed-forward hidden width.
        num_heads: attention heads (`width` must be divisible by it).
    """

    def __init__(self, width: int, ff_units: int, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        if width % num_heads:
            raise ValueError(f"transformer width (embedding_dim) {width} must be divisible by num_heads {num_heads}")
        self.width, self.ff_units, self.num_heads = width, ff_units, num_heads
        head_dim = width // num_heads
        self.self_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="self_norm")
        self.self_attention = keras.layers.MultiHeadAttention(num_heads, head_dim, name="self_attention")
        self.cross_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="cross_norm")
        self.cross_attention = keras.layers.MultiHeadAttention(num_heads, head_dim, name="cross_attention")
        self.ff_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="ff_norm")
        self.ff_hidden = keras.layers.Dense(ff_units, activation="gelu", name="ff_hidden")
        self.ff_out = keras.layers.Dense(width, name="ff_out")

    def build(self, x_shape, memory_shape=None):
        memory_shape = memory_shape or x_shape
        for norm in (self.self_norm, self.cross_norm, self.ff_norm):
            norm.build(x_shape)
        self.self_attention.build(x_shape, x_shape)
        self.cross_attention.build(x_shape, memory_shape)
        self.ff_hidden.build(x_shape)
        self.ff_out.build((*x_shape[:-1], self.ff_units))

    def feed_forward(self, x):
        return self.ff_out(self.ff_hidden(self.ff_norm(x)))

    def call(self, x, memory, masks=None, refs: int = 1):
        """All positions at once: (x [B, T, D], cross-attention weights [B, heads, T, cells]).

        `masks`: three dropout masks (scaled, [B, T, D]) for the three residual branches, or None.
        `refs`: captions per image when `memory` holds one grid per image ([B / refs, cells, D],
        the captions of an image consecutive in `x`): its keys and values are projected once
        per image (`base.group_captions`).
        """
        masks = masks or (1.0, 1.0, 1.0)
        normed = self.self_norm(x)
        keys, values = project(self.self_attention.key_dense, normed), project(self.self_attention.value_dense, normed)
        x = x + masks[0] * attend(self.self_attention, normed, keys, values, causal=True)[0]
        memory_keys, memory_values = self.memory_keys(memory)
        if refs > 1:
            memory_keys, memory_values = ops.repeat(memory_keys, refs, axis=0), ops.repeat(memory_values, refs, axis=0)
        context, weights = attend(self.cross_attention, self.cross_norm(x), memory_keys, memory_values)
        x = x + masks[1] * context
        return x + masks[2] * self.feed_forward(x), weights

    def memory_keys(self, memory):
        """Cross-attention keys and values of the grid [B, cells, H, d], computed once per image."""
        return project(self.cross_attention.key_dense, memory), project(self.cross_attention.value_dense, memory)

    def step(self, x, row, filled, cache_keys, cache_values, memory_keys, memory_values):
        """One position x [B, 1, D] given the caches [B, S, H, d]: (x, caches, weights [B, H, 1, cells]).

        `row` [B, S, 1, 1]: one-hot of each caption's position, where the new keys and values go
        (the caches hold zeros from there on, so adding them is exact); `filled` [B, S] bool: the
        positions up to it, the keys the step may see.
        """
        normed = self.self_norm(x)
        cache_keys = cache_keys + row * project(self.self_attention.key_dense, normed)
        cache_values = cache_values + row * project(self.self_attention.value_dense, normed)
        x = x + attend(self.self_attention, normed, cache_keys, cache_values, key_mask=filled)[0]
        context, weights = attend(self.cross_attention, self.cross_norm(x), memory_keys, memory_values)
        x = x + context
        return x + self.feed_forward(x), cache_keys, cache_values, weights

    def get_config(self):
        return {**super().get_config(), "width": self.width, "ff_units": self.ff_units, "num_heads": self.num_heads}


@keras.saving.register_keras_serializable("caption_tf")
class TransformerCaptionDecoder(CaptionModel):
    """Transformer decoder over the feature grid, with the same contract as `CaptionDecoder`.

    Args:
        vocab_size: words in the vocabulary.
        max_length: longest caption in tokens (with <start>/<end>): the positions learned.
        embedding_dim: model width.
        units: feed-forward width.
        num_layers, num_heads: decoder layers and attention heads.
        grid_positions, grid_adapter, encoder_layers: see `grid.GridEncoder` (its encoder layers use `num_heads`).
        registers: learned memory slots after the cells (Darcet et al. 2024, "Vision Transformers Need
            Registers"): a head with nothing to read at a word can look there instead of at
            background cells. The attention maps count the cells only: the heads' attention on
            them summed and normalised, so such a head weighs little.
        encoder_registers: the registers go through the grid encoder layers with the cells
            (`grid.GridEncoder`), so they carry what the image holds as a whole, as in Darcet et al.;
            otherwise they are constants after the encoded cells.
        readout_attention: one more, single-head, attention over the memory after the last layer,
            whose context is added to the features the output layer reads (as an LSTM/GRU decoder's
            output layer reads its one context); the attention maps come from it.
        tie_embeddings: predict words through the input embeddings (`base.TiedOutput`).
        dropout: on each residual branch and on the features the output layer reads.
        attention_penalty, label_smoothing, recompute_grad: see `base.CaptionModel`.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        embedding_dim: int = 64,
        units: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
        recompute_grad: bool = False,
        grid_positions: str = "learned",
        grid_adapter: str = "none",
        encoder_layers: int = 0,
        tie_embeddings: bool = False,
        attention_penalty: float = 0.0,
        label_smoothing: float = 0.0,
        registers: int = 0,
        encoder_registers: bool = False,
        readout_attention: bool = False,
        **kwargs,
    ):
        super().__init__(vocab_size, dropout, attention_penalty, label_smoothing, recompute_grad, **kwargs)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if registers < 0:
            raise ValueError(f"registers must be >= 0 (0: none), got {registers}")
        self.registers, self.encoder_registers = registers, encoder_registers
        self.max_length, self.embedding_dim, self.units = max_length, embedding_dim, units
        self.num_layers, self.num_heads = num_layers, num_heads
        self.grid_positions, self.grid_adapter, self.tie_embeddings = grid_positions, grid_adapter, tie_embeddings
        self.decoder, self.attention_kind = "transformer", "cross"
        self.encoder_layers = encoder_layers
        self.grid_encoder = GridEncoder(embedding_dim, grid_positions, grid_adapter, encoder_layers, num_heads,
                                        registers if encoder_registers else 0, name="grid_encoder")
        self.memory_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="memory_norm")
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")
        self.token_positions = keras.layers.Embedding(max_length, embedding_dim, name="token_positions")
        # One attribute per layer, not a list: `tf.train.Checkpoint` (crash recovery) does not
        # track the variables of layers held in a Python list attribute of a Keras model.
        for i in range(num_layers):
            setattr(self, f"layer_{i}", TransformerDecoderLayer(embedding_dim, units, num_heads, name=f"layer_{i}"))
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")
        self.readout_attention = (
            keras.layers.MultiHeadAttention(1, embedding_dim, name="readout_attention") if readout_attention else None
        )
        if tie_embeddings:
            self.to_logits, self.tied_output = None, TiedOutput(embedding_dim, vocab_size, name="tied_output")
        else:
            self.to_logits, self.tied_output = keras.layers.Dense(vocab_size, dtype="float32", name="logits"), None

    def build(self, input_shape):
        grid_shape, tokens_shape = input_shape
        self.grid_encoder.build(grid_shape)
        memory_shape = (*grid_shape[:-1], self.embedding_dim)
        self.memory_norm.build(memory_shape)
        self.embedding.build(tokens_shape)
        self.token_positions.build((None,))
        x_shape = (None, None, self.embedding_dim)
        for layer in self.decoder_layers:
            layer.build(x_shape, memory_shape)
        self.final_norm.build(x_shape)
        if self.readout_attention is not None:
            self.readout_attention.build(x_shape, memory_shape)
        (self.tied_output or self.to_logits).build(x_shape)
        if self.registers and not self.encoder_registers:
            self.register_slots = self.add_weight(
                shape=(self.registers, self.embedding_dim), initializer=keras.initializers.RandomNormal(stddev=0.02), name="registers"
            )
        self.built = True

    # -- shared pieces ---------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> list[TransformerDecoderLayer]:
        return [getattr(self, f"layer_{i}") for i in range(self.num_layers)]

    def logits(self, features):
        if self.tied_output is not None:
            return self.tied_output(features, self.embedding.embeddings)
        return self.to_logits(features)

    def head_variables(self):
        if self.tied_output is not None:
            return self.tied_output.trainable_variables + self.embedding.trainable_variables
        return self.to_logits.trainable_variables

    def memory(self, grid):
        """What the cross-attention reads: the encoded cells [B, cells, D], then the registers, if any."""
        memory = self.memory_norm(self.grid_encoder(grid))
        if not self.registers or self.encoder_registers:  # the encoder's output ends with them
            return memory
        return append_tokens(memory, self.register_slots)

    def readout(self, x, weights, readout_keys=()):
        """(features the output layer reads, cross-attention weights of the map) from the last layer's
        `x` and `weights`; with the readout attention, its context is added and its weights are the map."""
        features = self.final_norm(x)
        if self.readout_attention is None:
            return features, weights
        context, weights = attend(self.readout_attention, features, *readout_keys)
        return features + context, weights

    def readout_keys(self, memory, refs: int = 1):
        """The readout attention's keys and values of the memory, [B, cells, 1, D] each (() without it).

        `refs`: captions per image, as in `TransformerDecoderLayer.call`.
        """
        if self.readout_attention is None:
            return ()
        keys = project(self.readout_attention.key_dense, memory), project(self.readout_attention.value_dense, memory)
        return keys if refs == 1 else tuple(ops.repeat(k, refs, axis=0) for k in keys)

    def cell_attention(self, weights):
        """The attention map [..., cells] of cross-attention weights [B, heads, ..., cells + registers].

        The heads' mean without registers; with them, the heads' attention on the cells summed and
        normalised over the cells (a head that looks at a register counts for what it puts on the image).
        """
        weights = ops.cast(weights, "float32")
        if not self.registers:
            return ops.mean(weights, axis=1)
        on_cells = ops.sum(weights[..., : -self.registers], axis=1)
        return on_cells / ops.maximum(ops.sum(on_cells, axis=-1, keepdims=True), 1e-9)

    def embed(self, tokens, positions=None):
        """Word + position embeddings of tokens [B, T]; `positions` [B, T] (default: 0, 1, ... for every caption)."""
        if positions is None:
            if tokens.shape[1] > self.max_length:
                raise ValueError(f"captions of {tokens.shape[1]} positions exceed max_length {self.max_length}")
            return self.embedding(tokens) + ops.cast(self.token_positions(ops.arange(tokens.shape[1])), self.compute_dtype)[None]
        return self.embedding(tokens) + ops.cast(self.token_positions(positions), self.compute_dtype)

    # -- teacher forcing ---------------------------------------------------------------------------
    def teacher_forcing_features(self, grid, tokens, training=False):
        """(final features [B, T, D] before dropout, attention [B, T, cells])."""
        memory = self.memory(grid)  # once per image
        refs = 1 if len(tokens.shape) == 2 else tokens.shape[1]
        x = self.embed(flat_captions(tokens))
        weights = None
        for layer in self.decoder_layers:
            masks = self._residual_masks(x, training)
            if self.recompute_grad and training:
                x, weights = recompute_grad(lambda x, memory, *m, layer=layer: layer(x, memory, m, refs=refs))(x, memory, *(masks or ()))
            else:
                x, weights = layer(x, memory, masks, refs=refs)
        features, weights = self.readout(x, weights, self.readout_keys(memory, refs))
        return features, self.cell_attention(weights)

    def cross_attention_by_head(self, grid, tokens):
        """Every layer's and head's cross-attention on the cells for whole captions: float32 [B, layers, heads, T, cells].

        `tokens` [B, T] start with <start>. Fed <start> and a generated caption, position t
        holds the weights of decoding step t, and `cell_attention` of the last layer's is the
        map the decoding functions return (without registers: the heads' mean). The heads
        specialise (one looks at the object a word names, another elsewhere), which that
        map hides: the report scores each. With registers a head's row sums to its share on the cells.
        """
        memory, x = self.memory(grid), self.embed(tokens)
        maps = []
        for layer in self.decoder_layers:
            x, weights = layer(x, memory)
            maps.append(ops.cast(weights[..., : ops.shape(weights)[-1] - self.registers], "float32"))
        return ops.stack(maps, axis=1)

    def _residual_masks(self, x, training):
        """Three dropout masks for a layer's residual branches, drawn outside any recomputed block."""
        if not training or not self.dropout_rate:
            return None
        ones = ops.ones_like(x)
        return [self.dropout(ones, training=True) for _ in range(3)]

    def checkpointed_objective(self, grid, inputs, targets):
        """Each decoder layer is replayed in the backward pass; the output layer and loss run in recomputed blocks of time."""
        features, weights = self.teacher_forcing_features(grid, inputs, training=True)
        loss, accuracy = checkpointed_head_loss(self, features, targets, CHECKPOINT_BLOCK_STEPS)
        return loss, doubly_stochastic_penalty(weights, targets), accuracy

    # -- decoding ---------------------------------------------------------------------------------
    def encode(self, grid, training=False):
        """(memory of the cells [B, cells, D], cross-attention keys/values [B, cells + registers, layers, 2, H, d], initial state).

        With the readout attention its keys and values are one more "layer" of them (reshaped to H, d).

        The state: each caption's next position [B] (0) and every layer's empty self-attention
        key and value caches [B, max_length, H, d]. The decoding loops size their attention
        maps by the memory's cells: the registers are in the keys only.
        """
        memory = self.memory(grid)
        batch, head_dim = ops.shape(grid)[0], self.embedding_dim // self.num_heads
        per_layer = [ops.stack(layer.memory_keys(memory), axis=2) for layer in self.decoder_layers]
        if self.readout_attention is not None:  # [B, cells, 1, D] as [B, cells, H, d], to stack with the layers'
            readout_keys = ops.stack(self.readout_keys(memory), axis=2)
            per_layer.append(ops.reshape(readout_keys, (batch, -1, 2, self.num_heads, head_dim)))
        keys = ops.stack(per_layer, axis=2)
        empty = ops.zeros((batch, self.max_length, self.num_heads, head_dim), self.compute_dtype)
        cells = memory[:, : memory.shape[1] - self.registers] if self.registers else memory
        return cells, keys, [ops.zeros((batch,), "int32")] + [empty] * (2 * self.num_layers)

    def step(self, tokens, state, values, keys, training=False):
        """One word per caption: (logits [B, V], the state one position on, attention [B, cells])."""
        position, caches = state[0], state[1:]
        x = self.embed(tokens[:, None], position[:, None])
        # Where this step writes and what it sees: the same for every layer's cache.
        size = caches[0].shape[1] or tf.shape(caches[0])[1]  # static, except in functions traced with open shapes
        row = tf.one_hot(position, size, dtype=caches[0].dtype)[:, :, None, None]
        filled = tf.range(size)[None, :] <= position[:, None]
        new_caches = []
        for i, layer in enumerate(self.decoder_layers):
            x, cache_keys, cache_values, weights = layer.step(
                x, row, filled, caches[2 * i], caches[2 * i + 1], keys[:, :, i, 0], keys[:, :, i, 1]
            )
            new_caches += [cache_keys, cache_values]
        readout_keys = () if self.readout_attention is None else [  # encode's extra "layer", back to [B, cells, 1, D]
            ops.reshape(keys[:, :, self.num_layers, j], (ops.shape(x)[0], -1, 1, self.embedding_dim)) for j in (0, 1)
        ]
        features, weights = self.readout(x, weights, readout_keys)
        logits = self.logits(features)[:, 0]
        return logits, [position + 1, *new_caches], self.cell_attention(weights)[:, 0]

    def get_config(self):
        return {
            **super().get_config(),
            "max_length": self.max_length,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "grid_positions": self.grid_positions,
            "grid_adapter": self.grid_adapter,
            "encoder_layers": self.encoder_layers,
            "tie_embeddings": self.tie_embeddings,
            "registers": self.registers,
            "encoder_registers": self.encoder_registers,
            "readout_attention": self.readout_attention is not None,
        }
