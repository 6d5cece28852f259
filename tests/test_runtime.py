"""Runtime: precision policies train without NaN, XLA choice, gradient checkpointing, memory caching."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_tf.models.decoder import CaptionDecoder
from caption_tf.training.runtime import (
    dataset_options,
    feature_bytes,
    fits_in_memory,
    gpu_compute_capabilities,
    per_replica_clipnorm,
    resolve_jit,
    resolve_precision,
    select_strategy,
)

VOCAB, CELLS, DIM, LENGTH, PAIRS, BATCH = 16, 4, 8, 8, 32, 8


def tiny_data(seed=0):
    rng = np.random.default_rng(seed)
    grid = rng.random((PAIRS, CELLS, DIM), dtype=np.float32)
    # The first word names the image's strongest channel, so there is something to learn.
    tokens = rng.integers(4, VOCAB, (PAIRS, LENGTH)).astype("int32")
    tokens[:, 0], tokens[:, 1] = 2, 4 + np.argmax(grid.mean(1), -1)
    tokens[::2, -2:] = 0  # some padding
    return tf.data.Dataset.from_tensor_slices(((grid, tokens[:, :-1]), tokens[:, 1:])).batch(BATCH)


def tiny_model(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    model = CaptionDecoder(vocab_size=VOCAB, embedding_dim=8, units=16, **kwargs)
    model((np.zeros((1, CELLS, DIM), "float32"), np.zeros((1, LENGTH - 1), "int32")))
    return model


@pytest.fixture
def policy():
    """Set a global dtype policy for one test and restore float32 after it."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_without_nan(precision, policy):
    policy(precision)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(0.01, clipnorm=5.0))
    # Keras wraps the optimizer for float16 only: bfloat16 has float32's exponent range.
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "mixed_float16")
    assert model.compute_dtype == precision.split("_")[1] and model.variable_dtype == "float32"
    history = model.fit(tiny_data(), epochs=6, verbose=0, shuffle=False).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)
    (grid, inputs), _ = next(iter(tiny_data()))
    logits, attention = model((grid, inputs), return_attention=True)
    assert logits.dtype == "float32" and attention.dtype == "float32"  # softmaxes stay float32


@pytest.mark.parametrize("deep_output", [False, True], ids=["output", "deep-output"])
def test_recompute_grad_gives_the_same_gradients_with_dropout(deep_output):
    model = tiny_model(dropout=0.5, deep_output=deep_output)
    (grid, inputs), targets = next(iter(tiny_data()))
    from caption_tf.models.decoder import masked_accuracy, masked_loss

    def gradients(recompute):
        model.recompute_grad = recompute
        seed_state = model.dropout.seed_generator.state.numpy()
        with tf.GradientTape() as tape:
            loss = masked_loss(targets, model((grid, inputs), training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        model.dropout.seed_generator.state.assign(seed_state)  # the same masks for the other run
        return [tf.convert_to_tensor(g).numpy() for g in grads]

    def checkpointed_gradients(block_steps):
        seed_state = model.dropout.seed_generator.state.numpy()
        with tf.GradientTape() as tape:
            loss, accuracy = model.checkpointed_loss(grid, inputs, targets, block_steps=block_steps)
        grads = tape.gradient(loss, model.trainable_variables)
        model.dropout.seed_generator.state.assign(seed_state)
        return loss, accuracy, [tf.convert_to_tensor(g).numpy() for g in grads]

    plain, recomputed = gradients(False), gradients(True)
    assert len(plain) == len(model.trainable_variables)
    for a, b in zip(plain, recomputed):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The training loss with the loss inside the blocks: 4 steps (blocks of 4 and 3) and 1 step per block.
    seed_state = model.dropout.seed_generator.state.numpy()
    logits = model((grid, inputs), training=True)
    model.dropout.seed_generator.state.assign(seed_state)
    for block_steps in (4, 1):
        loss, accuracy, checkpointed = checkpointed_gradients(block_steps)
        np.testing.assert_allclose(loss, masked_loss(targets, logits), rtol=1e-6)
        np.testing.assert_allclose(accuracy, masked_accuracy(targets, logits), rtol=1e-6)
        for a, b in zip(plain, checkpointed):
            np.testing.assert_allclose(a, b, atol=1e-6)
    # Dropout really is on: another draw of masks changes the gradients.
    model.dropout(tf.ones((1, 4)), training=True)  # advances the dropout seed generator
    other = gradients(False)
    assert any(not np.allclose(a, b, atol=1e-6) for a, b in zip(plain, other))


@pytest.mark.parametrize("jit", [False, True])
def test_recompute_grad_trains_like_plain_through_fit(jit):
    # fit's train step takes the checkpointed loss; under XLA too (the only XLA train-step test).
    # Plain and recompute run with the same jit setting: XLA draws other dropout masks.
    weights = []
    for recompute in (False, True):
        model = tiny_model(seed=4, attention="luong", decoder="gru", dropout=0.3, recompute_grad=recompute)
        model.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=jit)
        model.fit(tiny_data(), epochs=1, verbose=0, shuffle=False)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert CaptionDecoder.from_config(model.get_config()).recompute_grad is True


def test_precision_and_jit_choices():
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    has_tensor_cores = bool(gpu_compute_capabilities()) and min(gpu_compute_capabilities()) >= (7, 0)
    assert resolve_precision("auto") == ("mixed_float16" if has_tensor_cores else "float32")
    default = tf.distribute.get_strategy()
    assert resolve_jit("on", default) is True and resolve_jit("off", default) is False
    assert resolve_jit("auto", default) == bool(tf.config.list_physical_devices("GPU"))
    with pytest.raises(ValueError, match="--jit"):
        resolve_jit("maybe", default)


def test_strategy_selection_without_cluster(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if len(tf.config.list_logical_devices("GPU")) <= 1:
        assert select_strategy("auto") is tf.distribute.get_strategy()
    assert select_strategy("default").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="--distribute"):
        select_strategy("everywhere")
    policy = dataset_options(tf.distribute.get_strategy()).experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.AUTO


def test_memory_decisions():
    assert feature_bytes(10, (4, 8)) == 10 * 4 * 8 * 2
    assert fits_in_memory(feature_bytes(100, (64, 2048)))
    assert not fits_in_memory(10**15)  # a petabyte
    assert per_replica_clipnorm(5.0, 4) == 1.25 and per_replica_clipnorm(None, 4) is None
