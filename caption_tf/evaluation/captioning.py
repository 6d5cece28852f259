"""Caption a split of a run's feature cache and score it against all references.

Example:

```python
metrics = evaluate_run("runs/minimal-shapes-inception_v3-transformer")
metrics["greedy"]["bleu4"]
```
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caption_tf.data.datasets import load_dataset
from caption_tf.data.text import clean_caption
from caption_tf.evaluation.metrics import corpus_bleu_scores
from caption_tf.features.cache import FeatureCache, cache_request, open_cache, repair_cache
from caption_tf.features.tfrecords import feature_batches
from caption_tf.files import write_json
from caption_tf.run_folder import METRICS_FILE, Run, load_run


@dataclass
class SplitCaptions:
    """Generated captions of one split, in cache order, with attention maps."""

    image_ids: list[str]
    captions: list[str]
    attention: np.ndarray  # [images, steps, cells]
    seconds: float


def open_run_cache(run: Run, dataset=None) -> FeatureCache:
    """The run's feature cache, checked against the dataset it was trained on and against its manifest.

    Damaged shards are re-extracted (`features.cache.repair_cache`); what cannot
    be repaired raises `FeatureCacheError` naming the file.
    """
    dataset = dataset or load_dataset(run.config.data)
    if run.info.get("feature_fingerprint"):
        # The very cache the run recorded (its key), for the same images: also a cache written by an
        # earlier version of this code, whose request would no longer match.
        request = {"key": run.info["feature_fingerprint"], "dataset_fingerprint": dataset.fingerprint()}
    else:
        request = cache_request(dataset, run.config.features)
    cache = open_cache(Path(run.info["feature_cache"]), request)
    if cache is None:
        raise FileNotFoundError(
            f"Feature cache {run.info['feature_cache']} is missing or does not match the run's dataset; "
            f"rerun train.py with the run's config ({run.directory / 'config.yaml'}) to rebuild it"
        )
    return repair_cache(cache, dataset)


def caption_split(run: Run, cache: FeatureCache, split: str = "test", batch_size: int = 64) -> SplitCaptions:
    generator = run.generator()
    split_ids = cache.image_ids(split)  # a copy of the manifest list: take it once, not per image
    ids, captions, maps = [], [], []
    started = time.time()
    for index, grid in feature_batches(cache.shards(split), cache.grid_shape, batch_size):
        tokens, attention = generator.greedy(grid)
        captions.extend(run.vocab.decode(row) for row in tokens.numpy())
        maps.append(attention.numpy())
        ids.extend(split_ids[int(i)] for i in index.numpy())
    attention = np.concatenate(maps) if maps else np.zeros((0, generator.steps, cache.grid_shape[0]), np.float32)
    return SplitCaptions(ids, captions, attention, time.time() - started)


def references_for(dataset, image_ids: list[str]) -> list[list[str]]:
    records = dataset.by_id()
    return [[clean_caption(c) for c in records[i].captions] for i in image_ids]


def blind_caption(dataset) -> str:
    """The most frequent training caption: what a model that ignores the image would say."""
    counts = collections.Counter(clean_caption(c) for r in dataset.split("train") for c in r.captions)
    return counts.most_common(1)[0][0] if counts else ""


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict:
    """Greedy-decode `split`, score BLEU-1..4 against all references, write metrics.json."""
    run = load_run(run_dir)
    dataset = load_dataset(run.config.data)
    cache = open_run_cache(run, dataset)
    generated = caption_split(run, cache, split, run.config.eval.eval_batch_size)
    references = references_for(dataset, generated.image_ids)
    scores = corpus_bleu_scores(references, generated.captions)
    blind = blind_caption(dataset)
    metrics = {
        "split": split,
        "images": len(generated.image_ids),
        "greedy": scores,
        # Baseline for honesty: the same metric for one fixed caption on every image.
        "blind_baseline": {"caption": blind, **corpus_bleu_scores(references, [blind] * len(references))},
        "captions_per_second": round(len(generated.image_ids) / max(generated.seconds, 1e-9), 1),
        "examples": [{"image_id": i, "caption": c} for i, c in list(zip(generated.image_ids, generated.captions))[:10]],
    }
    write_json(run.directory / METRICS_FILE, metrics)
    return metrics
