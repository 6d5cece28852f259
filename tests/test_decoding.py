"""Greedy and beam decoding on tiny random decoders of every family: equivalences, optimality, shapes, XLA, n-gram blocking."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_tf.config import ModelConfig
from caption_tf.models.decoder import build_decoder
from caption_tf.models.decoding import CaptionGenerator, gnmt_length_penalty, repeated_ngram_ban

VOCAB, CELLS, DIM, MAX_LENGTH, BATCH = 12, 9, 10, 10, 6
START, END = 2, 3
FAMILIES = [("lstm", "bahdanau"), ("gru", "luong"), ("transformer", "bahdanau")]
FAMILY_IDS = ["lstm-bahdanau", "gru-luong", "transformer"]


def tiny_generator(decoder="lstm", attention="bahdanau", jit_compile=False, seed=1, no_repeat_ngram=0, sharpen=6.0):
    keras.utils.set_random_seed(seed)
    # One Transformer layer: what decoding does is the same for any depth, and each layer adds to
    # the unrolled loops' tracing (and XLA's compile time), the bulk of this file's time.
    cfg = ModelConfig(decoder=decoder, attention=attention, embedding_dim=8, units=16, num_heads=2, num_layers=1)
    model = build_decoder(cfg, vocab_size=VOCAB, grid_shape=(CELLS, DIM), max_length=MAX_LENGTH)
    kernel = model.to_logits.kernel
    kernel.assign(kernel * sharpen)  # peakier word distributions, so beams really diverge
    return CaptionGenerator(model, START, END, MAX_LENGTH, jit_compile=jit_compile, no_repeat_ngram=no_repeat_ngram)


def with_start(tokens):
    return np.concatenate([np.full((len(tokens), 1), START, "int32"), np.asarray(tokens)], 1)


@pytest.fixture(scope="module")
def grid():
    return np.random.default_rng(0).random((BATCH, CELLS, DIM), dtype=np.float32)


@pytest.mark.parametrize("no_repeat_ngram", [0, 2])
@pytest.mark.parametrize("decoder,attention", FAMILIES, ids=FAMILY_IDS)
def test_beam_of_one_is_greedy(decoder, attention, no_repeat_ngram, grid):
    generator = tiny_generator(decoder, attention, no_repeat_ngram=no_repeat_ngram)
    greedy_tokens, greedy_attention = generator.greedy(grid)
    beam_tokens, _, beam_attention = generator.beam(grid, beam_size=1, length_penalty=0.7)
    np.testing.assert_array_equal(beam_tokens, greedy_tokens)
    np.testing.assert_allclose(beam_attention, greedy_attention, atol=1e-6)


def test_beam_shapes_and_finished_captions_pad(grid):
    tokens, scores, attention = tiny_generator().beam(grid, beam_size=3, length_penalty=0.7)
    assert tokens.shape == (BATCH, MAX_LENGTH - 1) and tokens.dtype == "int32"
    assert scores.shape == (BATCH,) and attention.shape == (BATCH, MAX_LENGTH - 1, CELLS)
    np.testing.assert_allclose(np.sum(attention, -1), 1.0, atol=1e-5)
    for row in tokens.numpy():
        ends = np.flatnonzero(row == END)
        if len(ends):  # everything after the first <end> is padding, and padding only there
            assert not row[ends[0] + 1 :].any()
            assert row[: ends[0]].all()
        else:
            assert row.all()


@pytest.mark.parametrize("decoder,attention", FAMILIES, ids=FAMILY_IDS)
def test_a_grid_of_one_cell_decodes(decoder, attention):
    """One cell (a pooled feature vector, or a fine-tuned backbone's 1x1 grid) is a grid too."""
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(decoder=decoder, attention=attention, embedding_dim=8, units=16, num_heads=2, num_layers=1)
    model = build_decoder(cfg, vocab_size=VOCAB, grid_shape=(1, DIM), max_length=MAX_LENGTH)
    generator = CaptionGenerator(model, START, END, MAX_LENGTH, no_repeat_ngram=2)
    one_cell = np.random.default_rng(0).random((BATCH, 1, DIM), dtype=np.float32)
    greedy_tokens, greedy_attention = generator.greedy(one_cell)
    beam_tokens, _, beam_attention = generator.beam(one_cell, beam_size=1)
    np.testing.assert_array_equal(beam_tokens, greedy_tokens)
    assert greedy_attention.shape == beam_attention.shape == (BATCH, MAX_LENGTH - 1, 1)
    assert generator.beam(one_cell, beam_size=3)[0].shape == (BATCH, MAX_LENGTH - 1)


@pytest.mark.parametrize("beam_size", [3, 5])
@pytest.mark.parametrize("decoder,attention", FAMILIES, ids=FAMILY_IDS)
def test_beam_scores_are_log_probs_and_beat_greedy(decoder, attention, beam_size, grid):
    generator = tiny_generator(decoder, attention, seed=3)
    greedy_tokens, _ = generator.greedy(grid)
    tokens, scores, _ = generator.beam(grid, beam_size=beam_size, length_penalty=0.0)
    beam_ll, _ = generator.log_likelihood(grid, with_start(tokens))
    greedy_ll, _ = generator.log_likelihood(grid, with_start(greedy_tokens))
    # With no length penalty the score is the caption's log-probability under teacher forcing.
    np.testing.assert_allclose(scores, beam_ll, rtol=1e-4, atol=1e-4)
    assert np.all(beam_ll.numpy() >= greedy_ll.numpy() - 1e-4)


def test_length_penalty_normalises_the_score(grid):
    generator = tiny_generator(seed=3)
    alpha = 0.7
    tokens, scores, _ = generator.beam(grid, beam_size=3, length_penalty=alpha)
    total, count = generator.log_likelihood(grid, with_start(tokens))
    np.testing.assert_allclose(scores, total / gnmt_length_penalty(count, alpha), rtol=1e-4, atol=1e-4)
    assert float(gnmt_length_penalty(np.float32(1.0), alpha)) == pytest.approx(1.0)


def test_log_likelihood_counts_real_tokens_only(grid):
    generator = tiny_generator()
    captions = with_start([[5, 6, END, 0, 0, 0, 0, 0, 0]] * BATCH)
    total, count = generator.log_likelihood(grid, captions)
    np.testing.assert_array_equal(count, 3.0)
    logits = generator.model((grid, captions[:, :-1]))
    log_probs = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    expected = sum(log_probs[:, t, captions[0, t + 1]] for t in range(3))
    np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decoder,attention", FAMILIES, ids=FAMILY_IDS)
def test_xla_decoding_matches_graph_decoding(decoder, attention, grid):
    plain = tiny_generator(decoder, attention, seed=5, no_repeat_ngram=3)
    compiled = tiny_generator(decoder, attention, seed=5, jit_compile=True, no_repeat_ngram=3)
    np.testing.assert_array_equal(compiled.greedy(grid)[0], plain.greedy(grid)[0])
    np.testing.assert_allclose(compiled.greedy(grid)[1], plain.greedy(grid)[1], atol=1e-5)
    np.testing.assert_array_equal(compiled.beam(grid, 3, 0.7)[0], plain.beam(grid, 3, 0.7)[0])


def ngram_repeats(row, n):
    words = [int(w) for w in row if w not in (0, END)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams))


@pytest.mark.parametrize("decoder,attention", FAMILIES, ids=FAMILY_IDS)
def test_no_repeat_ngram_blocks_repeated_phrases_in_greedy_and_beam(decoder, attention, grid):
    # A decoder that babbles: the end token is never likely, so captions run to full length and repeat.
    def babbler(no_repeat_ngram):
        generator = tiny_generator(decoder, attention, seed=2, no_repeat_ngram=no_repeat_ngram, sharpen=2.0)
        bias = generator.model.to_logits.bias
        bias.assign(bias - 50.0 * tf.one_hot(END, VOCAB))
        return generator

    plain, blocked = babbler(0), babbler(2)
    plain_tokens = plain.greedy(grid)[0].numpy()
    assert sum(ngram_repeats(row, 2) for row in plain_tokens) > 0  # without blocking it does repeat
    for tokens in (blocked.greedy(grid)[0], blocked.beam(grid, 3, 0.7)[0]):
        assert all(ngram_repeats(row, 2) == 0 for row in tokens.numpy()), tokens.numpy()
    # Blocking only removes repeats: up to the first blocked word the captions are the same.
    blocked_tokens = blocked.greedy(grid)[0].numpy()
    for row, blocked_row in zip(plain_tokens, blocked_tokens):
        first = next((t for t in range(1, len(row)) if ngram_repeats(row[: t + 1], 2)), len(row))
        np.testing.assert_array_equal(row[:first], blocked_row[:first])


def test_repeated_ngram_ban_marks_exactly_the_repeating_words():
    history = tf.constant([[5, 6, 5, 0], [5, 7, 5, 0]])  # 3 words so far, room for a 4th
    ban = repeated_ngram_ban(history, 3, 2, 9).numpy()
    assert np.flatnonzero(ban[0]).tolist() == [6]  # "5 6 5": 6 would repeat "5 6"
    assert np.flatnonzero(ban[1]).tolist() == [7]  # "5 7 5": 7 would repeat "5 7"
    assert not repeated_ngram_ban(history, 3, 4, 9).numpy().any()  # no complete 4-gram yet
    assert np.flatnonzero(repeated_ngram_ban(history, 3, 1, 9).numpy()[0]).tolist() == [5, 6]
    assert not repeated_ngram_ban(history, 2, 2, 9).numpy().any()  # "5 6": the first 2-gram, nothing repeats yet
    # Only the first `length` columns are history: a stale word beyond them bans nothing.
    assert np.flatnonzero(repeated_ngram_ban(tf.constant([[5, 6, 5, 8]]), 3, 2, 9).numpy()[0]).tolist() == [6]


def test_beam_size_must_be_positive(grid):
    with pytest.raises(ValueError, match="beam_size"):
        tiny_generator().beam(grid, beam_size=0)


def test_one_trace_serves_every_batch_size(grid):
    """Validation splits end in a smaller batch and callers decode different numbers of images:
    each re-trace of the unrolled loop cost 1-8 s per training run before the batch was left open."""
    generator = tiny_generator()
    sizes = [BATCH, 4, 1]
    greedy = [generator.greedy(grid[:n])[0].numpy() for n in sizes]
    beams = [generator.beam(grid[:n], 2, 0.7)[0].numpy() for n in sizes]
    assert generator._greedy.experimental_get_tracing_count() == 1
    assert generator._beams[(2, 0.7)].experimental_get_tracing_count() == 1
    for n, tokens, beam in zip(sizes, greedy, beams):  # a row's caption does not depend on the batch around it
        np.testing.assert_array_equal(tokens, greedy[0][:n])
        np.testing.assert_array_equal(beam, beams[0][:n])


@pytest.mark.parametrize("decoder,attention", FAMILIES, ids=FAMILY_IDS)
def test_the_decoding_loops_trace_the_step_once_whatever_the_length(decoder, attention):
    """The loops are `tf.while_loop`s: a longer caption adds no copy of the decoder step to the
    graph (an unrolled loop added one per word: seconds of tracing per process for a Transformer)."""

    def graph_ops(max_length):
        generator = tiny_generator(decoder, attention, no_repeat_ngram=2)
        generator.steps = max_length - 1
        spec = tf.TensorSpec([None, CELLS, DIM], tf.float32)
        greedy = tf.function(generator._greedy_impl, autograph=False).get_concrete_function(spec)
        beam = tf.function(lambda grid: generator._beam_impl(grid, 3, 0.7), autograph=False).get_concrete_function(spec)
        return len(greedy.graph.get_operations()), len(beam.graph.get_operations())

    (greedy_short, beam_short), (greedy_long, beam_long) = graph_ops(4), graph_ops(MAX_LENGTH)
    assert greedy_long == greedy_short
    # Beam search walks the parents back after its loop: a few slices and gathers per step
    # (24 ops), where a copy of the step is hundreds.
    assert beam_long - beam_short <= 30 * (MAX_LENGTH - 4), (beam_short, beam_long)
