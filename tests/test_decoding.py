"""Greedy and beam decoding on tiny random decoders of every family: equivalences, optimality, shapes, XLA, n-gram and mention blocking."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_tf.config import ModelConfig
from caption_tf.models.decoder import build_decoder
from caption_tf.models.decoding import CaptionGenerator, gnmt_length_penalty, repeated_mention_ban, repeated_ngram_ban
from conftest import repeated_mentions

VOCAB, CELLS, DIM, MAX_LENGTH, BATCH = 12, 9, 10, 10, 6
START, END = 2, 3
FAMILIES = [("lstm", "bahdanau"), ("gru", "luong"), ("transformer", "bahdanau")]
FAMILY_IDS = ["lstm-bahdanau", "gru-luong", "transformer"]


def tiny_generator(decoder="lstm", attention="bahdanau", jit_compile=False, seed=1, no_repeat_ngram=0, sharpen=6.0, mention_words=None,
                   **overrides):
    keras.utils.set_random_seed(seed)
    # One Transformer layer: what decoding does is the same for any depth, and each layer adds to
    # the unrolled loops' tracing (and XLA's compile time), the bulk of this file's time.
    cfg = ModelConfig(decoder=decoder, attention=attention, embedding_dim=8, units=16, num_heads=2, num_layers=1, **overrides)
    model = build_decoder(cfg, vocab_size=VOCAB, grid_shape=(CELLS, DIM), max_length=MAX_LENGTH)
    kernel = model.to_logits.kernel
    kernel.assign(kernel * sharpen)  # peakier word distributions, so beams really diverge
    return CaptionGenerator(model, START, END, MAX_LENGTH, jit_compile=jit_compile, no_repeat_ngram=no_repeat_ngram,
                            mention_words=mention_words)


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
    plain = tiny_generator(decoder, attention, seed=5, no_repeat_ngram=3, mention_words=((4, 5), (4,)))
    compiled = tiny_generator(decoder, attention, seed=5, jit_compile=True, no_repeat_ngram=3, mention_words=((4, 5), (4,)))
    np.testing.assert_array_equal(compiled.greedy(grid)[0], plain.greedy(grid)[0])
    np.testing.assert_allclose(compiled.greedy(grid)[1], plain.greedy(grid)[1], atol=1e-5)
    np.testing.assert_array_equal(compiled.beam(grid, 3, 0.7)[0], plain.beam(grid, 3, 0.7)[0])


def test_transformer_readout_attention_decodes_the_same_in_greedy_beam_and_xla(grid):
    # The readout attention's keys ride in the decoding loops' key tensor as one more layer:
    # beam K=1 = greedy, XLA = graph, and its map (not the last layer's) is the one returned.
    options = dict(seed=5, no_repeat_ngram=3, readout_attention=True, registers=2)
    plain, compiled = tiny_generator("transformer", **options), tiny_generator("transformer", jit_compile=True, **options)
    tokens, attention = plain.greedy(grid)
    np.testing.assert_array_equal(plain.beam(grid, beam_size=1, length_penalty=0.7)[0], tokens)
    np.testing.assert_array_equal(compiled.greedy(grid)[0], tokens)
    np.testing.assert_allclose(compiled.greedy(grid)[1], attention, atol=1e-5)
    np.testing.assert_array_equal(compiled.beam(grid, 3, 0.7)[0], plain.beam(grid, 3, 0.7)[0])
    tokens, attention = tokens.numpy(), attention.numpy()
    _, weights = plain.model((grid, with_start(tokens)), return_attention=True)
    last_layer = plain.model.cross_attention_by_head(grid, with_start(tokens))[:, -1].numpy().sum(1)
    last_layer /= last_layer.sum(-1, keepdims=True)
    for row in range(BATCH):  # fed the generated caption, teacher forcing gives decoding's map at each step
        steps = int(np.argmax(tokens[row] == END)) + 1 if (tokens[row] == END).any() else tokens.shape[1]
        np.testing.assert_allclose(weights[row, :steps], attention[row, :steps], atol=1e-5)
    assert np.abs(last_layer[:, :-1] - weights[:, :-1]).max() > 1e-3  # the readout's map, not the last layer's


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


def mention_repeats(row, function_ids, determiner_ids):
    return len(repeated_mentions([int(w) for w in row if w not in (0, END)], function_ids, determiner_ids))


def test_repeated_mention_ban_marks_exactly_the_words_that_complete_a_mention():
    words = {w: i for i, w in enumerate("_ unk start end a small purple square above triangle blue is the left of to".split())}
    function_ids, determiner_ids = tf.constant([words[w] for w in ("a", "the", "above", "is", "of", "to")]), tf.constant([words["a"], words["the"]])

    def banned(caption):
        ids = [words[w] for w in caption.split()]
        history = tf.constant([ids + [0] * (12 - len(ids))])
        ban = repeated_mention_ban(history, len(ids), function_ids, determiner_ids, len(words)).numpy()[0]
        return [w for w, i in words.items() if ban[i] < 0]

    assert banned("a small purple square above a small purple") == ["square"]
    assert banned("a small purple square above a small") == []  # "a small purple triangle" stays possible
    assert banned("a blue triangle is to the left of a blue") == ["triangle"]
    assert banned("a blue triangle is to the left of the blue") == ["triangle"]  # "a" and "the" open the same mention
    assert banned("a blue triangle is to the left of a") == []  # one-word mentions ("the left") may recur
    assert banned("a small purple square above a") == []
    assert banned("a small purple square") == []  # nothing to repeat yet
    # Only the first `length` columns are history: stale words beyond them ban nothing.
    ids = [words[w] for w in "a blue triangle a blue".split()]
    stale = tf.constant([ids + [words["a"], words["blue"], words["square"], words["above"]] + [0] * 3])
    ban = repeated_mention_ban(stale, len(ids), function_ids, determiner_ids, len(words)).numpy()[0]
    assert np.flatnonzero(ban).tolist() == [words["triangle"]]


class ScriptedDecoder:
    """A decoder whose every step prefers the next word of `script` (then `fallback`): its captions
    are known, so a search's constraints can be checked word by word. Its state counts the steps."""

    def __init__(self, script, fallback):
        self.script, self.fallback = tf.constant(script, tf.int32), fallback

    def encode(self, grid):
        return grid, grid, [tf.zeros([tf.shape(grid)[0]], tf.int32)]

    def step(self, token, state, values, keys):
        wanted = tf.gather(self.script, state[0] % self.script.shape[0])
        logits = 5.0 * tf.one_hot(wanted, VOCAB) + 1.0 * tf.one_hot(self.fallback, VOCAB)
        return logits, [state[0] + 1], tf.fill([tf.shape(token)[0], tf.shape(values)[1]], 1.0 / CELLS)


def test_block_repeated_mentions_holds_in_greedy_and_beam(grid):
    determiner, closer, first, second, fallback = 4, 5, 6, 7, 8
    mention_words = ((determiner, closer), (determiner,))
    script = [determiner, first, second, closer]  # "a red circle and a red circle and a ..."
    plain = CaptionGenerator(ScriptedDecoder(script, fallback), START, END, MAX_LENGTH)
    tokens = plain.greedy(grid)[0].numpy()
    np.testing.assert_array_equal(tokens[0], [4, 6, 7, 5, 4, 6, 7, 5, 4])
    assert mention_repeats(tokens[0], *mention_words) == 1
    banned = CaptionGenerator(ScriptedDecoder(script, fallback), START, END, MAX_LENGTH, mention_words=mention_words)
    greedy = banned.greedy(grid)[0].numpy()
    # The second mention may start like the first ("a red ..."), only its completion is replaced.
    np.testing.assert_array_equal(greedy[0, :7], [4, 6, 7, 5, 4, 6, fallback])
    for row in (*greedy, *banned.beam(grid, 3, 0.7)[0].numpy()):
        assert mention_repeats(row, *mention_words) == 0, row
    np.testing.assert_array_equal(banned.beam(grid, 1, 0.7)[0], greedy)  # beam of one is still greedy
    with pytest.raises(ValueError, match="every determiner id must be a function word id"):
        CaptionGenerator(banned.model, START, END, MAX_LENGTH, mention_words=((5,), (4,)))


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


@pytest.mark.parametrize("registers,encoder_registers", [(0, False), (2, False), (2, True)])
def test_transformer_cross_attention_by_head_gives_the_decoding_maps_per_layer_and_head(registers, encoder_registers, grid):
    keras.utils.set_random_seed(3)
    cfg = ModelConfig(decoder="transformer", embedding_dim=8, units=16, num_heads=2, num_layers=2, registers=registers,
                      encoder_registers=encoder_registers, encoder_layers=int(encoder_registers))
    model = build_decoder(cfg, vocab_size=VOCAB, grid_shape=(CELLS, DIM), max_length=MAX_LENGTH)
    if registers:  # random registers far from the cells' keys: the heads put unequal shares on them
        slots = model.grid_encoder.register_tokens if encoder_registers else model.register_slots
        slots.assign(np.random.default_rng(5).normal(0, 3, (registers, 8)).astype("float32"))
    tokens, attention = CaptionGenerator(model, START, END, MAX_LENGTH).greedy(grid)
    tokens, attention = tokens.numpy(), attention.numpy()
    maps = model.cross_attention_by_head(grid, with_start(tokens)).numpy()
    assert maps.shape == (BATCH, 2, 2, MAX_LENGTH, CELLS)  # [B, layers, heads, <start> + steps, cells]
    on_cells = maps.sum(-1)  # each head's share on the image: all of it without registers, unequal shares with them
    assert (np.abs(on_cells - 1.0).max() < 1e-5) == (registers == 0) and (on_cells.std() > 0.01) == (registers > 0)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)  # the decoding map: a distribution over the cells
    for row in range(BATCH):
        steps = int(np.argmax(tokens[row] == END)) + 1 if (tokens[row] == END).any() else tokens.shape[1]
        # Fed the generated caption, the last layer's heads give the map decoding returned at each step:
        # their mean without registers; with them, their attention on the cells summed and normalised.
        last = maps[row, -1, :, :steps].sum(0)
        np.testing.assert_allclose(last / last.sum(-1, keepdims=True), attention[row, :steps], atol=1e-5)
    assert not np.allclose(maps[:, -1, 0], maps[:, -1, 1], atol=1e-3)  # two heads, two maps
