"""What every decoder family shares: the training objective, `train_step`/`test_step`, `call`.

A family (`CaptionDecoder`: LSTM/GRU with attention; `TransformerCaptionDecoder`) provides

- `teacher_forcing_features(grid, tokens, training)` -> (features [B, T, F], attention
  [B, T, cells], ...): the training pass over whole captions up to the output layer, as
  parallel as the maths allows, and `logits(features)` -> float32 [..., V], the output layer.
  `tokens` are one caption per grid [B, T] or an image's references together [B, refs, T]
  (`group_captions`: the grid is then encoded once per image, not once per caption);
- `encode(grid)` -> (values, keys, state) and `step(tokens, state, values, keys)` ->
  (logits [B, V], state, attention [B, cells]): one word at a time, for decoding
  (`models/decoding.py`); run step by step with teacher forcing they give the same logits;
- optionally `checkpointed_objective(...)` for `--recompute-grad`.

The objective is the padding-masked cross-entropy (optionally label-smoothed) plus
`attention_penalty` times Show, Attend and Tell's doubly stochastic attention penalty
(`losses.doubly_stochastic_penalty`). Logs: `loss` (the objective), `accuracy` (next-word,
real tokens) and `attention_penalty` (the penalty before its weight).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from caption_tf.models.losses import PAD_ID, doubly_stochastic_penalty, masked_accuracy, masked_loss, padding_mask, replica_token_share, token_cross_entropy
from caption_tf.models.recompute import recompute_grad


def group_captions(tokens, *per_image):
    """(tokens [captions, T], each `per_image` tensor repeated once per caption of its image).

    With `--group-by-image` (and in phase-2 fine-tuning) a training batch holds every
    reference caption of an image together, `tokens` [images, refs, T]
    (`training.pipeline.caption_batches`), so a decoder encodes each grid once and repeats
    the encoding for the image's captions, instead of encoding one copy of the grid per
    caption: the grid projection, adapter and encoder layers are most of a step's arithmetic.
    Tokens [B, T] (one caption per grid) pass through unchanged. Reference slots an image
    does not fill are all padding and drop out of the loss.

    Args:
        tokens: int tokens [B, T] or [images, refs, T].
        *per_image: tensors whose first axis is the image.

    Example:

    >>> tokens, grid = group_captions(keras.ops.ones((2, 5, 7), "int32"), keras.ops.zeros((2, 3, 4)))
    >>> tuple(tokens.shape), tuple(grid.shape)
    ((10, 7), (10, 3, 4))
    """
    if len(tokens.shape) == 2:
        return (tokens, *per_image)
    return (flat_captions(tokens), *[ops.repeat(x, tokens.shape[1], axis=0) for x in per_image])


def flat_captions(tokens):
    """Tokens [B, T] as they are, [images, refs, T] as [images * refs, T] (see `group_captions`)."""
    return tokens if len(tokens.shape) == 2 else ops.reshape(tokens, (-1, tokens.shape[2]))


# Steps per recomputed block in the checkpointed training loss. Measured (bench_memory.py,
# batch 64, 512 units, vocab 5000, max length 40): 1 step 143 MB, 4 steps 234 MB, plain 1233 MB;
# 4 steps trained ~35% faster than 1.
CHECKPOINT_BLOCK_STEPS = 4


class CaptionModel(keras.Model):
    """Base class of the decoders: objective, metrics, `train_step`, `test_step`, `call`.

    Args:
        vocab_size: words in the vocabulary (including padding and the reserved tokens).
        dropout: dropout rate (where each family applies it is documented there).
        attention_penalty: weight of the doubly stochastic attention penalty (0: off).
        label_smoothing: label smoothing of the cross-entropy (0: off).
        recompute_grad: gradient checkpointing in the train step.
    """

    def __init__(
        self,
        vocab_size: int,
        dropout: float = 0.0,
        attention_penalty: float = 0.0,
        label_smoothing: float = 0.0,
        recompute_grad: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if attention_penalty < 0 or not 0 <= label_smoothing < 1:
            raise ValueError(
                f"attention_penalty must be >= 0 and label_smoothing in [0, 1), got {attention_penalty} and {label_smoothing}"
            )
        self.vocab_size, self.dropout_rate = vocab_size, dropout
        self.attention_penalty, self.label_smoothing = attention_penalty, label_smoothing
        # Gradient checkpointing: keep fewer activations for the backward pass, recompute them.
        self.recompute_grad = recompute_grad
        self.dropout = keras.layers.Dropout(dropout)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self.penalty_tracker = keras.metrics.Mean(name="attention_penalty")

    # -- what a family implements ------------------------------------------------------------
    def teacher_forcing_features(self, grid, tokens, training=False):
        raise NotImplementedError

    def logits(self, features):
        raise NotImplementedError

    def encode(self, grid, training=False):
        raise NotImplementedError

    def step(self, tokens, state, values, keys, training=False):
        raise NotImplementedError

    def checkpointed_objective(self, grid, inputs, targets):
        """(cross-entropy, penalty, accuracy) of a training pass with gradient checkpointing."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def teacher_forcing(self, grid, tokens, training=False):
        """(logits [B, T, V] float32, attention [B, T, cells]) of whole captions."""
        features, weights = self.teacher_forcing_features(grid, tokens, training)[:2]
        # The output layer runs once over [batch x time], not per step.
        return self.logits(self.dropout(features, training=training)), weights

    def call(self, inputs, training=False, return_attention=False):
        grid, tokens = inputs
        logits, weights = self.teacher_forcing(grid, tokens, training)
        return (logits, weights) if return_attention else logits

    def objective(self, grid, inputs, targets, training=False):
        """(total loss, cross-entropy, attention penalty, accuracy) of one batch.

        `inputs` and `targets` are [B, T], or [images, refs, T] with `grid` [images, ...]
        (`group_captions`).
        """
        targets = flat_captions(targets)
        if self.recompute_grad and training:
            ce, penalty, accuracy = self.checkpointed_objective(grid, inputs, targets)
        else:
            features, weights = self.teacher_forcing_features(grid, inputs, training)[:2]
            ce, accuracy = self.output_loss(features, targets, training)
            penalty = doubly_stochastic_penalty(weights, targets)
        total = ce + self.attention_penalty * penalty if self.attention_penalty else ce
        return total, ce, penalty, accuracy

    def output_loss(self, features, targets, training=False):
        """(masked cross-entropy, masked accuracy) of the output layer over `features` [B, T, F].

        Only the real tokens go through the output layer: the [tokens x vocab] matmuls and
        softmax dominate a step at large vocabularies, and padding is about half of the
        steps of shapes captions at max length 20 (`benchmarks/bench_vs_classic.py`).
        Dropout runs before the real tokens are gathered, so the masks, the loss and the
        gradients are those of `call` (to float rounding). Under XLA, which needs static
        shapes, every position goes through and padding is masked out of the mean instead.
        """
        features = self.dropout(features, training=training)
        if not _in_xla_context():
            real = ops.not_equal(targets, PAD_ID)
            features, targets = tf.boolean_mask(features, real), tf.boolean_mask(targets, real)  # [real tokens, ...]
        logits = self.logits(features)
        return masked_loss(targets, logits, self.label_smoothing), masked_accuracy(targets, logits)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker, self.penalty_tracker]

    def train_step(self, data):
        (grid, inputs), targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            loss, ce, penalty, accuracy = self.objective(grid, inputs, targets, training=True)
            # Gradients are summed across replicas: weighting each replica's token-mean cross-entropy
            # by its share of the global batch's real tokens makes the update the token mean of the
            # global batch, as on one device. Per-caption and other losses count 1/replicas each.
            total = ce * replica_token_share(targets, replicas) + (loss - ce) / replicas
            if self.losses:
                total += ops.sum(self.losses) / replicas
            scaled = self.optimizer.scale_loss(total)
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return self._update_metrics(loss, penalty, accuracy)

    def test_step(self, data):
        (grid, inputs), targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        loss, _, penalty, accuracy = self.objective(grid, inputs, targets, training=False)
        return self._update_metrics(loss, penalty, accuracy)

    def _update_metrics(self, loss, penalty, accuracy):
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(accuracy)
        self.penalty_tracker.update_state(penalty)
        return {m.name: m.result() for m in self.metrics}

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "dropout": self.dropout_rate,
            "attention_penalty": self.attention_penalty,
            "label_smoothing": self.label_smoothing,
            "recompute_grad": self.recompute_grad,
        }


def _in_xla_context() -> bool:
    """True while tracing for XLA (`jit_compile=True`), which cannot compile data-dependent shapes."""
    from tensorflow.python.ops import control_flow_util  # no public API says "inside jit_compile"

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


@keras.saving.register_keras_serializable("caption_tf")
class TiedOutput(keras.layers.Layer):
    """Logits from the input word embeddings (Press & Wolf, 2017): one matrix for words in and out.

    `features` [..., F] go through `Dense(embedding_dim)`; the logits float32 [..., V] are
    their dot products with every word's embedding, plus a bias per word.

    Example:

    >>> head = TiedOutput(embedding_dim=8, vocab_size=20)
    >>> tuple(head(keras.random.normal((2, 16)), keras.random.normal((20, 8))).shape)
    (2, 20)
    """

    def __init__(self, embedding_dim: int, vocab_size: int, **kwargs):
        kwargs.setdefault("dtype", "float32")  # logits and softmax stay float32 under mixed precision
        super().__init__(**kwargs)
        self.embedding_dim, self.vocab_size = embedding_dim, vocab_size
        self.to_embedding = keras.layers.Dense(embedding_dim, name="to_embedding")

    def build(self, features_shape, table_shape=None):
        self.to_embedding.build(features_shape)
        self.bias = self.add_weight(shape=(self.vocab_size,), initializer="zeros", name="bias")

    def call(self, features, table):
        projected = ops.cast(self.to_embedding(features), "float32")
        return ops.matmul(projected, ops.transpose(ops.cast(table, "float32"))) + self.bias

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim, "vocab_size": self.vocab_size}


def checkpointed_head_loss(model, features, targets, block_steps: int = CHECKPOINT_BLOCK_STEPS):
    """(masked loss, masked accuracy) of `model.logits(dropout(features))` in recomputed blocks of time.

    For the parallel decoders (Luong, Transformer): their [B, T, F] features are cheap to
    keep, the [B, T, vocab] logits and their gradient are not. Each block of `block_steps`
    steps computes logits and loss and is replayed in the backward pass; the output layer's
    weights go through the blocks as inputs and come out as identities (see
    `CaptionDecoder.checkpointed_loss`), so their gradients are summed along the chain. The
    dropout mask is drawn once, before the blocks: the same mask as `call` draws.
    """
    batch, steps = ops.shape(features)[0], features.shape[1]
    masks = model.dropout(ops.ones((batch, steps, features.shape[-1]), features.dtype), training=True)
    variables = model.head_variables()
    weights = [tf.identity(v.value) for v in variables]

    def head_block(block_targets):
        def block(block_features, *weights):
            with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
                logits = model.logits(block_features)
            real = padding_mask(block_targets)
            loss_sum = ops.sum(token_cross_entropy(block_targets, logits, model.label_smoothing) * real)
            hits = ops.cast(ops.equal(tf.argmax(logits, -1, output_type=tf.int32), ops.cast(block_targets, "int32")), "float32")
            return (loss_sum, tf.stop_gradient(ops.sum(hits * real)), *[tf.identity(w) for w in weights])

        return block

    loss_sums, hit_sums = [], []
    for start in range(0, steps, block_steps):
        stop = min(start + block_steps, steps)
        block = recompute_grad(head_block(targets[:, start:stop]))
        loss_sum, hits, *weights = block(features[:, start:stop] * masks[:, start:stop], *weights)
        loss_sums.append(loss_sum)
        hit_sums.append(hits)
    count = ops.maximum(ops.sum(padding_mask(targets)), 1.0)
    return ops.sum(ops.stack(loss_sums)) / count, ops.sum(ops.stack(hit_sums)) / count
