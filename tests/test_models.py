"""The decoder families: attention, losses, positions, parallel teacher forcing = the per-step path, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_tf.config import ModelConfig
from caption_tf.models.attention import BahdanauAttention, LuongAttention
from caption_tf.models.decoder import CaptionDecoder, build_decoder, masked_loss
from caption_tf.models.decoding import CaptionGenerator
from caption_tf.models.grid import GridEncoder, sinusoidal_grid_positions
from caption_tf.models.losses import doubly_stochastic_penalty, token_cross_entropy
from caption_tf.models.transformer import TransformerCaptionDecoder

FAMILIES = [("lstm", "bahdanau"), ("gru", "bahdanau"), ("lstm", "luong"), ("gru", "luong"), ("transformer", "bahdanau")]
FAMILY_IDS = ["lstm-bahdanau", "gru-bahdanau", "lstm-luong", "gru-luong", "transformer"]


def tiny_model(decoder="lstm", attention="bahdanau", vocab=20, cells=9, dim=8, length=7, seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    # One Transformer layer unless a test asks for more: each layer adds to the tracing, most of these tests' time.
    overrides = {"num_layers": 1, **overrides}
    cfg = ModelConfig(decoder=decoder, attention=attention, embedding_dim=8, units=16, num_heads=2, **overrides)
    return build_decoder(cfg, vocab_size=vocab, grid_shape=(cells, dim), max_length=length)


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


def test_luong_attends_for_all_steps_like_step_by_step():
    attention = LuongAttention(8, "general")
    values = keras.random.normal((2, 9, 6), seed=1)
    queries = keras.random.normal((2, 5, 8), seed=2)
    attention.build((None, 8), values.shape)
    keys = attention.project_keys(values)
    context, weights = attention.attend_all(queries, values, keys)
    for t in range(5):
        step_context, step_weights = attention(queries[:, t], values, keys)
        np.testing.assert_allclose(context[:, t], step_context, atol=1e-6)
        np.testing.assert_allclose(weights[:, t], step_weights, atol=1e-6)


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


def test_cross_entropy_matches_keras_with_and_without_label_smoothing():
    logits = keras.random.normal((3, 4, 7), seed=3)
    targets = tf.random.stateless_uniform((3, 4), (1, 2), 0, 7, tf.int32)
    plain = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
    np.testing.assert_allclose(token_cross_entropy(targets, logits), plain, atol=1e-5)
    smoothed = keras.losses.categorical_crossentropy(tf.one_hot(targets, 7), logits, from_logits=True, label_smoothing=0.1)
    np.testing.assert_allclose(token_cross_entropy(targets, logits, 0.1), smoothed, atol=1e-5)


def test_grid_positions_are_row_plus_column_codes():
    encoder = GridEncoder(8, positions="learned")
    encoder.build((None, 9, 4))
    table = encoder.positions.positions().numpy().reshape(3, 3, 8)
    # A learned row vector plus a learned column vector: cells of one row differ by column only.
    np.testing.assert_allclose(table[0, 1] - table[0, 0], table[2, 1] - table[2, 0], atol=1e-6)
    assert not np.allclose(table[0, 0], table[1, 0])
    sinusoidal = sinusoidal_grid_positions(3, 3, 8)
    assert len({tuple(np.round(row, 5)) for row in sinusoidal}) == 9  # every cell has its own code
    with pytest.raises(ValueError, match="square"):
        GridEncoder(8)(np.zeros((1, 10, 4), "float32"))
    with pytest.raises(ValueError, match="width 6 and 4 heads"):
        GridEncoder(6, encoder_layers=1, num_heads=4)(np.zeros((1, 9, 4), "float32"))
    with pytest.raises(ValueError, match="encoder_layers must be >= 0, got -1"):
        GridEncoder(8, encoder_layers=-1)


OUTPUTS = {"untied": {}, "tied": {"tie_embeddings": True}, "deep": {"deep_output": True},
           "readout": {"readout_attention": True, "registers": 2}}


@pytest.mark.parametrize(
    "decoder,attention,output",
    [pytest.param(*family, output, id=f"{name}-{output}") for family, name in zip(FAMILIES, FAMILY_IDS) for output in ("untied", "tied")]
    + [pytest.param(decoder, "bahdanau", "deep", id=f"{decoder}-bahdanau-deep") for decoder in ("lstm", "gru")]
    + [pytest.param("transformer", "bahdanau", "readout", id="transformer-readout-registers")],
)
def test_teacher_forcing_equals_the_per_step_loop(decoder, attention, output):
    """The training pass (parallel where the maths allows) computes what decoding computes step by step."""
    model = tiny_model(decoder, attention, grid_adapter="conv", encoder_layers=1, **OUTPUTS[output])
    assert any("/deep_output/" in v.path for v in model.trainable_variables) == (output == "deep")
    assert any("/readout_attention/" in v.path for v in model.trainable_variables) == (output == "readout")
    rng = np.random.default_rng(0)
    grid = tf.constant(rng.normal(size=(3, 9, 8)).astype("float32"))
    tokens = tf.constant(rng.integers(1, 20, (3, 6)).astype("int32"))

    def per_step():
        values, keys, state = model.encode(grid)
        logits, weights = [], []
        for t in range(tokens.shape[1]):
            step_logits, state, step_weights = model.step(tokens[:, t], state, values, keys)
            logits.append(step_logits)
            weights.append(step_weights)
        return tf.stack(logits, 1), tf.stack(weights, 1)

    results = []
    for forward in (lambda: model((grid, tokens), return_attention=True), per_step):
        with tf.GradientTape() as tape:
            logits, weights = forward()
            loss = masked_loss(tokens, logits) + doubly_stochastic_penalty(weights, tokens)
        grads = tape.gradient(loss, model.trainable_variables)
        results.append((logits, weights, grads))
    (logits, weights, grads), (step_logits, step_weights, step_grads) = results
    np.testing.assert_allclose(logits, step_logits, atol=1e-5)
    np.testing.assert_allclose(weights, step_weights, atol=1e-5)
    np.testing.assert_allclose(np.sum(weights, -1), 1.0, atol=1e-5)
    assert len(grads) == len(model.trainable_variables) and all(g is not None for g in grads)
    for g, h in zip(grads, step_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(g), tf.convert_to_tensor(h), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("decoder,attention", [("lstm", "bahdanau"), ("gru", "luong"), ("transformer", "bahdanau")])
def test_decoder_learns_a_feature_dependent_task(decoder, attention):
    """Two 'images' that differ only in one grid cell get different captions after training."""
    rng = np.random.default_rng(0)
    grids = rng.normal(size=(2, 9, 8)).astype("float32")
    tokens = np.array([[2, 4, 5, 3], [2, 4, 6, 3]], "int32")  # <start> a red|blue <end>
    x = np.repeat(grids, 32, 0)
    y = np.repeat(tokens, 32, 0)
    model = tiny_model(decoder, attention, vocab=8, length=6)  # room to decode past the captions (the transformer's positions)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    history = model.fit((x, y[:, :-1]), y[:, 1:], batch_size=16, epochs=15, verbose=0)
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]
    # Decoded past its captions' length: <end> at step 3, padding after it.
    tokens_out, attention_maps = CaptionGenerator(model, start_id=2, end_id=3, max_length=6).greedy(grids)
    assert tokens_out.numpy().tolist() == [[4, 5, 3, 0, 0], [4, 6, 3, 0, 0]]
    np.testing.assert_allclose(attention_maps.numpy().sum(-1), 1.0, atol=1e-5)


def relation_task(count=64, seed=0):
    """3x3 grids holding an 'A' cell and a 'B' cell at the two ends of one row: "A left-of|right-of B".

    Every grid holds the same two cell vectors (plus the same background), only their
    places change: as a set of cells, "A left of B" and "A right of B" are the same image.
    """
    background, a, b = np.random.default_rng(123).normal(size=(3, 8)).astype("float32")
    rng = np.random.default_rng(seed)
    grids, tokens = [], []
    for _ in range(count):
        row, a_left = rng.integers(3), bool(rng.integers(2))
        grid = np.tile(background, (9, 1))
        grid[row * 3], grid[row * 3 + 2] = (a, b) if a_left else (b, a)
        grids.append(grid)
        tokens.append([2, 4, 5 if a_left else 7, 6, 3])  # <start> A left-of|right-of B <end>
    return np.stack(grids), np.array(tokens, "int32")


# 25 epochs: both families state every relation from 20 on (seed 1); 40 cost 20 s more per suite.
RELATION_EPOCHS = 25


@pytest.mark.parametrize("decoder,attention", [("gru", "luong"), ("transformer", "bahdanau")])
def test_grid_positions_let_the_decoder_state_relations(decoder, attention):
    grids, tokens = relation_task()
    swapped = grids[:, ::-1]  # the same cells in another order: a permutation of the grid
    results = {}
    for positions in ("none", "learned"):
        model = tiny_model(decoder, attention, vocab=8, length=5, grid_positions=positions, seed=1)
        if positions == "none":  # without positions the decoder cannot tell a grid from its permutation
            np.testing.assert_allclose(model((grids, tokens[:, :-1])), model((swapped, tokens[:, :-1])), atol=1e-5)
        model.compile(optimizer=keras.optimizers.Adam(0.02))
        model.fit((grids, tokens[:, :-1]), tokens[:, 1:], batch_size=16, epochs=RELATION_EPOCHS, verbose=0)
        test_grids, test_tokens = relation_task(seed=7)
        generated = CaptionGenerator(model, start_id=2, end_id=3, max_length=5).greedy(test_grids)[0].numpy()
        results[positions] = float(np.mean(np.all(generated == test_tokens[:, 1:], axis=1)))
    assert results["learned"] == 1.0, results
    assert results["none"] <= 0.7, results  # chance is 0.5: half the captions name the other order


@pytest.mark.parametrize("decoder,attention", [("lstm", "bahdanau"), ("gru", "luong"), ("transformer", "bahdanau")])
def test_only_real_tokens_reach_the_output_layer_and_the_loss_is_unchanged(decoder, attention):
    """`output_loss` skips padding; loss, accuracy and gradients equal the padded pass's (same dropout masks), XLA included."""
    model = tiny_model(decoder, attention, dropout=0.3, label_smoothing=0.1, tie_embeddings=decoder == "gru", deep_output=decoder == "lstm")
    rng = np.random.default_rng(3)
    grid = tf.constant(rng.normal(size=(4, 9, 8)).astype("float32"))
    tokens = rng.integers(4, 20, (4, 7)).astype("int32")
    tokens[0, 3:], tokens[2, 5:] = 0, 0  # 6 of the 24 targets are padding
    inputs, targets = tf.constant(tokens[:, :-1]), tf.constant(tokens[:, 1:])
    seed_state = model.dropout.seed_generator.state
    start = seed_state.numpy()
    output_rows = []
    original_logits = model.logits
    model.logits = lambda features: output_rows.append(tuple(features.shape[:-1])) or original_logits(features)

    def padded():
        logits = model((grid, inputs), training=True)
        real = tf.cast(targets != 0, "float32")
        hits = tf.cast(tf.argmax(logits, -1, output_type=tf.int32) == targets, "float32")
        return masked_loss(targets, logits, 0.1), tf.reduce_sum(hits * real) / tf.reduce_sum(real)

    def with_gradients(forward):
        with tf.GradientTape() as tape:
            loss, accuracy = forward()
        return loss, accuracy, tape.gradient(loss, model.trainable_variables)

    packed = lambda: model.output_loss(model.teacher_forcing_features(grid, inputs, True)[0], targets, True)  # noqa: E731
    xla = tf.function(lambda: with_gradients(lambda: model.objective(grid, inputs, targets, training=True)[1::2]), jit_compile=True)

    def assert_same(runs):
        results = []
        for run in runs:
            seed_state.assign(start)
            loss, accuracy, grads = run()
            results.append((float(loss), float(accuracy), grads))
        (loss, accuracy, grads), (other_loss, other_accuracy, other_grads) = results
        assert loss == pytest.approx(other_loss, rel=1e-5) and accuracy == pytest.approx(other_accuracy)
        for g, h in zip(grads, other_grads):
            np.testing.assert_allclose(tf.convert_to_tensor(g), tf.convert_to_tensor(h), rtol=1e-6, atol=1e-5)

    assert_same([lambda: with_gradients(packed), lambda: with_gradients(padded)])
    assert output_rows == [(18,), (4, 6)]  # packed: only the 18 real tokens went through the output layer
    model.dropout.rate = 0.0  # XLA draws other random numbers than TensorFlow's kernels for the same seed
    assert_same([lambda: with_gradients(packed), xla])


@pytest.mark.parametrize("decoder,attention", FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_captions_grouped_by_image_train_like_one_grid_per_caption(decoder, attention, recompute):
    """`group_by_image` batches ([images, refs, T], one grid per image) give the loss, penalty and gradients of the same captions each paired with a copy of its grid."""
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(decoder=decoder, attention=attention, embedding_dim=8, units=16, num_heads=2, num_layers=1, attention_penalty=0.1,
                      deep_output=decoder == "gru")  # GRU + Bahdanau with the deep output layer (Luong ignores it)
    model = build_decoder(cfg, vocab_size=20, grid_shape=(9, 8), max_length=7, recompute_grad=recompute)
    rng = np.random.default_rng(5)
    grid = rng.normal(size=(3, 9, 8)).astype("float32")
    tokens = rng.integers(4, 20, (3, 4, 7)).astype("int32")
    tokens[0, 1, 4:] = 0
    tokens[2, 3] = 0  # an unused reference slot: no caption, no loss, not in the penalty's mean
    real = tokens[..., 1:].reshape(12, 6).any(-1)
    pairs_grid = np.repeat(grid, 4, axis=0)[real]
    pairs = tokens.reshape(12, 7)[real]

    def objective(g, inputs, targets):
        with tf.GradientTape() as tape:
            loss, _, penalty, accuracy = model.objective(tf.constant(g), tf.constant(inputs), tf.constant(targets), training=True)
        return [float(loss), float(penalty), float(accuracy)], tape.gradient(loss, model.trainable_variables)

    grouped_values, grouped_grads = objective(grid, tokens[..., :-1], tokens[..., 1:])
    pair_values, pair_grads = objective(pairs_grid, pairs[:, :-1], pairs[:, 1:])
    np.testing.assert_allclose(grouped_values, pair_values, rtol=1e-5)
    for g, h in zip(grouped_grads, pair_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(g), tf.convert_to_tensor(h), rtol=1e-6, atol=1e-5)
    logits = model((tf.constant(grid), tf.constant(tokens[..., :-1])))
    assert tuple(logits.shape) == (12, 6, 20)  # one row of logits per reference slot


def test_attention_penalty_is_added_to_the_loss_as_defined():
    model = tiny_model("gru", "bahdanau", attention_penalty=0.7)
    rng = np.random.default_rng(2)
    grid = rng.normal(size=(4, 9, 8)).astype("float32")
    tokens = rng.integers(4, 20, (4, 6)).astype("int32")
    tokens[:2, 4:] = 0  # padding steps do not count
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    total, ce, penalty, _ = model.objective(grid, inputs, targets)
    logits, weights = model((grid, inputs), return_attention=True)
    real = (targets != 0).astype("float32")
    by_hand = np.mean(np.sum((1.0 - np.einsum("btn,bt->bn", weights, real)) ** 2, -1))
    assert float(penalty) == pytest.approx(by_hand, rel=1e-5) and by_hand > 0.1
    assert float(ce) == pytest.approx(float(masked_loss(targets, logits)), rel=1e-6)
    assert float(total) == pytest.approx(float(ce) + 0.7 * by_hand, rel=1e-6)
    # It really enters the gradient, and fit logs it.
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    logs = model.train_on_batch((grid, inputs), targets, return_dict=True)
    assert logs["attention_penalty"] == pytest.approx(by_hand, rel=1e-4)
    assert set(logs) == {"loss", "accuracy", "attention_penalty"}


def test_attention_penalty_is_zero_when_each_cell_gets_one_unit_of_attention():
    weights = np.eye(3, dtype="float32")[None]  # 3 steps, each on its own cell of 3
    assert float(doubly_stochastic_penalty(weights, np.ones((1, 3), "int32"))) == pytest.approx(0.0)
    # With the last step padding, the third cell gets nothing: (1 - 0)^2 = 1.
    assert float(doubly_stochastic_penalty(weights, np.array([[5, 6, 0]]))) == pytest.approx(1.0)


@pytest.mark.parametrize("decoder,attention", [("gru", "luong"), ("transformer", "bahdanau")])
def test_saved_and_reloaded_model_gives_the_same_captions(decoder, attention, tmp_path):
    cfg = ModelConfig(embedding_dim=8, units=16, num_heads=2, decoder=decoder, attention=attention, tie_embeddings=True,
                      grid_adapter="conv", encoder_layers=1)
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
    assert type(loaded) is type(model)
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


def test_greedy_and_beam_never_generate_start_or_padding():
    # A decoder whose best word at every step is <start> (then padding, then word 4): neither is
    # ever a word of a caption, so every step gives word 4 (train.py and evaluate.py print the same).
    model = forced_decoder(token=2)
    kernel, bias = model.to_logits.get_weights()
    bias[[0, 4]] = 9.0, 8.0
    model.to_logits.set_weights([kernel, bias])
    grid = np.random.default_rng(0).normal(size=(5, 4, 3)).astype("float32")
    generator = CaptionGenerator(model, start_id=2, end_id=3, max_length=8)
    assert generator.greedy(grid)[0].numpy().tolist() == [[4] * 7] * 5
    assert generator.beam(grid, beam_size=2)[0].numpy().tolist() == [[4] * 7] * 5


def test_train_on_batch_and_sample_weights_are_accepted():
    model = build_decoder(ModelConfig(embedding_dim=4, units=8), vocab_size=6, grid_shape=(4, 3), max_length=5)
    model.compile(optimizer="adam")
    tokens = np.array([[2, 4, 5, 3, 0]] * 4, "int32")
    logs = model.train_on_batch((np.ones((4, 4, 3), "float32"), tokens[:, :-1]), tokens[:, 1:], return_dict=True)
    assert np.isfinite(logs["loss"])


@pytest.mark.parametrize("attention,score,feature_units,width", [
    ("bahdanau", "general", None, 8), ("luong", "general", None, 8), ("luong", "dot", None, 16), ("bahdanau", "general", 12, 12)])
def test_grid_width_defaults_to_the_embedding_width(attention, score, feature_units, width):
    # The classic tutorial's encoder width (Dense(embedding_dim)); Luong "dot" compares cells with the cell output.
    cfg = ModelConfig(attention=attention, luong_score=score, embedding_dim=8, units=16, feature_units=feature_units)
    assert cfg.grid_width == width
    built = build_decoder(cfg, vocab_size=6, grid_shape=(4, 3), max_length=5)
    direct = CaptionDecoder(vocab_size=6, embedding_dim=8, units=16, attention=attention, luong_score=score, feature_units=feature_units)
    assert built.feature_units == direct.feature_units == width
    assert tuple(built.grid_encoder.project.kernel.shape) == (3, width)


def test_encoder_registers_are_encoded_with_each_image():
    # Registers through the grid encoder layers (Darcet et al.) carry what each image holds; appended
    # after the encoder they are the same constants for every image.
    grids = np.random.default_rng(0).random((2, 16, 8)).astype("float32")
    for encoder_registers in (True, False):
        cfg = ModelConfig(decoder="transformer", embedding_dim=8, units=16, num_heads=2, encoder_layers=1, registers=3,
                          encoder_registers=encoder_registers)
        memory = np.asarray(build_decoder(cfg, vocab_size=6, grid_shape=(16, 8), max_length=5).memory(grids))
        assert memory.shape == (2, 16 + 3, 8)
        assert np.allclose(memory[0, 16:], memory[1, 16:]) != encoder_registers


def test_bad_settings_say_what_was_received():
    with pytest.raises(ValueError, match="transformer"):
        CaptionDecoder(vocab_size=10, decoder="transformer")
    with pytest.raises(ValueError, match="divisible by num_heads 3"):
        TransformerCaptionDecoder(vocab_size=10, max_length=5, embedding_dim=8, num_heads=3)
    with pytest.raises(ValueError, match="feature_units == units"):
        CaptionDecoder(vocab_size=10, units=16, feature_units=8, attention="luong", luong_score="dot")
    model = tiny_model("transformer", length=5)
    with pytest.raises(ValueError, match="exceed max_length 5"):
        model((np.zeros((1, 9, 8), "float32"), np.zeros((1, 6), "int32")))


@pytest.mark.parametrize("decoder,attention", [("lstm", "bahdanau"), ("gru", "luong"), ("transformer", "bahdanau")])
def test_every_weight_is_in_a_tf_train_checkpoint(decoder, attention, tmp_path):
    """Crash recovery saves `tf.train.Checkpoint(model=...)`: every weight must be tracked by it."""
    grid = {"grid_adapter": "conv", "encoder_layers": 2}
    # deep_output applies to Bahdanau only; the others ignore it.
    trained = tiny_model(decoder, attention, seed=1, tie_embeddings=True, deep_output=True, num_layers=2, **grid)
    fresh = tiny_model(decoder, attention, seed=2, tie_embeddings=True, deep_output=True, num_layers=2, **grid)
    assert any("/encoder_1/self_attention/" in v.path for v in trained.trainable_variables)
    assert any("/deep_output/" in v.path for v in trained.trainable_variables) == (attention == "bahdanau" and decoder != "transformer")
    for variable in trained.trainable_variables:
        variable.assign(variable + 0.5)
    tf.train.Checkpoint(model=fresh).read(tf.train.Checkpoint(model=trained).write(str(tmp_path / "ckpt")))
    for a, b in zip(trained.trainable_variables, fresh.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_transformer_and_tied_output_train_under_mixed_precision(precision):
    keras.mixed_precision.set_global_policy(precision)
    try:
        rng = np.random.default_rng(0)
        grid = rng.random((32, 4, 8), dtype=np.float32)
        tokens = rng.integers(4, 16, (32, 8)).astype("int32")
        tokens[:, 0], tokens[:, 1] = 2, 4 + np.argmax(grid.mean(1), -1)  # the first word names the strongest channel
        model = tiny_model("transformer", vocab=16, cells=4, length=8, tie_embeddings=True, attention_penalty=0.5, encoder_layers=1)
        model.compile(optimizer=keras.optimizers.Adam(0.01))
        history = model.fit((grid, tokens[:, :-1]), tokens[:, 1:], epochs=5, batch_size=8, verbose=0).history["loss"]
        assert np.all(np.isfinite(history)) and history[-1] < history[0]
        logits, attention = model((grid, tokens[:, :-1]), return_attention=True)
        assert model.compute_dtype == precision.split("_")[1]
        assert logits.dtype == "float32" and attention.dtype == "float32"  # softmaxes stay float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
