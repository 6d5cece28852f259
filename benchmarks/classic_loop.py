"""A reference implementation of the classic hand-written captioning train loop.

This is the loop of the classic TensorFlow image-captioning tutorial ("Show, Attend and
Tell" on cached InceptionV3 grids), written here from its algorithm to time the project's
decoders against it (`bench_vs_classic.py`). Nothing of it is used by the package.

What it computes, per batch (B images, a grid of N cells x C channels, captions of T+1
tokens, embedding E, units U, vocabulary V):

- encoder: `Dense(E, relu)` over every grid cell, once per batch;
- per step t (a Python loop over the T steps inside one `tf.function`, i.e. unrolled in the graph):
  Bahdanau attention with the previous GRU state, `V(tanh(W1(features) + W2(hidden)))`
  (`W1`, `W2`: `Dense(U)`, `V`: `Dense(1)`; `W1(features)` is recomputed at every step, as
  in the tutorial), softmax over the cells, the context (weighted sum of the features);
  the embedded previous word (teacher forcing) concatenated after the context; one step of
  `keras.layers.GRU(U, return_sequences=True, return_state=True)` from the previous state
  (zeros at t = 0); `fc1 = Dense(U)` then `fc2 = Dense(V)` -> logits; the padding-masked
  cross-entropy of that step, added to the loss;
- `GradientTape` over encoder + decoder, Adam.

Parameters (minimal sizes E=64, U=128, V=3000, C=2048): about 0.85 M.

Example:

>>> model = ClassicCaptioner(vocab_size=3000, embedding_dim=64, units=128)
>>> step = classic_train_step(model, keras.optimizers.Adam(1e-3), start_id=2)
>>> loss = step(grid, tokens)     # tokens [B, T+1] start with <start>
"""

from __future__ import annotations

import keras
import tensorflow as tf


class ClassicAttention(keras.layers.Layer):
    """score = V(tanh(W1(features) + W2(hidden))), softmax over the cells (axis 1)."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.W1, self.W2, self.V = keras.layers.Dense(units), keras.layers.Dense(units), keras.layers.Dense(1)

    def call(self, features, hidden):
        score = self.V(tf.nn.tanh(self.W1(features) + self.W2(hidden[:, None, :])))  # [B, N, 1]
        weights = tf.nn.softmax(score, axis=1)
        return tf.reduce_sum(weights * features, axis=1), weights


class ClassicCaptioner(keras.Model):
    """Encoder (`Dense(E, relu)`) + GRU decoder with Bahdanau attention, one step per call."""

    def __init__(self, vocab_size: int, embedding_dim: int, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.encoder = keras.layers.Dense(embedding_dim, activation="relu")
        self.attention = ClassicAttention(units)
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim)
        self.gru = keras.layers.GRU(units, return_sequences=True, return_state=True, recurrent_initializer="glorot_uniform")
        self.fc1 = keras.layers.Dense(units)
        self.fc2 = keras.layers.Dense(vocab_size)

    def decode_step(self, word, features, hidden):
        """word [B, 1] -> (logits [B, V], new hidden [B, U], attention [B, N, 1])."""
        context, weights = self.attention(features, hidden)
        x = tf.concat([context[:, None, :], self.embedding(word)], axis=-1)
        output, state = self.gru(x, initial_state=hidden)
        logits = self.fc2(tf.reshape(self.fc1(output), [-1, self.units]))
        return logits, state, weights


def classic_loss(real, logits):
    """Per-step cross-entropy with padding (id 0) masked out, averaged over the batch."""
    ce = keras.losses.sparse_categorical_crossentropy(real, logits, from_logits=True)
    mask = tf.cast(tf.not_equal(real, 0), ce.dtype)
    return tf.reduce_mean(ce * mask)


def classic_train_step(model: ClassicCaptioner, optimizer, start_id: int, jit_compile: bool = False):
    """The tutorial's `@tf.function` train step: `step(grid, tokens) -> mean loss per step`."""

    def step(grid, tokens):
        batch, length = tf.shape(tokens)[0], tokens.shape[1]
        hidden = tf.zeros([batch, model.units])
        word = tf.fill([batch, 1], start_id)
        loss = 0.0
        with tf.GradientTape() as tape:
            features = model.encoder(grid)
            for t in range(1, length):  # a Python loop: unrolled into the graph
                logits, hidden, _ = model.decode_step(word, features, hidden)
                loss += classic_loss(tokens[:, t], logits)
                word = tokens[:, t : t + 1]  # teacher forcing
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss / (length - 1)

    return tf.function(step, jit_compile=jit_compile)
