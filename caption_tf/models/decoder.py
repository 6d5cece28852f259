"""The recurrent decoders: an LSTM or GRU with Bahdanau or Luong attention over the feature grid.

`CaptionDecoder` is a `keras.Model` (see `base.CaptionModel`: teacher forcing,
padding-masked loss, optional doubly stochastic attention penalty), so `model.fit`,
`model.evaluate` and every Keras callback work. The grid goes through `GridEncoder`
(projection + 2-D positions) once per image. Then, per word:

- Bahdanau (Bahdanau et al., 2015; Show, Attend and Tell): attend with the previous state,
  feed [word; context] to the cell, predict from [cell output; context] (with
  `deep_output`, through `tanh(W [cell output; context])` first). The next attention
  depends on the state, so training runs step by step (a Python-unrolled loop); the
  output layer and the loss still run once over [batch x time].
- Luong (Luong et al., 2015, without input feeding): the cell reads the word only, then
  attends with its output and predicts from `combine([output; context])`. The cell never
  sees the context, so teacher forcing runs `keras.layers.LSTM/GRU(return_sequences=True)`
  over the whole caption (cuDNN on a GPU), then attends for all steps with one batched
  matmul.

Decoding (`models/decoding.py`) uses `encode` once and `step` per word; `step` computes,
one word at a time, exactly what teacher forcing computes over the caption.

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
from caption_tf.models.base import CHECKPOINT_BLOCK_STEPS, CaptionModel, TiedOutput, checkpointed_head_loss, flat_captions, group_captions
from caption_tf.models.grid import GridEncoder
from caption_tf.models.losses import doubly_stochastic_penalty, masked_accuracy, masked_loss, mean_over_captions, padding_mask, token_cross_entropy
from caption_tf.models.recompute import recompute_grad

__all__ = ["CaptionDecoder", "build_decoder", "masked_loss", "masked_accuracy"]

@keras.saving.register_keras_serializable("caption_tf")
class CaptionDecoder(CaptionModel):
    """LSTM/GRU decoder with Bahdanau or Luong attention over image features.

    Args:
        vocab_size: words in the vocabulary.
        embedding_dim: word embedding width.
        units: cell width.
        decoder: "lstm" or "gru".
        attention: "bahdanau" or "luong".
        luong_score: "general" or "dot" (Luong only; "dot" needs `feature_units == units`).
        attention_units: Bahdanau's hidden width (None: `units`).
        feature_units: width of the projected grid cells (None: `embedding_dim`, as the classic
            tutorial's encoder; `units` for Luong "dot", which compares cells and cell output).
        grid_positions: "learned", "sinusoidal" or "none" (`grid.GridEncoder`).
        grid_adapter: "none" or "conv" (`grid.GridEncoder`).
        encoder_layers, num_heads: Transformer encoder layers over the grid cells and their heads (`grid.GridEncoder`).
        tie_embeddings: predict words through the input embeddings (`base.TiedOutput`).
        deep_output: Bahdanau only: predict through `Dense(units, tanh)` over [cell output;
            context] (Show, Attend and Tell's deep output; the classic tutorial's `fc1`)
            instead of straight from the (units + feature_units)-wide concatenation. Luong always predicts
            through its `combine` layer of the same shape.
        dropout: on the features the output layer reads.
        scheduled_sampling: Bahdanau only: during training, the probability of feeding each
            caption its own previous prediction (argmax) instead of the reference word
            (Bengio et al., 2015, "Scheduled Sampling"), so it learns to go on from its own
            mistakes as greedy and beam decoding must. 0: pure teacher forcing.
        sampling_ramp_steps: optimizer steps over which that probability rises linearly from 0
            (0: the full probability from the first step).
        attention_penalty, label_smoothing, recompute_grad: see `base.CaptionModel`.
    """

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
        feature_units: int | None = None,
        grid_positions: str = "learned",
        grid_adapter: str = "none",
        encoder_layers: int = 0,
        num_heads: int = 4,
        tie_embeddings: bool = False,
        deep_output: bool = False,
        attention_penalty: float = 0.0,
        label_smoothing: float = 0.0,
        scheduled_sampling: float = 0.0,
        sampling_ramp_steps: int = 0,
        **kwargs,
    ):
        super().__init__(vocab_size, dropout, attention_penalty, label_smoothing, recompute_grad, **kwargs)
        if decoder not in ("lstm", "gru"):
            raise ValueError(f"CaptionDecoder: decoder must be 'lstm' or 'gru', got {decoder!r} (the transformer is TransformerCaptionDecoder)")
        if attention not in ("bahdanau", "luong"):
            raise ValueError(f"attention must be 'bahdanau' or 'luong', got {attention!r}")
        if scheduled_sampling and (attention != "bahdanau" or recompute_grad or not 0 < scheduled_sampling <= 1):
            raise ValueError(
                f"scheduled_sampling must be in (0, 1] with Bahdanau attention and without recompute_grad (the word fed at each step"
                f" then depends on the step before), got {scheduled_sampling} with {attention!r} attention, recompute_grad={recompute_grad}"
            )
        # Projecting the grid to `units` (the default before 2026-11-29) made every step's context,
        # the cell input and the output layer's input wider for no measured gain (docs/models.md).
        feature_units = feature_units or (units if attention == "luong" and luong_score == "dot" else embedding_dim)
        if attention == "luong" and luong_score == "dot" and feature_units != units:
            raise ValueError(f"Luong 'dot' attention needs feature_units == units, got {feature_units} and {units}")
        self.embedding_dim, self.units, self.feature_units = embedding_dim, units, feature_units
        self.decoder, self.attention_kind, self.luong_score = decoder, attention, luong_score
        self.attention_units = attention_units
        self.grid_positions, self.grid_adapter, self.tie_embeddings = grid_positions, grid_adapter, tie_embeddings

        self.encoder_layers, self.num_heads = encoder_layers, num_heads
        self.grid_encoder = GridEncoder(feature_units, grid_positions, grid_adapter, encoder_layers, num_heads, name="grid_encoder")
        self.init_h = keras.layers.Dense(units, activation="tanh", name="init_h")
        self.init_c = keras.layers.Dense(units, activation="tanh", name="init_c") if decoder == "lstm" else None
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")
        rnn_cls = keras.layers.LSTM if decoder == "lstm" else keras.layers.GRU
        # The layer runs whole captions (Luong); its cell runs single steps (decoding, Bahdanau).
        self.rnn = rnn_cls(units, return_sequences=True, name=decoder)
        # Luong scores the cell output against the keys, so its keys have the decoder's width.
        att_units = (attention_units or units) if attention == "bahdanau" else units
        self.attention = build_attention(attention, att_units, luong_score)
        self.combine = keras.layers.Dense(units, activation="tanh", name="combine") if attention == "luong" else None
        self.scheduled_sampling, self.sampling_ramp_steps = scheduled_sampling, sampling_ramp_steps
        # Its state is a model variable, checkpointed with the others: a resumed run draws the same coins.
        self.sampling_seed = keras.random.SeedGenerator(name="sampling_seed") if scheduled_sampling else None
        # Part of the output layer (`logits`), so teacher forcing runs it once over the real
        # tokens of [batch x time] instead of once per step.
        self.deep_output = deep_output
        self.deep_output_layer = keras.layers.Dense(units, activation="tanh", name="deep_output") if deep_output and attention == "bahdanau" else None
        if tie_embeddings:
            self.to_logits = None
            self.tied_output = TiedOutput(embedding_dim, vocab_size, name="tied_output")
        else:
            self.to_logits = keras.layers.Dense(vocab_size, dtype="float32", name="logits")
            self.tied_output = None

    def build(self, input_shape):
        grid_shape, tokens_shape = input_shape
        self.grid_encoder.build(grid_shape)
        cells_shape = (*grid_shape[:-1], self.feature_units)
        self.init_h.build((None, self.feature_units))
        if self.init_c is not None:
            self.init_c.build((None, self.feature_units))
        self.embedding.build(tokens_shape)
        cell_inputs = self.embedding_dim + (self.feature_units if self.combine is None else 0)
        self.rnn.build((None, None, cell_inputs))
        self.attention.build((None, self.units), cells_shape)
        features = self.units + self.feature_units if self.combine is None else self.units
        if self.combine is not None:
            self.combine.build((None, self.units + self.feature_units))
        if self.deep_output_layer is not None:
            self.deep_output_layer.build((None, features))
            features = self.units
        if self.tied_output is not None:
            self.tied_output.build((None, features))
        else:
            self.to_logits.build((None, features))
        self.built = True

    # -- pieces shared by teacher forcing and decoding -----------------------------------------
    @property
    def cell(self):
        return self.rnn.cell

    def encode(self, grid, training=False):
        """Project the grid once: (values [B, cells, D], attention keys, initial cell state)."""
        values = self.grid_encoder(grid)
        keys = self.attention.project_keys(values)
        mean = ops.mean(values, axis=1)
        state = [self.init_h(mean), self.init_c(mean)] if self.init_c is not None else [self.init_h(mean)]
        return values, keys, state

    def logits(self, features):
        """Output layer: features [..., F] -> logits float32 [..., V]."""
        if self.deep_output_layer is not None:
            features = self.deep_output_layer(features)
        if self.tied_output is not None:
            return self.tied_output(features, self.embedding.embeddings)
        return self.to_logits(features)

    def step(self, tokens, state, values, keys, training=False):
        """One word: (logits [B, V] float32, new state, attention weights [B, cells])."""
        features, state, weights = self.step_features(self.embedding(tokens), state, values, keys, training)
        return self.logits(self.dropout(features, training=training)), state, weights

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

    # -- teacher forcing -------------------------------------------------------------------------
    def teacher_forcing_features(self, grid, tokens, training=False):
        """(features [B, T, F] before dropout, attention [B, T, cells], final state)."""
        values, keys, state = self.encode(grid, training)
        tokens, values, keys, *state = group_captions(tokens, values, keys, *state)
        embedded = self.embedding(tokens)
        if self.combine is not None:  # Luong: the whole caption at once
            outputs = self.rnn(embedded, initial_state=state, training=training)
            context, weights = self.attention.attend_all(outputs, values, keys)
            return self.combine(ops.concatenate([outputs, context], -1)), weights, None
        if self.recompute_grad and training:
            features, weights, state = self._recomputed_blocks(embedded, state, values, keys, training)
            return ops.stack(features, 1), ops.stack(weights, 1), state
        features, weights = [], []
        sampling = self.sampling_probability() if training else None
        # Python-unrolled over the static caption length: Keras 3 runs train_step without
        # autograph, and a fixed length is what XLA wants anyway.
        for t in range(tokens.shape[1]):
            word = embedded[:, t]
            if t and sampling is not None:  # scheduled sampling: some captions go on from their own previous word
                own = ops.argmax(self.logits(features[-1]), axis=-1)  # no dropout: the word the model would say
                use_own = keras.random.uniform(ops.shape(own), seed=self.sampling_seed) < sampling
                word = ops.where(use_own[:, None], self.embedding(own), word)
            step_features, state, step_weights = self.step_features(word, state, values, keys, training)
            features.append(step_features)
            weights.append(step_weights)
        return ops.stack(features, 1), ops.stack(weights, 1), state

    def sampling_probability(self):
        """This training step's scheduled-sampling probability (a scalar tensor), or None when it is off.

        It rises linearly over `sampling_ramp_steps` optimizer steps to `scheduled_sampling`: a
        function of the optimizer's step counter, so a resumed run continues the same ramp.
        """
        if not self.scheduled_sampling:
            return None
        if not self.sampling_ramp_steps or getattr(self, "optimizer", None) is None:
            return ops.convert_to_tensor(self.scheduled_sampling, "float32")
        done = ops.cast(self.optimizer.iterations + 1, "float32") / float(self.sampling_ramp_steps)
        return self.scheduled_sampling * ops.minimum(done, 1.0)

    # -- gradient checkpointing --------------------------------------------------------------
    def _recomputed_blocks(self, embedded, state, values, keys, training):
        """Bahdanau steps in blocks of ~sqrt(T), each replayed in the backward pass: (features, weights) lists, state.

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

    def checkpointed_objective(self, grid, inputs, targets):
        loss, accuracy, penalty = self.checkpointed_loss(grid, inputs, targets, with_penalty=True)
        return loss, penalty, accuracy

    def checkpointed_loss(self, grid, inputs, targets, block_steps: int = CHECKPOINT_BLOCK_STEPS, with_penalty=False):
        """`(masked_loss, masked_accuracy)` of a training pass, with gradient checkpointing.

        Equal (to float rounding) to `masked_loss(targets, self((grid, inputs), training=True))`,
        same dropout masks and gradients, but the backward pass keeps far less alive.
        With `with_penalty`, also the doubly stochastic attention penalty (a third value).

        Bahdanau (sequential):

        - Blocks of `block_steps` steps run attention, cell, logits and loss and return
          only the loss sum, the attention sums and the state; the backward pass replays
          one block at a time. The [B, T, vocab] logits and their softmax gradient never exist.
        - What dominated the peak was not activations but gradients waiting to be summed:
          an unrolled loop gives every step its own gradient for each weight and for the
          shared `values`/`keys`, and TensorFlow's tape sums such a list only once about
          128 MB of it is pending, per tensor. Here the step weights (via
          `keras.StatelessScope`), `values` and `keys` go into each block as inputs and come
          out as identities feeding the next block, so their gradients are summed block by
          block along that chain: one running sum each.

        Luong (parallel): the recurrent layer and the batched attention run over the whole
        caption as usual (their activations are small: [B, T, units]); the output layer and
        the loss, whose [B, T, vocab] activations dominate, run in recomputed blocks of time.

        Dropout masks are drawn before the blocks (the same masks as `call`), so a replay
        cannot draw new ones.

        Example:

        ```python
        loss, accuracy = model.checkpointed_loss(grid, tokens[:, :-1], tokens[:, 1:])
        ```
        """
        targets = flat_captions(targets)
        if self.combine is not None:  # Luong
            features, weights, _ = self.teacher_forcing_features(grid, inputs, training=True)
            loss, accuracy = checkpointed_head_loss(self, features, targets, block_steps)
            return (loss, accuracy, doubly_stochastic_penalty(weights, targets)) if with_penalty else (loss, accuracy)
        values, keys, state = self.encode(grid, training=True)
        inputs, values, keys, *state = group_captions(inputs, values, keys, *state)
        embedded = self.embedding(inputs)
        steps, batch = inputs.shape[1], ops.shape(inputs)[0]
        width = self.units + self.feature_units
        masks = self.dropout(ops.ones((batch, steps, width), self.compute_dtype), training=True)
        variables = self._step_variables()
        weights = [tf.identity(v.value) for v in variables]
        loss_sums, hit_sums, attention_sums = [], [], []
        for start in range(0, steps, block_steps):
            stop = min(start + block_steps, steps)
            block = recompute_grad(self._loss_block(targets[:, start:stop], masks[:, start:stop], variables, len(state)))
            loss_sum, hits, attention_sum, values, keys, *carried = block(embedded[:, start:stop], values, keys, *state, *weights)
            state, weights = carried[: len(state)], carried[len(state) :]
            loss_sums.append(loss_sum)
            hit_sums.append(hits)
            attention_sums.append(attention_sum)
        count = ops.maximum(ops.sum(padding_mask(targets)), 1.0)
        loss, accuracy = ops.sum(ops.stack(loss_sums)) / count, ops.sum(ops.stack(hit_sums)) / count
        if not with_penalty:
            return loss, accuracy
        per_cell = ops.sum(ops.stack(attention_sums), axis=0)
        return loss, accuracy, mean_over_captions(ops.sum(ops.square(1.0 - per_cell), axis=-1), targets)

    def head_variables(self):
        """The weights of the output layer (carried through checkpointed blocks)."""
        deep = self.deep_output_layer.trainable_variables if self.deep_output_layer is not None else []
        if self.tied_output is not None:
            return deep + self.tied_output.trainable_variables + self.embedding.trainable_variables
        return deep + self.to_logits.trainable_variables

    def _step_variables(self):
        """The weights every decoding step reads (carried through the checkpointed blocks)."""
        layers = [self.cell, self.attention] + ([self.combine] if self.combine is not None else [])
        return [v for layer in layers for v in layer.trainable_variables] + self.head_variables()

    def _loss_block(self, targets, masks, variables, state_size):
        """`fn(embedded, values, keys, *state, *weights)` for `recompute_grad`: loss sum, hits, attention sums, carries."""

        def block(embedded, values, keys, *carried):
            state, weights = list(carried[:state_size]), carried[state_size:]
            loss_sum, hits, attention_sum = 0.0, 0.0, 0.0
            with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
                for t in range(masks.shape[1]):
                    features, state, step_weights = self.step_features(embedded[:, t], state, values, keys, training=True)
                    logits = self.logits(features * masks[:, t])
                    target, real = targets[:, t], padding_mask(targets[:, t])
                    loss_sum += ops.sum(token_cross_entropy(target, logits, self.label_smoothing) * real)
                    hit = ops.cast(ops.equal(tf.argmax(logits, -1, output_type=tf.int32), ops.cast(target, "int32")), "float32")
                    hits += ops.sum(hit * real)
                    attention_sum += ops.cast(step_weights, "float32") * real[:, None]
            # Identities, not the inputs themselves: each block's output is a new tensor to chain on.
            carried_out = [tf.identity(x) for x in (values, keys, *state, *weights)]
            return (loss_sum, tf.stop_gradient(hits), attention_sum, *carried_out)

        return block

    def get_config(self):
        return {
            **super().get_config(),
            "embedding_dim": self.embedding_dim,
            "units": self.units,
            "decoder": self.decoder,
            "attention": self.attention_kind,
            "luong_score": self.luong_score,
            "attention_units": self.attention_units,
            "feature_units": self.feature_units,
            "grid_positions": self.grid_positions,
            "grid_adapter": self.grid_adapter,
            "encoder_layers": self.encoder_layers,
            "num_heads": self.num_heads,
            "tie_embeddings": self.tie_embeddings,
            "deep_output": self.deep_output,
            "scheduled_sampling": self.scheduled_sampling,
            "sampling_ramp_steps": self.sampling_ramp_steps,
        }


def build_decoder(model_cfg, vocab_size: int, grid_shape: tuple[int, int], max_length: int, recompute_grad: bool = False,
                  sampling_ramp_steps: int = 0):
    """The decoder a `ModelConfig` describes, built (weights created) for the given grid.

    `model_cfg.decoder`: "lstm" or "gru" -> `CaptionDecoder`; "transformer" ->
    `TransformerCaptionDecoder`. `recompute_grad` (from `TrainConfig.recompute_grad`) turns
    on gradient checkpointing; `sampling_ramp_steps`: see `CaptionDecoder`.
    """
    common = dict(
        vocab_size=vocab_size,
        embedding_dim=model_cfg.embedding_dim,
        units=model_cfg.units,
        dropout=model_cfg.dropout,
        recompute_grad=recompute_grad,
        grid_positions=model_cfg.grid_positions,
        grid_adapter=model_cfg.grid_adapter,
        encoder_layers=model_cfg.encoder_layers,
        tie_embeddings=model_cfg.tie_embeddings,
        attention_penalty=model_cfg.attention_penalty,
        label_smoothing=model_cfg.label_smoothing,
        name="caption_decoder",
    )
    if model_cfg.decoder == "transformer":
        from caption_tf.models.transformer import TransformerCaptionDecoder

        model = TransformerCaptionDecoder(
            max_length=max_length, num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
            registers=model_cfg.registers, encoder_registers=model_cfg.encoder_registers,
            readout_attention=model_cfg.readout_attention, **common
        )
    else:
        model = CaptionDecoder(
            decoder=model_cfg.decoder,
            attention=model_cfg.attention,
            luong_score=model_cfg.luong_score,
            attention_units=model_cfg.attention_units,
            feature_units=model_cfg.grid_width,
            num_heads=model_cfg.num_heads,
            deep_output=model_cfg.deep_output,
            scheduled_sampling=model_cfg.scheduled_sampling,
            sampling_ramp_steps=sampling_ramp_steps,
            **common,
        )
    model((ops.zeros((1, *grid_shape)), ops.zeros((1, max_length - 1), "int32")))
    return model
