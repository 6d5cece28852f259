"""Image-text retrieval with the captioner as the scorer.

Every (image, caption) pair of a split is scored by the model's
length-normalised log-likelihood of the caption given the image (teacher
forcing; `CaptionGenerator.log_likelihood` total / token count, `<end>`
included). From that score matrix [images, captions]:

- image -> text Recall@K: the fraction of images with at least one of their own
  captions among the K best-scoring captions;
- text -> image Recall@K: the fraction of captions whose image is among the K
  best-scoring images;

each beside the random-chance baseline (the expected recall of a random
ranking). Ties count against the model: a positive ranks behind every
negative with an equal score, so a constant scorer gets no credit.

Cost: images x captions teacher-forced decodes (the test split of 600 shapes
scenes is 60 x 300 = 18,000 pairs); `max_images` caps it.

Example:

>>> result = evaluate_retrieval("runs/minimal-shapes-inception_v3-lstm-bahdanau")
>>> result["image_to_text"]["R@1"], result["chance"]["image_to_text"]["R@1"]
(0.52, 0.083)
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from caption_tf.features.cache import FeatureCache

DEFAULT_KS = (1, 5, 10)
# Floats one scoring call may hold per tensor (logits: pairs x length x vocab; grids: pairs x cells x dim).
FLOATS_PER_CALL = 2**25
MAX_PAIRS_PER_CALL = 4096


def recall_at_k(scores: np.ndarray, positives: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K of rows (queries) over columns (candidates): {"R@1": ..., "R@5": ...}.

    A row is a hit at K when its best-scoring positive has fewer than K
    negatives scoring at least as high (ties count against it).

    Example:

    >>> scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    >>> positives = np.array([[True, False, False], [True, False, False]])
    >>> recall_at_k(scores, positives, ks=(1, 2, 3))
    {'R@1': 0.5, 'R@2': 0.5, 'R@3': 1.0}
    """
    scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be the same 2-D shape")
    if not positives.any(axis=1).all():
        raise ValueError(f"rows {np.flatnonzero(~positives.any(axis=1))[:5].tolist()} have no positive candidate")
    best_positive = np.where(positives, scores, -np.inf).max(axis=1, keepdims=True)
    rank = np.sum(~positives & (scores >= best_positive), axis=1)  # negatives ahead of the best positive
    return {f"R@{k}": float(np.mean(rank < k)) for k in ks}


def chance_recall_at_k(positives: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Expected Recall@K of a uniformly random ranking: mean over rows of 1 - C(n-p, k) / C(n, k).

    Example:

    >>> chance_recall_at_k(np.eye(4, dtype=bool), ks=(1, 2))
    {'R@1': 0.25, 'R@2': 0.5}
    """
    positives = np.asarray(positives, bool)
    n, per_row = positives.shape[1], positives.sum(axis=1)
    result = {}
    for k in ks:
        k_eff = min(k, n)
        misses = [math.comb(n - int(p), k_eff) / math.comb(n, k_eff) for p in per_row]
        result[f"R@{k}"] = float(1.0 - np.mean(misses))
    return result


def pair_scores(generator, grids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Length-normalised log-likelihood of every caption given every image: [images, captions].

    Batched as blocks of (image chunk x caption chunk) pairs, sized so that one
    call's logits and repeated grids stay under FLOATS_PER_CALL floats each.
    """
    images, captions = len(grids), len(tokens)
    vocab = int(generator.model.vocab_size)
    per_pair = max(tokens.shape[1] * vocab, int(np.prod(grids.shape[1:])))
    pairs = max(1, min(MAX_PAIRS_PER_CALL, FLOATS_PER_CALL // per_pair))
    caption_chunk = min(captions, pairs)
    image_chunk = max(1, pairs // caption_chunk)
    scores = np.zeros((images, captions), np.float32)
    for c0 in range(0, captions, caption_chunk):
        block = tokens[c0 : c0 + caption_chunk]
        for i0 in range(0, images, image_chunk):
            grid = grids[i0 : i0 + image_chunk]
            total, count = generator.log_likelihood(np.repeat(grid, len(block), axis=0), np.tile(block, (len(grid), 1)))
            mean = total.numpy() / np.maximum(count.numpy(), 1)
            scores[i0 : i0 + len(grid), c0 : c0 + len(block)] = mean.reshape(len(grid), len(block))
    return scores


def retrieval_scores(
    run,
    cache: FeatureCache,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    max_images: Optional[int] = None,
    dataset=None,
) -> dict:
    """Image->text and text->image Recall@K of a trained run on a split of its feature cache.

    `run` is a `caption_tf.run_folder.Run` with its model loaded; `dataset`
    (the run's, loaded when not given) supplies the reference captions.

    Example:

    >>> run = load_run(run_dir); cache = open_run_cache(run)
    >>> retrieval_scores(run, cache, "test")["text_to_image"]["R@5"]
    0.61
    """
    from caption_tf.data.datasets import load_dataset

    dataset = dataset or load_dataset(run.config.data)
    records = dataset.by_id()
    image_ids = cache.image_ids(split)[:max_images] if max_images else cache.image_ids(split)
    if not image_ids:
        raise ValueError(f"Split {split!r} of the feature cache {cache.directory} has no images")
    grids = cache.load_split(split)["grid"][: len(image_ids)]
    captions, owner = [], []
    for index, image_id in enumerate(image_ids):
        captions.extend(records[image_id].captions)
        owner.extend([index] * len(records[image_id].captions))
    tokens = run.vocab.encode(captions)
    started = time.time()
    scores = pair_scores(run.generator(), grids, tokens)
    positives = np.arange(len(image_ids))[:, None] == np.asarray(owner)[None, :]
    return {
        "split": split,
        "images": len(image_ids),
        "captions": len(captions),
        "score": "mean log p(caption token | image, previous tokens), teacher forcing, <end> included",
        "image_to_text": recall_at_k(scores, positives, ks),
        "text_to_image": recall_at_k(scores.T, positives.T, ks),
        "chance": {
            "image_to_text": chance_recall_at_k(positives, ks),
            "text_to_image": chance_recall_at_k(positives.T, ks),
        },
        "seconds": round(time.time() - started, 2),
    }


def evaluate_retrieval(run_dir: str | Path, split: str = "test", ks: Sequence[int] = DEFAULT_KS, max_images: Optional[int] = None) -> dict:
    """`retrieval_scores` for a run folder (loads the run, its dataset and feature cache).

    Example:

    >>> evaluate_retrieval("runs/minimal-shapes-inception_v3-lstm-bahdanau", max_images=100)["image_to_text"]
    {'R@1': 0.41, 'R@5': 0.83, 'R@10': 0.95}
    """
    from caption_tf.data.datasets import load_dataset
    from caption_tf.evaluation.captioning import open_run_cache
    from caption_tf.run_folder import load_run

    run = load_run(run_dir)
    dataset = load_dataset(run.config.data)
    return retrieval_scores(run, open_run_cache(run, dataset), split, ks, max_images, dataset)
