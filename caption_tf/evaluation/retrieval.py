"""Image-text retrieval with the captioner as the scorer.

Every (image, caption) pair of a pool is scored by the model's
length-normalised log-likelihood of the caption given the image (teacher
forcing: the mean over the caption's tokens, `<end>` included, of
log p(token | image, previous tokens)). From that score matrix
[images, captions]:

- image -> text Recall@K: the fraction of images with at least one of their own
  captions among the K best-scoring captions;
- text -> image Recall@K: the fraction of captions whose image is among the K
  best-scoring images;

each beside the random-chance baseline (the expected recall of a random
ranking). Ties count against the model: a positive ranks behind every
negative with an equal score, so a constant scorer gets no credit.

**Protocol.** The standard one (Flickr8k/30k test: 1,000 images x 5,000
captions) ranks every query against the whole split: `pool_images=None`.
Its cost is images x captions teacher-forced decodes (5 million for
Flickr8k: 45-60 minutes on 2 busy CPU cores), so the default splits the evaluated
images into consecutive pools of about `DEFAULT_POOL_IMAGES` images, each
ranked against its own images' captions, and averages the recall over all
queries (like the "5-fold 1K" protocol of COCO, at a smaller pool); the
report ranks the first `DEFAULT_RETRIEVAL_IMAGES` evaluated images. Recall
depends on the pool size: the result names its protocol, and its chance
baseline is computed on the same pools.

**Scoring** (`PairScorer`): each image is encoded once (`model.encode`);
the captions of a pool are merged into a prefix tree, so a prefix shared by
several captions (`<start> a man ...`) is decoded once per image, and one
compiled function runs the decoder (`model.step`) depth by depth over all
(image, tree node) pairs of an image chunk.

Example:

```python
result = evaluate_retrieval("runs/minimal-shapes-inception_v3-transformer")
result["image_to_text"]["R@1"], result["chance"]["image_to_text"]["R@1"]
```
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from caption_tf.features.cache import FeatureCache

DEFAULT_KS = (1, 5, 10)
# Images per retrieval pool by default; None = all ranked images in one pool (the standard protocol).
DEFAULT_POOL_IMAGES = 50
# Images ranked by default (the first ones evaluated): bounds the cost on any split (a COCO test
# split of 5,000 images in pools of 50 would be 1.25 million pairs); None: every evaluated image.
DEFAULT_RETRIEVAL_IMAGES = 500
# Floats one scoring call may hold per tensor (logits: pairs x vocab; repeated grids: pairs x cells x units).
# 16 MB: larger buffers are mmap'd by malloc and zero-filled by the kernel on every call; measured here
# (vocabulary 3,000, 49 x 128 encoded grid), 4,096 pairs per call spent as much time in the kernel as in
# the maths, 512 pairs almost none: 2x the pairs per second.
FLOATS_PER_CALL = 2**22
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


# ------------------------------------------------------------------ scoring


@dataclass
class CaptionTrie:
    """Encoded captions merged into a prefix tree, one level per decoding step.

    A node at depth d is a distinct prefix `tokens[:d + 1]` (depth 0: `<start>`);
    decoding step d runs once per node, with the node's last token as input and
    its parent's state. An edge is a (node, next token) pair: its log-probability
    is read from the node's logits. Each caption is the path of its edges.

    Attributes:
        node_tokens, node_parents: per depth, int32 [nodes]: the input token and the
            parent's index among the previous depth's nodes (0 at depth 0).
        edge_nodes, edge_tokens: per depth, int32 [edges]: the node an edge leaves
            and the token it predicts.
        paths: int64 [captions, steps]: each caption's edge indices (edges of all
            depths numbered in depth order); `mask` float32 is 1 where a step is real.

    Example:

    >>> trie = CaptionTrie.build(np.array([[2, 5, 3, 0], [2, 5, 6, 3]]))   # "<start> a <end>", "<start> a dog <end>"
    >>> [len(t) for t in trie.node_tokens], trie.mask.sum(1)
    ([1, 1, 1], array([2., 3.], dtype=float32))
    """

    node_tokens: list
    node_parents: list
    edge_nodes: list
    edge_tokens: list
    paths: np.ndarray
    mask: np.ndarray

    @classmethod
    def build(cls, tokens: np.ndarray) -> "CaptionTrie":
        tokens = np.asarray(tokens)
        captions, length = tokens.shape
        steps = length - 1
        if captions and len(set(tokens[:, 0].tolist())) != 1:
            raise ValueError("CaptionTrie: every caption must start with the same <start> token")
        node_index = [dict() for _ in range(steps)]  # depth -> {prefix: index}
        edge_index = [dict() for _ in range(steps)]  # depth -> {(node, token): index}
        node_tokens = [[] for _ in range(steps)]
        node_parents = [[] for _ in range(steps)]
        edges = [[] for _ in range(steps)]
        local = np.zeros((captions, steps), np.int64)
        mask = np.zeros((captions, steps), np.float32)
        for c in range(captions):
            row = tokens[c].tolist()
            real = sum(1 for t in row[1:] if t != 0)  # tokens after <start>, up to the padding
            parent = 0
            for d in range(real):
                prefix = tuple(row[: d + 1])
                node = node_index[d].get(prefix)
                if node is None:
                    node = node_index[d][prefix] = len(node_tokens[d])
                    node_tokens[d].append(row[d])
                    node_parents[d].append(parent)
                key = (node, row[d + 1])
                edge = edge_index[d].get(key)
                if edge is None:
                    edge = edge_index[d][key] = len(edges[d])
                    edges[d].append(key)
                local[c, d], mask[c, d] = edge, 1.0
                parent = node
        offsets = np.cumsum([0] + [len(e) for e in edges])[:-1]
        paths = (local + offsets[None, :]) * (mask > 0)
        as_int = lambda values: np.asarray(values, np.int32).reshape(-1)  # noqa: E731
        return cls(
            [as_int(t) for t in node_tokens],
            [as_int(p) for p in node_parents],
            [as_int([e[0] for e in level]) for level in edges],
            [as_int([e[1] for e in level]) for level in edges],
            paths,
            mask,
        )

    @property
    def nodes(self) -> int:
        return sum(len(t) for t in self.node_tokens)

    @property
    def widest(self) -> int:
        return max((len(t) for t in self.node_tokens), default=1)


class PairScorer:
    """Length-normalised log p(caption | image) of every (image, caption) pair, each image encoded once.

    Built on the decoder's public halves, `values, keys, state = model.encode(grid)`
    and `logits, state, weights = model.step(tokens, state, values, keys)`; the
    captions are decoded through a `CaptionTrie` in one compiled function per
    image chunk. The scores equal `CaptionGenerator.log_likelihood` total / count.

    Example:

    ```python
    scores = PairScorer(run.model).scores(grids, run.vocab.encode(captions))   # [images, captions]
    ```
    """

    def __init__(self, model, floats_per_call: int = FLOATS_PER_CALL, max_pairs_per_call: int = MAX_PAIRS_PER_CALL):
        self.model, self.floats_per_call, self.max_pairs_per_call = model, floats_per_call, max_pairs_per_call
        self._encode = tf.function(lambda grid: model.encode(grid), reduce_retracing=True, autograph=False)
        self._score = None  # traced on first use, with every dimension left open: one trace per model

    def _pairs_per_call(self, values) -> int:
        per_pair = max(int(self.model.vocab_size), int(np.prod(values.shape[1:])))
        return max(1, min(self.max_pairs_per_call, self.floats_per_call // per_pair))

    def _edge_log_probs(self, values, keys, state, node_tokens, node_parents, edge_nodes, edge_tokens):
        """log p of every edge of the trie for every image: float32 [images, edges]."""
        images = tf.shape(values)[0]
        columns, previous = [], tf.constant(1)
        for depth in range(len(node_tokens)):
            nodes = tf.shape(node_tokens[depth])[0]
            # Pairs are image-major: pair p = image p // nodes, node p % nodes.
            image_of_pair = tf.repeat(tf.range(images), nodes)
            parent = tf.reshape(tf.range(images)[:, None] * previous + node_parents[depth][None, :], [-1])
            state = tf.nest.map_structure(lambda s: tf.gather(s, parent), state)
            logits, state, _ = self.model.step(
                tf.tile(node_tokens[depth], [images]), state, tf.gather(values, image_of_pair), tf.gather(keys, image_of_pair)
            )
            logits = tf.cast(logits, tf.float32)
            vocab = tf.shape(logits)[-1]
            normaliser = tf.reshape(tf.reduce_logsumexp(logits, -1), [images, nodes])
            picked = tf.gather(tf.reshape(logits, [images, -1]), edge_nodes[depth] * vocab + edge_tokens[depth], axis=1)
            columns.append(picked - tf.gather(normaliser, edge_nodes[depth], axis=1))
            previous = nodes
        return tf.concat(columns, axis=1)

    def _score_fn(self, args):
        if self._score is None:
            open_spec = lambda t: tf.TensorSpec([None] * t.shape.rank, t.dtype)  # noqa: E731
            self._score = tf.function(
                self._edge_log_probs, input_signature=tf.nest.map_structure(open_spec, args), autograph=False
            )
        return self._score

    def scores(self, grids: np.ndarray, tokens: np.ndarray, progress: Optional[tqdm] = None) -> np.ndarray:
        """Scores float32 [images, captions] of `grids` [images, cells, C] x encoded `tokens` [captions, length].

        `progress`, a tqdm bar counting pairs, is advanced as image chunks finish.
        """
        trie = CaptionTrie.build(tokens)
        steps = tokens.shape[1] - 1
        trie_arrays = [[tf.constant(a) for a in level] for level in (trie.node_tokens, trie.node_parents, trie.edge_nodes, trie.edge_tokens)]
        lengths = np.maximum(trie.mask.sum(1), 1.0)
        out = np.zeros((len(grids), len(tokens)), np.float32)
        chunk, start = None, 0
        while start < len(grids):
            values, keys, state = self._encode(tf.convert_to_tensor(grids[start : start + (chunk or 1)]))
            if chunk is None:  # pairs per call are bounded by the encoded width: size the chunk from the first image
                chunk = max(1, self._pairs_per_call(values) // trie.widest)
                values, keys, state = self._encode(tf.convert_to_tensor(grids[start : start + chunk]))
            args = (values, keys, list(state), *trie_arrays)
            edges = self._score_fn(args)(*args).numpy()
            count = edges.shape[0]
            picked = edges[:, trie.paths] if steps else np.zeros((count, len(tokens), 0), np.float32)
            out[start : start + count] = (picked * trie.mask[None]).sum(-1) / lengths[None]
            if progress is not None:
                progress.update(count * len(tokens))
            start += count
        return out


def pair_scores(model, grids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Length-normalised log-likelihood of every caption given every image: float32 [images, captions].

    Example:

    ```python
    pair_scores(run.model, cache.load_split("test")["grid"][:10], run.vocab.encode(captions)).shape
    ```
    """
    return PairScorer(model).scores(grids, tokens)


# ------------------------------------------------------------------ the protocol


def retrieval_pools(images: int, pool_images: Optional[int]) -> list[np.ndarray]:
    """Consecutive pools of about `pool_images` images (sizes differ by at most one); None: one pool.

    Example:

    >>> [len(p) for p in retrieval_pools(103, 50)]
    [52, 51]
    """
    if pool_images is not None and pool_images < 2:
        raise ValueError(f"a retrieval pool needs at least 2 images, got {pool_images}")
    count = 1 if not pool_images else max(1, round(images / pool_images))
    return [p for p in np.array_split(np.arange(images), count) if len(p)]


def protocol_description(images: int, captions: int, pools: list[np.ndarray], available: int) -> str:
    """What the recall numbers were ranked against, in words (shown in the report).

    `images` of the `available` evaluated images were ranked, with their `captions`.
    """
    ranked = f"all {images:,} images" if images == available else f"the first {images:,} of the {available:,} evaluated images"
    if len(pools) == 1:
        text = (f"standard protocol: {ranked}, each ranked against all {captions:,} of their captions, "
                f"and each caption against all {images:,} images")
    else:
        sizes = sorted({len(p) for p in pools})
        size = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        text = (f"{ranked} in {len(pools)} pools of {size} consecutive images: each image ranked against the captions of "
                f"its pool (about {captions / images * np.mean([len(p) for p in pools]):,.0f}), each caption against the images "
                f"of its pool; recall averaged over the {images:,} images and {captions:,} captions. The standard protocol "
                f"ranks against the whole split in one pool: evaluate.py --retrieval-pool all --retrieval-images all")
    if len(pools) == 1 and images < available:
        text += ". The whole split: evaluate.py --retrieval-images all"
    return text


def retrieval_scores(
    run,
    cache: FeatureCache,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    max_images: Optional[int] = None,
    dataset=None,
    pool_images: Optional[int] = DEFAULT_POOL_IMAGES,
    images: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Image->text and text->image Recall@K of a trained run on a split of its feature cache.

    Args:
        run: a `caption_tf.run_folder.Run` with its model loaded.
        cache: the run's feature cache.
        split: the split whose images and captions are ranked.
        ks: the K of Recall@K.
        max_images: the images evaluated: the first `max_images` of the split (None: all).
        dataset: the run's dataset (the reference captions); loaded when None.
        pool_images: images per pool (see the module docstring); None: all
            ranked images in one pool, the standard protocol.
        images: rank only the first `images` of the evaluated images (None: all);
            the report's default is `DEFAULT_RETRIEVAL_IMAGES`.
        progress: show a tqdm bar of the pairs scored.

    Example:

    ```python
    run = load_run(run_dir); cache = open_run_cache(run)
    retrieval_scores(run, cache, "test", pool_images=None)["text_to_image"]["R@5"]
    ```
    """
    from caption_tf.data.datasets import load_dataset

    dataset = dataset or load_dataset(run.config.data)
    records = dataset.by_id()
    available = len(cache.image_ids(split)[:max_images] if max_images else cache.image_ids(split))
    image_ids = cache.image_ids(split)[: min(available, images or available)]
    if not image_ids:
        raise ValueError(f"Split {split!r} of the feature cache {cache.directory} has no images")
    grids = cache.load_split(split, fields=("grid",))["grid"][: len(image_ids)]
    pools = retrieval_pools(len(image_ids), pool_images)
    encoded = [run.vocab.encode(records[i].captions) for i in image_ids]
    total_captions = sum(len(e) for e in encoded)
    total_pairs = sum(len(p) * sum(len(encoded[i]) for i in p) for p in pools)
    scorer = PairScorer(run.model)
    sums = {name: {f"R@{k}": 0.0 for k in ks} for name in ("image_to_text", "text_to_image", "chance_i2t", "chance_t2i")}
    started = time.time()
    with tqdm(total=total_pairs, desc="retrieval", unit="pair", unit_scale=True, disable=not progress) as bar:
        for pool in pools:
            tokens = np.concatenate([encoded[i] for i in pool])
            owner = np.concatenate([np.full(len(encoded[i]), j) for j, i in enumerate(pool)])
            scores = scorer.scores(grids[pool], tokens, progress=bar)
            positives = np.arange(len(pool))[:, None] == owner[None, :]
            for name, values, rows in (
                ("image_to_text", recall_at_k(scores, positives, ks), len(pool)),
                ("text_to_image", recall_at_k(scores.T, positives.T, ks), len(tokens)),
                ("chance_i2t", chance_recall_at_k(positives, ks), len(pool)),
                ("chance_t2i", chance_recall_at_k(positives.T, ks), len(tokens)),
            ):
                for key, value in values.items():
                    sums[name][key] += value * rows
    seconds = time.time() - started
    mean = lambda name, rows: {k: v / rows for k, v in sums[name].items()}  # noqa: E731
    return {
        "split": split,
        "images": len(image_ids),
        "captions": total_captions,
        "pool_images": pool_images if len(pools) > 1 else None,
        "pools": len(pools),
        "pairs": total_pairs,
        "protocol": protocol_description(len(image_ids), total_captions, pools, available),
        "score": "mean log p(caption token | image, previous tokens), teacher forcing, <end> included",
        "image_to_text": mean("image_to_text", len(image_ids)),
        "text_to_image": mean("text_to_image", total_captions),
        "chance": {"image_to_text": mean("chance_i2t", len(image_ids)), "text_to_image": mean("chance_t2i", total_captions)},
        "seconds": round(seconds, 2),
        "pairs_per_second": round(total_pairs / max(seconds, 1e-9), 1),
    }


def evaluate_retrieval(run_dir: str | Path, split: str = "test", ks: Sequence[int] = DEFAULT_KS, max_images: Optional[int] = None,
                       pool_images: Optional[int] = DEFAULT_POOL_IMAGES, images: Optional[int] = DEFAULT_RETRIEVAL_IMAGES) -> dict:
    """`retrieval_scores` for a run folder (loads the run, its dataset and feature cache).

    Example:

    ```python
    evaluate_retrieval("runs/minimal-shapes-inception_v3-transformer", pool_images=None, images=None)["image_to_text"]
    ```
    """
    from caption_tf.data.datasets import load_dataset
    from caption_tf.evaluation.captioning import open_run_cache
    from caption_tf.run_folder import load_run

    run = load_run(run_dir)
    dataset = load_dataset(run.config.data)
    return retrieval_scores(run, open_run_cache(run, dataset), split, ks, max_images, dataset, pool_images, images)
