"""Caption text: cleaning, start/end tokens, and a `TextVectorization` vocabulary.

The vocabulary is built from training captions only, most frequent words
first (ties broken alphabetically, so it is identical on every run), capped
by `TextConfig.vocab_size`, and saved with the run as JSON.

Example:

>>> vocab = CaptionVocabulary.build(["A red circle.", "a blue square"], TextConfig(max_length=6))
>>> ids = vocab.encode(["a red square"])
>>> vocab.decode(ids[0])
'a red square'
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from caption_tf.config import TextConfig
from caption_tf.files import write_json

START, END = "<start>", "<end>"
PAD, UNK = "", "[UNK]"  # TextVectorization's reserved tokens at index 0 and 1
_NON_WORD = re.compile(r"[\W_]+")  # a run of anything but letters and digits, in any script
# Words that open a mention ("a", "the": a mention is what follows, up to the next function word)
# and the function words that close one. English, as the datasets' captions are; a word missing
# here only makes a mention longer, so fewer repeats are recognised, never more.
DETERMINERS = ("a", "an", "the")
FUNCTION_WORDS = DETERMINERS + (
    "and", "or", "but", "is", "are", "was", "were", "be", "been", "being", "has", "have", "there", "it",
    "to", "of", "in", "on", "at", "with", "by", "for", "from", "into", "onto", "over", "under", "above",
    "below", "behind", "near", "next", "beside", "between", "through", "while", "as", "up", "down", "out",
)


def clean_caption(text: str) -> str:
    """The caption normaliser: vocabulary, metrics and the LLM column all see captions through it.

    Unicode NFKC (so "café" is one word however it was typed), lowercase, and every
    run of characters that are not letters or digits (punctuation, "_", spaces)
    becomes one space.

    Example:

    >>> clean_caption("  A Dog, running!  ")
    'a dog running'
    >>> clean_caption("Un CAFÉ near_the T-shirt.")
    'un café near the t shirt'
    """
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def wrap_caption(text: str, max_length: int) -> str:
    """Clean, truncate to fit `max_length` tokens with <start>/<end>, and wrap."""
    words = clean_caption(text).split()[: max_length - 2]
    return " ".join([START, *words, END])


# Warn when more than this share of training captions is cut by `max_length` (issue 14).
TRUNCATION_WARN_FRACTION = 0.05
KEEP_WHOLE_PERCENTILE = 95


def truncation_warning(captions: Sequence[str], max_length: int) -> str | None:
    """A warning when more than 5% of `captions` are longer than `max_length` allows, else None.

    `max_length` counts <start> and <end>; the warning names the length that keeps
    95% of the captions whole (their 95th percentile length in words + 2).

    Example:

    >>> truncation_warning(["a dog runs on the green grass"] * 10, max_length=5)
    'warning: 100% of training captions (10 of 10) are longer than --max-length 5 allows (3 words + <start>/<end>) and are cut; --max-length 9 keeps 95% of them whole (or --max-length auto)'
    """
    lengths = np.array([len(clean_caption(c).split()) for c in captions])
    if not len(lengths):
        return None
    cut = int(np.sum(lengths > max_length - 2))
    if cut <= TRUNCATION_WARN_FRACTION * len(lengths):
        return None
    keep = int(np.ceil(np.percentile(lengths, KEEP_WHOLE_PERCENTILE))) + 2
    return (
        f"warning: {cut / len(lengths):.0%} of training captions ({cut:,} of {len(lengths):,}) are longer than "
        f"--max-length {max_length} allows ({max_length - 2} words + <start>/<end>) and are cut; "
        f"--max-length {keep} keeps {KEEP_WHOLE_PERCENTILE}% of them whole (or --max-length auto)"
    )


class CaptionVocabulary:
    """Word <-> id mapping backed by `keras.layers.TextVectorization`."""

    def __init__(self, tokens: Sequence[str], max_length: int):
        import keras  # local import: keeps `caption_tf.data` importable without TF start-up cost

        self.max_length = max_length
        words = [t for t in tokens if t not in (PAD, UNK)]
        self.layer = keras.layers.TextVectorization(
            standardize=None,
            split="whitespace",
            output_mode="int",
            output_sequence_length=max_length,
            vocabulary=words,
        )
        self.tokens = list(self.layer.get_vocabulary())
        self.start_id = self.tokens.index(START)
        self.end_id = self.tokens.index(END)
        self.pad_id = 0

    @classmethod
    def build(cls, captions: Iterable[str], cfg: TextConfig) -> "CaptionVocabulary":
        counts = collections.Counter(w for c in captions for w in clean_caption(c).split())
        ranked = sorted((w for w, n in counts.items() if n >= cfg.min_word_count), key=lambda w: (-counts[w], w))
        budget = max(cfg.vocab_size - 4, 0)  # pad, [UNK], <start>, <end>
        return cls([START, END, *ranked[:budget]], cfg.max_length)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def ids_of(self, words: Iterable[str]) -> list[int]:
        """The ids of those of `words` in the vocabulary, in order.

        >>> vocab = CaptionVocabulary.build(["a red circle"], TextConfig())
        >>> " ".join(vocab.tokens[i] for i in vocab.ids_of(["the", "a", "red"]))
        'a red'
        """
        index = {token: i for i, token in enumerate(self.tokens)}
        return [index[word] for word in words if word in index]

    def encode(self, captions: Sequence[str]) -> np.ndarray:
        """int32 [N, max_length]: <start> words <end>, zero padded."""
        wrapped = [wrap_caption(c, self.max_length) for c in captions]
        if not wrapped:
            return np.zeros((0, self.max_length), np.int32)
        return np.asarray(self.layer(wrapped), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <end>, without <start> and padding."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.tokens[i] if i < len(self.tokens) else UNK)
        return " ".join(words)

    def step_words(self, ids: Iterable[int]) -> list[str]:
        """The generated words of one caption in step order, up to (not including) <end>.

        Unlike `decode`, word t stays aligned with decoding step t (and its attention map).
        """
        words = []
        for i in ids:
            i = int(i)
            if i in (self.end_id, self.pad_id):
                break
            words.append(self.tokens[i] if i < len(self.tokens) else UNK)
        return words

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.tokens).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        write_json(path, {"max_length": self.max_length, "tokens": self.tokens}, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "CaptionVocabulary":
        with open(path) as fh:
            raw = json.load(fh)
        return cls(raw["tokens"], raw["max_length"])
