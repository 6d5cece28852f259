"""Caption generation: batched greedy and beam search, compiled as `tf.function`s.

Both loops are `tf.while_loop`s over a fixed maximum length: the decoder step is traced
once, whatever the length (an unrolled loop traced and compiled it once per step: seconds
per call for a Transformer), and every step has the same shapes, as XLA needs. Finished
captions keep emitting padding (id 0), so a whole batch decodes in one call.
Beam search flattens batch x beam into one decoder batch, and each step keeps
the `beam_size` best continuations of every image, gathering the decoder state
of each survivor from its parent beam. Candidates are ranked by GNMT's
length-normalised score, log p / ((5 + length) / 6) ** length_penalty
(Wu et al., 2016); a finished beam keeps its score and only extends with padding.
With `no_repeat_ngram=N` (> 0), a word that would complete an N-gram already in the
caption is not allowed (n-gram blocking, Paulus et al., 2018), in greedy and beam
search alike, so "a red circle and a red circle" cannot be generated with N <= 3.
With `block_repeated_mentions`, a word that would complete a mention already made (the words
after a determiner up to the next function word) is not allowed: "a small purple square
above a small purple triangle" stays possible, "... above a small purple square" does not
(an n-gram ban of 3 forbids both: "a small purple" recurs).

Example:

```python
generator = CaptionGenerator(model, start_id=2, end_id=3, max_length=15)
tokens, attention = generator.greedy(grid)            # [B, 14], [B, 14, cells]
tokens, scores, attention = generator.beam(grid, 3, 0.7)  # [B, 14], [B], [B, 14, cells]
total, count = generator.log_likelihood(grid, captions)  # captions [B, L] start with <start>
```
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from caption_tf.data.text import DETERMINERS, FUNCTION_WORDS

PAD_ID = 0
# Stands in for log(0): finite, so sums and differences of "impossible" scores never give NaN.
NEG_INF = -1e9
GNMT_LENGTH_BASE = 5.0  # lp(len) = ((GNMT_LENGTH_BASE + len) / (GNMT_LENGTH_BASE + 1)) ** alpha


def gnmt_length_penalty(length, alpha):
    """((5 + length) / 6) ** alpha; alpha = 0 ranks by raw log-probability.

    Example:

    >>> float(gnmt_length_penalty(tf.constant(1.0), 0.7))
    1.0
    """
    return tf.pow((GNMT_LENGTH_BASE + length) / (GNMT_LENGTH_BASE + 1.0), alpha)


def _gather_beams(tensor, parents):
    """Rows of `tensor` [B*K, ...] reordered by `parents` [B, K] (beam indices per image)."""
    batch, beams = tf.shape(parents)[0], tf.shape(parents)[1]
    shaped = tf.reshape(tensor, tf.concat([[batch, beams], tf.shape(tensor)[1:]], 0))
    return tf.reshape(tf.gather(shaped, parents, batch_dims=1), tf.shape(tensor))


def repeated_ngram_ban(history, length, n: int, vocab):
    """[N, V] additive scores: NEG_INF on words that would repeat an n-gram of the history, else 0.

    `history` [N, S] int32 holds the words generated so far in its first `length` columns
    (a scalar, possibly a tensor: the step of a compiled loop). A word w is banned when the
    last n-1 words followed by w form an n-gram already in the history.

    Example:

    >>> history = tf.constant([[5, 6, 5, 0]])   # "5 6 5", room for one more word
    >>> ban = repeated_ngram_ban(history, 3, 2, 8)   # after 5, 6 would repeat "5 6"
    >>> int(tf.argmin(ban[0]))
    6
    """
    slots = history.shape[1]
    if n <= 0 or slots < n:
        return tf.zeros([tf.shape(history)[0], vocab])
    starts = slots - n + 1  # n-grams history[:, j : j + n], complete once j + n <= length
    prefix = tf.gather(history, tf.maximum(length - n + 1 + tf.range(n - 1), 0), axis=1)  # the last n-1 words
    windows = tf.stack([history[:, j : j + n - 1] for j in range(starts)], 1)  # [N, starts, n-1]
    match = tf.reduce_all(tf.equal(windows, prefix[:, None, :]), -1) & (tf.range(starts) + n <= length)[None]
    banned = tf.reduce_max(tf.one_hot(history[:, n - 1 :], vocab) * tf.cast(match, tf.float32)[..., None], axis=1)
    return tf.where(banned > 0, NEG_INF, 0.0)


def repeated_mention_ban(history, length, function_ids, determiner_ids, vocab):
    """[N, V] additive scores: NEG_INF on words that would complete a mention already made, else 0.

    A mention is the words after a determiner up to the next function word: in "a small
    purple square above a", "small purple square" (the determiners are function words too).
    A word w is banned when the words written since the last determiner, followed by w,
    spell an earlier mention of two or more words exactly ("a man ... a man" stays allowed).
    `history` and `length` as in `repeated_ngram_ban`; `function_ids`, `determiner_ids`:
    int32 [F], [D] word ids.

    Example:

    >>> history = tf.constant([[4, 5, 6, 9, 4, 5, 0, 0]])   # "a small square above a small"
    >>> ban = repeated_mention_ban(history, 6, tf.constant([4, 9]), tf.constant([4]), 10)
    >>> [int(w) for w in tf.where(ban[0] < 0)[:, 0]]     # "square" would repeat the mention
    [6]
    """
    slots = history.shape[1]
    steps = tf.range(slots)
    written_mask = steps[None] < length
    is_function = tf.reduce_any(tf.equal(history[..., None], function_ids), -1) & written_mask  # [N, S]
    is_determiner = tf.reduce_any(tf.equal(history[..., None], determiner_ids), -1) & written_mask
    # The mention being written: the words after the last determiner, if no function word came since.
    opened = tf.reduce_max(tf.where(is_determiner, steps[None], -1), 1)  # [N], -1: none
    written = length - 1 - opened  # its words so far
    open_mention = (opened >= 0) & tf.equal(opened, tf.reduce_max(tf.where(is_function, steps[None], -1), 1)) & (written >= 1)
    # An earlier mention opened at p ends at the first function word after p (a later determiner at the latest).
    after = (steps[None, :] > steps[:, None])[None] & is_function[:, None, :]  # [N, p, j]
    mention_length = tf.reduce_min(tf.where(after, steps[None, None], slots), -1) - steps[None] - 1  # [N, p]
    earlier = tf.gather(history, tf.minimum(steps[:, None] + 1 + steps[None], slots - 1), axis=1)  # [N, p, k]: word k of p's mention
    current = tf.gather(history, tf.clip_by_value(opened[:, None] + 1 + steps[None], 0, slots - 1), batch_dims=1)  # [N, k]
    same = tf.equal(earlier, current[:, None, :]) | (steps[None, None] >= written[:, None, None])
    match = (tf.reduce_all(same, -1) & is_determiner & (steps[None] < opened[:, None])
             & tf.equal(mention_length, written[:, None] + 1) & open_mention[:, None])  # [N, p]
    last_word = tf.gather(history, tf.minimum(steps[None] + 1 + written[:, None], slots - 1), batch_dims=1)  # [N, p]
    banned = tf.reduce_max(tf.one_hot(last_word, vocab) * tf.cast(match, tf.float32)[..., None], axis=1)
    return tf.where(banned > 0, NEG_INF, 0.0)


def _write(buffer, step, rows):
    """`buffer` [N, S, ...] with `rows` [N, ...] written at column `step` (zero there before: exact)."""
    column = tf.one_hot(step, buffer.shape[1], dtype=buffer.dtype)
    written = buffer + tf.reshape(column, [1, -1] + [1] * (buffer.shape.rank - 2)) * rows[:, None]
    written.set_shape(buffer.shape)  # broadcasting a size-1 axis of `rows` whose size is unknown loses it
    return written


def _any_batch(function, *tensors):
    """`function(*tensors)` from one trace for every batch size (the first dimension left open).

    Traced per call shape (`tf.function`'s `reduce_retracing` relaxes only from the second shape on),
    the decoding loops were traced again for the last, smaller batch of a split and for each other
    caller's batch size (measured: 5 traces in 3 epochs of a training run).
    """
    specs = [tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in tensors]
    return function.get_concrete_function(*specs)(*tensors)


def _without_special_tokens(scores, start_id: int):
    """`scores` [N, V] with padding and <start> made impossible: padding ends a caption only
    after <end>, and <start> is never a word (an untrained model may rank it high; a caption
    holding it would print and score differently in train.py and evaluate.py)."""
    banned = tf.one_hot([PAD_ID, start_id], tf.shape(scores)[-1], on_value=NEG_INF, off_value=0.0)
    return tf.cast(scores, tf.float32) + tf.reduce_sum(banned, 0)


class CaptionGenerator:
    """Compiled decoding functions for one trained `CaptionDecoder`.

    Example:

    ```python
    generator = CaptionGenerator(model, start_id=2, end_id=3, max_length=15, jit_compile=True)
    tokens, attention = generator.greedy(grid)
    ```
    """

    def __init__(self, model, start_id: int, end_id: int, max_length: int, jit_compile: bool = False, no_repeat_ngram: int = 0,
                 mention_words: tuple[Sequence[int], Sequence[int]] | None = None):
        """`mention_words`: (function word ids, determiner ids) to ban repeated mentions; None: off."""
        self.model, self.start_id, self.end_id = model, start_id, end_id
        self.steps = max_length - 1  # <start> is given, not generated
        self.jit_compile = jit_compile
        if no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram must be >= 0 (0: off), got {no_repeat_ngram}")
        self.no_repeat_ngram = no_repeat_ngram
        self.block_repeated_mentions = mention_words is not None
        if mention_words is not None:
            function_ids, determiner_ids = mention_words
            if not set(determiner_ids) <= set(function_ids):
                raise ValueError(f"every determiner id must be a function word id, got {determiner_ids} and {function_ids}")
            # [-1] matches no word: a vocabulary without determiners bans nothing.
            self._mention_ids = tuple(tf.constant(list(ids) or [-1], tf.int32) for ids in mention_words)
        # The loops are explicit `tf.while_loop`s, so autograph has nothing to convert; leaving
        # it on made it re-convert Keras internals (a flaky "tf____init__" error).
        compile_options = {"jit_compile": jit_compile, "autograph": False}  # called through `_any_batch`
        self._greedy = tf.function(self._greedy_impl, **compile_options)
        self._log_likelihood = tf.function(self._log_likelihood_impl, **compile_options)
        self._beams: dict[tuple[int, float], tf.types.experimental.GenericFunction] = {}

    @classmethod
    def for_vocabulary(cls, model, vocab, block_repeated_mentions: bool = False, **options):
        """The generator of `model` trained on `vocab` (a `data.text.CaptionVocabulary`: its <start>/<end> ids and max length).

        `block_repeated_mentions`: ban repeated mentions, with the function words of `data.text`.
        `options`: `jit_compile`, `no_repeat_ngram`.
        """
        if block_repeated_mentions:
            options["mention_words"] = (vocab.ids_of(FUNCTION_WORDS), vocab.ids_of(DETERMINERS))
        return cls(model, vocab.start_id, vocab.end_id, vocab.max_length, **options)

    def greedy(self, grid):
        """(tokens int32 [B, steps], attention float32 [B, steps, cells]); 0 after <end>."""
        return _any_batch(self._greedy, tf.convert_to_tensor(grid))

    def beam(self, grid, beam_size: int = 3, length_penalty: float = 0.7):
        """Best beam per image: (tokens int32 [B, steps], score float32 [B], attention [B, steps, cells]).

        `score` is the length-normalised log-probability of the returned caption
        (its plain log-probability when `length_penalty` is 0). `beam_size=1`
        gives the greedy caption.
        """
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        key = (int(beam_size), float(length_penalty))
        if key not in self._beams:  # one compiled loop per (beam size, penalty)
            self._beams[key] = tf.function(
                lambda grid: self._beam_impl(grid, *key), jit_compile=self.jit_compile, autograph=False
            )
        return _any_batch(self._beams[key], tf.convert_to_tensor(grid))

    def log_likelihood(self, grid, tokens):
        """Teacher-forced log p(caption | image): (sum over tokens [B], token count [B]).

        `tokens` [B, L] are encoded captions starting with <start>, padded with 0;
        every token after <start> up to the padding counts (<end> included).
        The mean log-probability per token is `total / count`.
        """
        return _any_batch(self._log_likelihood, tf.convert_to_tensor(grid), tf.cast(tokens, tf.int32))

    # -- implementations (traced once per input signature) ----------------------------------
    def _greedy_impl(self, grid):
        values, keys, state = self.model.encode(grid)
        batch, cells = tf.shape(grid)[0], values.shape[1]

        def step(t, token, done, state, tokens, attention):
            logits, state, weights = self.model.step(token, state, values, keys)
            scores = self._allowed(_without_special_tokens(logits, self.start_id), tokens, t)
            token = tf.where(done, PAD_ID, tf.argmax(scores, -1, output_type=tf.int32))
            done = done | tf.equal(token, self.end_id)
            return t + 1, token, done, state, _write(tokens, t, token), _write(attention, t, tf.cast(weights, tf.float32))

        start = (0, tf.fill([batch], self.start_id), tf.zeros([batch], tf.bool), state,
                 tf.zeros([batch, self.steps], tf.int32), tf.zeros([batch, self.steps, cells]))
        *_, tokens, attention = tf.while_loop(lambda t, *_: t < self.steps, step, start, maximum_iterations=self.steps)
        return tokens, attention

    def _allowed(self, scores, history, length):
        """`scores` [N, V] with n-gram repeats (`no_repeat_ngram` > 0) and repeated mentions
        (`block_repeated_mentions`) of `history` [N, steps] made impossible."""
        if self.no_repeat_ngram:
            scores = scores + repeated_ngram_ban(history, length, self.no_repeat_ngram, tf.shape(scores)[-1])
        if self.block_repeated_mentions:
            scores = scores + repeated_mention_ban(history, length, *self._mention_ids, tf.shape(scores)[-1])
        return scores

    def _beam_impl(self, grid, beam_size: int, alpha: float):
        batch = tf.shape(grid)[0]
        # Every image's encoding repeated beam_size times: one decoder batch of B*K rows.
        values, keys, state = self.model.encode(grid)
        values, keys = tf.repeat(values, beam_size, axis=0), tf.repeat(keys, beam_size, axis=0)
        state = [tf.repeat(s, beam_size, axis=0) for s in state]
        cells = values.shape[1]

        def step(t, token, state, scores, lengths, finished, generated, words_at, parents_at, attention_at):
            logits, state, step_weights = self.model.step(token, state, values, keys)
            vocab = tf.shape(logits)[-1]
            log_probs = self._allowed(_without_special_tokens(tf.nn.log_softmax(tf.cast(logits, tf.float32)), self.start_id), generated, t)
            log_probs = tf.reshape(log_probs, [batch, beam_size, -1])
            # A finished beam has one continuation, padding, at no cost: it keeps its score.
            pad_only = tf.one_hot(PAD_ID, vocab, on_value=0.0, off_value=NEG_INF)
            log_probs = tf.where(finished[..., None], pad_only, log_probs)
            totals = scores[..., None] + log_probs
            new_lengths = lengths + tf.cast(~finished, tf.float32)
            ranked = totals / gnmt_length_penalty(new_lengths, alpha)[..., None]
            _, flat = tf.math.top_k(tf.reshape(ranked, [batch, -1]), k=beam_size)
            parents, words = flat // vocab, tf.cast(flat % vocab, tf.int32)
            scores = tf.gather(tf.reshape(totals, [batch, -1]), flat, batch_dims=1)
            lengths = tf.gather(new_lengths, parents, batch_dims=1)
            finished = tf.gather(finished, parents, batch_dims=1) | tf.equal(words, self.end_id)
            state = [_gather_beams(s, parents) for s in state]
            token = tf.reshape(words, [-1])
            generated = _write(_gather_beams(generated, parents), t, token)  # each live beam's words so far
            weights = tf.reshape(tf.cast(step_weights, tf.float32), [batch, beam_size, cells])
            return (t + 1, token, state, scores, lengths, finished, generated,
                    _write(words_at, t, words), _write(parents_at, t, parents), _write(attention_at, t, weights))

        # Only beam 0 is alive at the start, so the first step does not pick K copies of one word.
        scores = tf.tile(tf.concat([[0.0], tf.fill([beam_size - 1], NEG_INF)], 0)[None], [batch, 1])
        start = (0, tf.fill([batch * beam_size], self.start_id), state, scores, tf.zeros([batch, beam_size]),
                 tf.zeros([batch, beam_size], tf.bool), tf.zeros([batch * beam_size, self.steps], tf.int32),
                 # per step: the chosen words [B, K], their parent beams [B, K] and attention [B, K, cells]
                 tf.zeros([batch, self.steps, beam_size], tf.int32), tf.zeros([batch, self.steps, beam_size], tf.int32),
                 tf.zeros([batch, self.steps, beam_size, cells]))
        _, _, _, scores, lengths, _, _, words_at, parents_at, attention_at = tf.while_loop(
            lambda t, *_: t < self.steps, step, start, maximum_iterations=self.steps
        )
        # top_k sorts, so beam 0 holds the best normalised score; walk its parents back.
        best = tf.zeros([batch], tf.int32)
        score = scores[:, 0] / gnmt_length_penalty(lengths[:, 0], alpha)
        tokens, attention = [], []
        for t in reversed(range(self.steps)):
            tokens.append(tf.gather(words_at[:, t], best, batch_dims=1))
            attention.append(tf.gather(attention_at[:, t], tf.gather(parents_at[:, t], best, batch_dims=1), batch_dims=1))
            best = tf.gather(parents_at[:, t], best, batch_dims=1)
        return tf.stack(tokens[::-1], 1), score, tf.stack(attention[::-1], 1)

    def _log_likelihood_impl(self, grid, tokens):
        logits = self.model((grid, tokens[:, :-1]), training=False)
        targets = tokens[:, 1:]
        log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32))
        picked = tf.gather(log_probs, targets, batch_dims=2)
        mask = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)
        return tf.reduce_sum(picked * mask, 1), tf.reduce_sum(mask, 1)
