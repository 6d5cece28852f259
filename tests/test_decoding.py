"""Greedy and beam decoding on tiny random decoders: equivalences, optimality, shapes, XLA."""

import keras
import numpy as np
import pytest

from caption_tf.models.decoder import CaptionDecoder
from caption_tf.models.decoding import CaptionGenerator, gnmt_length_penalty

VOCAB, CELLS, DIM, MAX_LENGTH, BATCH = 12, 5, 10, 10, 6
START, END = 2, 3


def tiny_generator(decoder="lstm", attention="bahdanau", jit_compile=False, seed=1):
    keras.utils.set_random_seed(seed)
    model = CaptionDecoder(vocab_size=VOCAB, embedding_dim=8, units=16, decoder=decoder, attention=attention)
    model((np.zeros((1, CELLS, DIM), "float32"), np.zeros((1, MAX_LENGTH - 1), "int32")))
    kernel = model.to_logits.kernel
    kernel.assign(kernel * 6.0)  # peakier word distributions, so beams really diverge
    return CaptionGenerator(model, start_id=START, end_id=END, max_length=MAX_LENGTH, jit_compile=jit_compile)


def with_start(tokens):
    return np.concatenate([np.full((len(tokens), 1), START, "int32"), np.asarray(tokens)], 1)


@pytest.fixture(scope="module")
def grid():
    return np.random.default_rng(0).random((BATCH, CELLS, DIM), dtype=np.float32)


@pytest.mark.parametrize("decoder,attention", [("lstm", "bahdanau"), ("gru", "luong")])
def test_beam_of_one_is_greedy(decoder, attention, grid):
    generator = tiny_generator(decoder, attention)
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


@pytest.mark.parametrize("beam_size", [3, 5])
def test_beam_scores_are_log_probs_and_beat_greedy(beam_size, grid):
    generator = tiny_generator(seed=3)
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


def test_xla_decoding_matches_graph_decoding(grid):
    plain, compiled = tiny_generator(seed=5), tiny_generator(seed=5, jit_compile=True)
    np.testing.assert_array_equal(compiled.greedy(grid)[0], plain.greedy(grid)[0])
    np.testing.assert_array_equal(compiled.beam(grid, 3, 0.7)[0], plain.beam(grid, 3, 0.7)[0])


def test_beam_size_must_be_positive(grid):
    with pytest.raises(ValueError, match="beam_size"):
        tiny_generator().beam(grid, beam_size=0)
