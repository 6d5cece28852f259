"""Caption generation: batched greedy decoding compiled as a `tf.function`.

The loop is unrolled over a fixed maximum length (what XLA needs); finished
captions keep emitting padding, so a whole batch decodes in one call.

Example:

>>> generator = CaptionGenerator(model, start_id=2, end_id=3, max_length=15)
>>> tokens, attention = generator.greedy(grid)   # [B, 14], [B, 14, cells]
"""

from __future__ import annotations

import tensorflow as tf


class CaptionGenerator:
    """Compiled decoding functions for one trained `CaptionDecoder`."""

    def __init__(self, model, start_id: int, end_id: int, max_length: int, jit_compile: bool = False):
        self.model, self.start_id, self.end_id = model, start_id, end_id
        self.steps = max_length - 1  # <start> is given, not generated
        self._greedy = tf.function(self._greedy_impl, jit_compile=jit_compile, reduce_retracing=True)

    def greedy(self, grid):
        """(tokens int32 [B, steps], attention float32 [B, steps, cells]); 0 after <end>."""
        return self._greedy(tf.convert_to_tensor(grid))

    def _greedy_impl(self, grid):
        values, keys, state = self.model.encode(grid)
        batch = tf.shape(grid)[0]
        token = tf.fill([batch], self.start_id)
        done = tf.zeros([batch], tf.bool)
        tokens, weights = [], []
        for _ in range(self.steps):
            logits, state, step_weights = self.model.step(token, state, values, keys)
            token = tf.where(done, 0, tf.argmax(logits, -1, output_type=tf.int32))
            done = done | tf.equal(token, self.end_id)
            tokens.append(token)
            weights.append(tf.cast(step_weights, tf.float32))
        return tf.stack(tokens, 1), tf.stack(weights, 1)
