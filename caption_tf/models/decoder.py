"""The attention decoder: an LSTM or GRU that captions a feature grid.

`CaptionDecoder` is a `keras.Model` with its own `train_step` / `test_step`
(teacher forcing, padding-masked loss), so `model.fit`, `model.evaluate` and
every Keras callback work. Per step it embeds the previous word, attends over
the projected grid (Bahdanau: with the previous state, before the cell; Luong:
with the new state, after it) and predicts the next word.

Example:

>>> model = CaptionDecoder(vocab_size=100, embedding_dim=16, units=32)
>>> grid = keras.random.normal((2, 49, 64)); tokens = keras.ops.ones((2, 9), "int32")
>>> tuple(model((grid, tokens)).shape)
(2, 9, 100)
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from caption_tf.models.attention import build_attention
from caption_tf.models.recompute import recompute_grad

# Steps per recomputed block in the checkpointed training loss. Measured (bench_memory.py,
# batch 64, 512 units, vocab 5000, max length 40): 1 step 143 MB, 4 steps 234 MB, plain 1233 MB;
# 4 steps trained ~35% faster than 1.
CHECKPOINT_BLOCK_STEPS = 4


def masked_loss(targets, logits):
    """Mean cross-entropy over real tokens; padding (id 0) does not count."""
    ce = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    mask = ops.cast(ops.not_equal(targets, 0), "float32")
    return ops.sum(ce * mask) / ops.maximum(ops.sum(mask), 1.0)


def masked_accuracy(targets, logits):
    hits = ops.cast(ops.equal(ops.cast(ops.argmax(logits, -1), targets.dtype), targets), "float32")
    mask = ops.cast(ops.not_equal(targets, 0), "float32")
    return ops.sum(hits * mask) / ops.maximum(ops.sum(mask), 1.0)


@keras.saving.register_keras_serializable("caption_tf")
class CaptionDecoder(keras.Model):
    """LSTM/GRU decoder with Bahdanau or Luong attention over image features."""

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 64,
        units: int = 128,
        decoder: str = "lstm",
        attention: str = "bahdanau",
        luong_score: str = "general",
        attention_units: int | None = None,
        dropout: float = 0.0,
        recompute_grad: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if decoder not in ("lstm", "gru"):
            raise ValueError(f"decoder must be 'lstm' or 'gru', got {decoder!r}")
        self.vocab_size, self.embedding_dim, self.units = vocab_size, embedding_dim, units
        self.decoder, self.attention_kind, self.luong_score = decoder, attention, luong_score
        self.attention_units, self.dropout_rate = attention_units, dropout
        # Gradient checkpointing: keep only each step's inputs for the backward pass and
        # recompute the attention/cell activations from them (less memory, ~1 extra forward).
        self.recompute_grad = recompute_grad

        self.encoder = keras.layers.Dense(units, activation="relu", name="encoder")
        self.init_h = keras.layers.Dense(units, activation="tanh", name="init_h")
        self.init_c = keras.layers.Dense(units, activation="tanh", name="init_c") if decoder == "lstm" else None
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")
        cell_cls = keras.layers.LSTMCell if decoder == "lstm" else keras.layers.GRUCell
        self.cell = cell_cls(units, name=decoder)
        # Luong scores the cell output against the keys, so it works at decoder width.
        att_units = (attention_units or units) if attention == "bahdanau" else units
        self.attention = build_attention(attention, att_units, luong_score)
        self.combine = keras.layers.Dense(units, activation="tanh", name="combine") if attention == "luong" else None
        self.dropout = keras.layers.Dropout(dropout)
        self.to_logits = keras.layers.Dense(vocab_size, dtype="float32", name="logits")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")

    # -- the two halves every decoding loop uses ---------------------------------------------
    def encode(self, grid, training=False):
        """Project the grid once: (values, attention keys, initial cell state)."""
        values = self.encoder(ops.cast(grid, self.compute_dtype))
        keys = self.attention.project_keys(values)
        mean = ops.mean(values, axis=1)
        state = [self.init_h(mean), self.init_c(mean)] if self.init_c is not None else [self.init_h(mean)]
        return values, keys, state

    def step(self, tokens, state, values, keys, training=False):
        """One word: (logits [B, V] float32, new state, attention weights [B, cells])."""
        features, state, weights = self.step_features(self.embedding(tokens), state, values, keys, training)
        return self.to_logits(self.dropout(features, training=training)), state, weights

    def step_features(self, embedded, state, values, keys, training=False):
        """Attention + cell for one embedded word: (features, new state list, weights).

        Deterministic (no dropout here), so `tf.recompute_grad` can replay it exactly.
        """
        if self.combine is None:  # Bahdanau
            context, weights = self.attention(state[0], values, keys)
            output, state = self.cell(ops.concatenate([embedded, context], -1), state, training=training)
            features = ops.concatenate([output, context], -1)
        else:  # Luong
            output, state = self.cell(embedded, state, training=training)
            context, weights = self.attention(output, values, keys)
            features = self.combine(ops.concatenate([output, context], -1))
        return features, list(state) if isinstance(state, (list, tuple)) else [state], weights

    def _recomputed_blocks(self, embedded, state, values, keys, training):
        """Steps in blocks of ~sqrt(T), each replayed in the backward pass: (features, weights) lists, state.

        Per-step blocks save nothing at long lengths: the backward pass then holds one
        gradient of the shared `values`/`keys` per step until their final sum. A block
        sums its own contributions, so ~sqrt(T) of them are alive at once.
        """

        @recompute_grad
        def block_fn(block_embedded, values, keys, *state):
            state, features, weights = list(state), [], []
            for t in range(block_embedded.shape[1]):
                step_features, state, step_weights = self.step_features(block_embedded[:, t], state, values, keys, training)
                features.append(step_features)
                weights.append(step_weights)
            return (ops.stack(features, 1), ops.stack(weights, 1), *state)

        steps = embedded.shape[1]
        size = max(1, math.ceil(math.sqrt(steps)))
        features, weights = [], []
        for start in range(0, steps, size):
            block_features, block_weights, *state = block_fn(embedded[:, start : start + size], values, keys, *state)
            features += [block_features[:, t] for t in range(block_features.shape[1])]
            weights += [block_weights[:, t] for t in range(block_weights.shape[1])]
        return features, weights, state

    def checkpointed_loss(self, grid, inputs, targets, block_steps: int = CHECKPOINT_BLOCK_STEPS):
        """`(masked_loss, masked_accuracy)` of a training pass, with gradient checkpointing.

        Equal (to float rounding) to `masked_loss(targets, self((grid, inputs), training=True))`,
        same dropout masks and gradients, but the backward pass keeps far less alive:

        - Blocks of `block_steps` steps run attention, cell, logits and loss and return
          only the loss sum and the state; the backward pass replays one block at a time.
          The [B, T, vocab] logits and their softmax gradient never exist.
        - What dominated the peak was not activations but gradients waiting to be summed:
          an unrolled loop gives every step its own gradient for each weight and for the
          shared `values`/`keys`, and TensorFlow's tape sums such a list only once about
          128 MB of it is pending, per tensor. Here the step weights (via
          `keras.StatelessScope`), `values` and `keys` go into each block as inputs and come
          out as identities feeding the next block, so their gradients are summed block by
          block along that chain: one running sum each.
        - Dropout masks are drawn before the blocks, in step order (the same masks as
          `call`), so a replay cannot draw new ones.

        Example:

        ```python
        loss, accuracy = model.checkpointed_loss(grid, tokens[:, :-1], tokens[:, 1:])
        ```
        """
        values, keys, state = self.encode(grid, training=True)
        embedded = self.embedding(inputs)
        steps, batch = inputs.shape[1], ops.shape(inputs)[0]
        width = self.to_logits.kernel.shape[0]
        masks = [self.dropout(ops.ones((batch, width), self.compute_dtype), training=True) for _ in range(steps)]
        variables = self._step_variables()
        weights = [tf.identity(v.value) for v in variables]
        loss_sums, hit_sums = [], []
        for start in range(0, steps, block_steps):
            stop = min(start + block_steps, steps)
            block = recompute_grad(self._loss_block(targets[:, start:stop], masks[start:stop], variables, len(state)))
            loss_sum, hits, values, keys, *carried = block(embedded[:, start:stop], values, keys, *state, *weights)
            state, weights = carried[: len(state)], carried[len(state) :]
            loss_sums.append(loss_sum)
            hit_sums.append(hits)
        count = ops.maximum(ops.sum(ops.cast(ops.not_equal(targets, 0), "float32")), 1.0)
        return ops.sum(ops.stack(loss_sums)) / count, ops.sum(ops.stack(hit_sums)) / count

    def _step_variables(self):
        """The weights every decoding step reads (carried through the checkpointed blocks)."""
        layers = [self.cell, self.attention, self.to_logits] + ([self.combine] if self.combine is not None else [])
        return [v for layer in layers for v in layer.trainable_variables]

    def _loss_block(self, targets, masks, variables, state_size):
        """`fn(embedded, values, keys, *state, *weights)` for `recompute_grad`: loss sum, hits, carries."""

        def block(embedded, values, keys, *carried):
            state, weights = list(carried[:state_size]), carried[state_size:]
            loss_sum, hits = 0.0, 0.0
            with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
                for t in range(len(masks)):
                    features, state, _ = self.step_features(embedded[:, t], state, values, keys, training=True)
                    logits = self.to_logits(features * masks[t])
                    target, real = targets[:, t], ops.cast(ops.not_equal(targets[:, t], 0), "float32")
                    ce = keras.losses.sparse_categorical_crossentropy(target, logits, from_logits=True)
                    loss_sum += ops.sum(ce * real)
                    hit = ops.cast(ops.equal(ops.cast(ops.argmax(logits, -1), target.dtype), target), "float32")
                    hits += ops.sum(hit * real)
            # Identities, not the inputs themselves: each block's output is a new tensor to chain on.
            carried_out = [tf.identity(x) for x in (values, keys, *state, *weights)]
            return (loss_sum, tf.stop_gradient(hits), *carried_out)

        return block

    def call(self, inputs, training=False, return_attention=False):
        grid, tokens = inputs
        values, keys, state = self.encode(grid, training)
        if self.recompute_grad and training:
            features, weights, state = self._recomputed_blocks(self.embedding(tokens), state, values, keys, training)
            # Dropout stays outside the recomputed blocks: a replay would draw new masks.
            logits = ops.stack([self.to_logits(self.dropout(f, training=training)) for f in features], axis=1)
            return (logits, ops.stack(weights, axis=1)) if return_attention else logits
        logits, weights = [], []
        # Python-unrolled over the static caption length: Keras 3 runs train_step without
        # autograph, and a fixed length is what XLA wants anyway.
        for t in range(tokens.shape[1]):
            step_logits, state, step_weights = self.step(tokens[:, t], state, values, keys, training)
            logits.append(step_logits)
            weights.append(step_weights)
        logits = ops.stack(logits, axis=1)
        return (logits, ops.stack(weights, axis=1)) if return_attention else logits

    # -- training ---------------------------------------------------------------------------
    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def train_step(self, data):
        (grid, inputs), targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            if self.recompute_grad:  # never materialises the [B, T, vocab] logits
                loss, accuracy = self.checkpointed_loss(grid, inputs, targets)
            else:
                logits = self((grid, inputs), training=True)
                loss, accuracy = masked_loss(targets, logits), None
            total = loss + ops.sum(self.losses) if self.losses else loss
            # Gradients are summed across replicas, so each replica contributes 1/replicas.
            scaled = self.optimizer.scale_loss(total / replicas)
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        if accuracy is None:
            return self._update_metrics(loss, targets, logits)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(accuracy)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        (grid, inputs), targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = self((grid, inputs), training=False)
        return self._update_metrics(masked_loss(targets, logits), targets, logits)

    def _update_metrics(self, loss, targets, logits):
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(masked_accuracy(targets, logits))
        return {m.name: m.result() for m in self.metrics}

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "decoder": self.decoder,
            "attention": self.attention_kind,
            "luong_score": self.luong_score,
            "attention_units": self.attention_units,
            "dropout": self.dropout_rate,
            "recompute_grad": self.recompute_grad,
        }


def build_decoder(
    model_cfg, vocab_size: int, grid_shape: tuple[int, int], max_length: int, recompute_grad: bool = False
) -> CaptionDecoder:
    """A CaptionDecoder from a `ModelConfig`, built (weights created) for the given grid.

    `recompute_grad` (from `TrainConfig.recompute_grad`) turns on gradient checkpointing.
    """
    model = CaptionDecoder(
        vocab_size=vocab_size,
        embedding_dim=model_cfg.embedding_dim,
        units=model_cfg.units,
        decoder=model_cfg.decoder,
        attention=model_cfg.attention,
        luong_score=model_cfg.luong_score,
        attention_units=model_cfg.attention_units,
        dropout=model_cfg.dropout,
        recompute_grad=recompute_grad,
        name="caption_decoder",
    )
    model((ops.zeros((1, *grid_shape)), ops.zeros((1, max_length - 1), "int32")))
    return model
