import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_tf.config import ModelConfig
from caption_tf.models.attention import BahdanauAttention, LuongAttention
from caption_tf.models.decoder import CaptionDecoder, build_decoder, masked_loss
from caption_tf.models.decoding import CaptionGenerator


@pytest.mark.parametrize("attention", [BahdanauAttention(16), LuongAttention(24, "dot"), LuongAttention(24, "general")])
def test_attention_weights_sum_to_one_over_the_grid(attention):
    values = keras.random.normal((3, 49, 24), seed=1)
    query = keras.random.normal((3, 24), seed=2)
    context, weights = attention(query, values, attention.project_keys(values))
    assert tuple(context.shape) == (3, 24) and tuple(weights.shape) == (3, 49)
    np.testing.assert_allclose(np.sum(weights, -1), 1.0, atol=1e-5)
    assert np.all(np.asarray(weights) >= 0)
    # The context is the attention-weighted mean of the values.
    np.testing.assert_allclose(context, np.einsum("bn,bnd->bd", weights, values), atol=1e-5)


def test_luong_dot_prefers_the_cell_that_matches_the_query():
    values = np.zeros((1, 4, 8), "float32")
    values[0, 2] = 5.0
    _, weights = LuongAttention(8, "dot")(values[:, 2], values, values)
    assert int(np.argmax(weights[0])) == 2


def test_masked_loss_ignores_padding():
    targets = tf.constant([[3, 4, 0, 0]])
    good = tf.one_hot([[3, 4, 1, 1]], 6) * 20.0
    noisy_padding = tf.one_hot([[3, 4, 5, 2]], 6) * 20.0
    assert float(masked_loss(targets, good)) == pytest.approx(float(masked_loss(targets, noisy_padding)))
    assert float(masked_loss(targets, good)) < 1e-3


@pytest.mark.parametrize("decoder,attention", [("lstm", "bahdanau"), ("gru", "luong")])
def test_decoder_learns_a_feature_dependent_task(decoder, attention):
    """Two 'images' that differ only in one grid cell get different captions after training."""
    rng = np.random.default_rng(0)
    grids = rng.normal(size=(2, 9, 8)).astype("float32")
    tokens = np.array([[2, 4, 5, 3], [2, 4, 6, 3]], "int32")  # <start> a red|blue <end>
    x = np.repeat(grids, 32, 0)
    y = np.repeat(tokens, 32, 0)
    model = CaptionDecoder(vocab_size=8, embedding_dim=8, units=16, decoder=decoder, attention=attention)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    history = model.fit((x, y[:, :-1]), y[:, 1:], batch_size=16, epochs=15, verbose=0)
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]
    # Decoded past its captions' length: <end> at step 3, padding after it.
    tokens_out, attention_maps = CaptionGenerator(model, start_id=2, end_id=3, max_length=6).greedy(grids)
    assert tokens_out.numpy().tolist() == [[4, 5, 3, 0, 0], [4, 6, 3, 0, 0]]
    np.testing.assert_allclose(attention_maps.numpy().sum(-1), 1.0, atol=1e-5)


def test_saved_and_reloaded_model_gives_the_same_captions(tmp_path):
    cfg = ModelConfig(embedding_dim=8, units=16, decoder="gru", attention="luong")
    model = build_decoder(cfg, vocab_size=20, grid_shape=(9, 8), max_length=6)
    grid = np.random.default_rng(1).normal(size=(4, 9, 8)).astype("float32")
    before = CaptionGenerator(model, 2, 3, 6).greedy(grid)
    model.save_weights(tmp_path / "m.weights.h5")
    clone = build_decoder(cfg, vocab_size=20, grid_shape=(9, 8), max_length=6)
    assert not np.array_equal(CaptionGenerator(clone, 2, 3, 6).greedy(grid)[1], before[1])  # fresh init differs
    clone.load_weights(tmp_path / "m.weights.h5")
    after = CaptionGenerator(clone, 2, 3, 6).greedy(grid)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_allclose(before[1], after[1], atol=1e-6)
    # The whole model also round-trips through the .keras format.
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(CaptionGenerator(loaded, 2, 3, 6).greedy(grid)[0], before[0])


def forced_decoder(token: int, vocab_size: int = 6):
    """A decoder whose every step predicts `token`: zero output kernel, a large bias on that token."""
    model = build_decoder(ModelConfig(embedding_dim=4, units=8), vocab_size=vocab_size, grid_shape=(4, 3), max_length=8)
    kernel, bias = model.to_logits.get_weights()
    bias[:] = 0.0
    bias[token] = 10.0
    model.to_logits.set_weights([np.zeros_like(kernel), bias])
    return model


def test_greedy_and_beam_pad_after_the_end_token():
    grid = np.random.default_rng(0).normal(size=(5, 4, 3)).astype("float32")
    generator = CaptionGenerator(forced_decoder(token=3), start_id=2, end_id=3, max_length=8)
    ended = [3, 0, 0, 0, 0, 0, 0]  # <end> first, then only padding
    assert generator.greedy(grid)[0].numpy().tolist() == [ended] * 5
    assert generator.beam(grid, beam_size=2)[0].numpy().tolist() == [ended] * 5
    # Without <end> no step is padded: the padding above comes from <end>, not from the loop's length.
    never_ends = CaptionGenerator(forced_decoder(token=4), start_id=2, end_id=3, max_length=8).greedy(grid)[0]
    assert never_ends.numpy().tolist() == [[4] * 7] * 5


def test_train_on_batch_and_sample_weights_are_accepted():
    model = build_decoder(ModelConfig(embedding_dim=4, units=8), vocab_size=6, grid_shape=(4, 3), max_length=5)
    model.compile(optimizer="adam")
    tokens = np.array([[2, 4, 5, 3, 0]] * 4, "int32")
    logs = model.train_on_batch((np.ones((4, 4, 3), "float32"), tokens[:, :-1]), tokens[:, 1:], return_dict=True)
    assert np.isfinite(logs["loss"])
