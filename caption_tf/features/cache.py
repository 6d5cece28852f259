"""Feature cache: backbone features extracted once, stored as sharded TFRecords.

Layout of one cache entry (a folder under `FeatureConfig.cache_dir`):

    <dataset>-<backbone>-<key>/
        manifest.json            backbone, weights, input size, dataset fingerprint,
                                 grid shape, per-split shards and image ids, skipped images
        train-00000.tfrecord     one tf.train.Example per image: index, image_id,
        ...                      grid (float16 [H*W, C]) and pooled (float16 [C]);
                                 the format is `caption_tf.features.tfrecords`

An entry is reused when its manifest matches the request and rebuilt when it
does not; it is written to a temporary folder and published with one rename,
so a crash mid-extraction never leaves a half cache that looks complete.
Images that fail to decode are skipped, counted and listed in the manifest.

Example:

>>> cache = build_feature_cache(dataset, FeatureConfig(backbone="densenet121", weights="none"))
>>> cache.grid_shape
(49, 1024)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from caption_tf.config import FeatureConfig
from caption_tf.data.images import BadImageError, load_rgb
from caption_tf.data.records import SPLITS, CaptionDataset, ImageRecord
from caption_tf.files import build_lock
from caption_tf.features.backbones import build_extractor, resolve_input_size, weights_tag
from caption_tf.features.tfrecords import ShardWriter, parse_feature_example, serialize_feature_example

CACHE_FORMAT_VERSION = 2
MANIFEST = "manifest.json"


@dataclass
class FeatureCache:
    """A complete cache entry on disk, described by its manifest."""

    directory: Path
    manifest: dict

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.manifest["grid_shape"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["key"]

    def shards(self, split: str) -> list[str]:
        return [str(self.directory / s) for s in self.manifest["splits"][split]["shards"]]

    def image_ids(self, split: str) -> list[str]:
        return list(self.manifest["splits"][split]["image_ids"])

    def normalizer(self) -> FeatureNormalizer:
        return FeatureNormalizer.load(self.directory / NORMALIZER_FILE)

    def skipped(self) -> list[dict]:
        return list(self.manifest.get("skipped", []))

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        """All features of a split in memory: {"grid": [N, H*W, C], "pooled": [N, C]} (float16)."""
        grids, pooled = [], []
        for raw in tf.data.TFRecordDataset(self.shards(split)):
            ex = parse_feature_example(raw, self.grid_shape, fields=("grid", "pooled"))
            grids.append(ex["grid"].numpy())
            pooled.append(ex["pooled"].numpy())
        n, (cells, dim) = len(grids), self.grid_shape
        return {
            "grid": np.stack(grids) if grids else np.zeros((0, cells, dim), np.float16),
            "pooled": np.stack(pooled) if pooled else np.zeros((0, dim), np.float16),
            "n": n,
        }


def cache_request(dataset: CaptionDataset, cfg: FeatureConfig) -> dict:
    """What identifies a cache entry; a stored manifest must match it to be reused."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "backbone": cfg.backbone,
        "weights": weights_tag(cfg.weights),
        "input_size": resolve_input_size(cfg.backbone, cfg.input_size),
    }


def cache_directory(request: dict, cfg: FeatureConfig) -> Path:
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / f"{request['dataset']}-{request['backbone']}-{key}"


def open_cache(directory: Path, request: dict) -> FeatureCache | None:
    """The cache entry at `directory` if complete and matching `request`, else None."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if any(manifest.get(k) != v for k, v in request.items()):
        return None
    files = [directory / s for split in manifest["splits"].values() for s in split["shards"]]
    if not all(f.exists() for f in [*files, directory / NORMALIZER_FILE]):
        return None
    return FeatureCache(directory, manifest)


def _decode_for_backbone(size: int):
    def load(path: bytes):
        try:
            return load_rgb(path.decode(), size=(size, size)), True
        except BadImageError:
            return np.zeros((size, size, 3), np.uint8), False

    def tf_load(index, path):
        image, ok = tf.numpy_function(load, [path], [tf.uint8, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        ok.set_shape(())
        return index, image, ok

    return tf_load


def decoded_image_batches(records: list[ImageRecord], size: int, batch_size: int) -> tf.data.Dataset:
    """(index, image uint8, ok) batches; decoding runs in parallel, order kept."""
    paths = [r.path for r in records]
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    ds = ds.map(_decode_for_backbone(size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


NORMALIZER_SAMPLE = 256  # training images used to fit the per-channel standardisation
NORMALIZER_FILE = "normalizer.npz"


@dataclass
class FeatureNormalizer:
    """Per-channel standardisation of grid features, fitted on training images.

    Backbone activations can be tiny (random-init InceptionV3: ~1e-4), which
    float16 storage and the decoder's first layer both handle badly; stored
    features are standardised, and the same statistics apply to new images.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, grids: np.ndarray) -> "FeatureNormalizer":
        flat = grids.reshape(-1, grids.shape[-1]).astype(np.float64)
        std = flat.std(0)
        # Dead channels (constant everywhere) stay zero instead of dividing by zero.
        std = np.where(std > 1e-12, std, 1.0)
        return cls(flat.mean(0).astype(np.float32), std.astype(np.float32))

    def __call__(self, grid: np.ndarray) -> np.ndarray:
        return (grid - self.mean) / self.std

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, std=self.std)

    @classmethod
    def load(cls, path: Path) -> "FeatureNormalizer":
        with np.load(path) as f:
            return cls(f["mean"], f["std"])


def compiled_extractor(extractor):
    """One traced graph per extractor (not per split); batch size may vary."""
    if not hasattr(extractor, "_compiled"):
        extractor._compiled = tf.function(
            lambda images: extractor(images, training=False),
            input_signature=[tf.TensorSpec((None, extractor.input_size, extractor.input_size, 3), tf.uint8)],
        )
    return extractor._compiled


def extract_split(extractor, records, out_dir, split, cfg: FeatureConfig, skipped: list[dict], normalizer=None):
    """Extract and write one split; the normalizer is fitted on the first training images."""
    writer = ShardWriter(out_dir, split, cfg.shard_size)
    image_ids, grid_shape, pending = [], None, []

    def flush():
        for rec, grid in pending:
            grid = normalizer(grid)
            writer.write(serialize_feature_example(len(image_ids), rec.image_id, grid, grid.mean(0)))
            image_ids.append(rec.image_id)
        pending.clear()

    batches = decoded_image_batches(records, extractor.input_size, cfg.extract_batch_size)
    infer = compiled_extractor(extractor)
    with tqdm(total=len(records), desc=f"features {split}", unit="img") as bar:
        for index, images, ok in batches:
            grid, _ = infer(images)
            grid, ok = grid.numpy(), ok.numpy()
            grid_shape = grid.shape[1:]
            for j, i in enumerate(index.numpy()):
                rec = records[int(i)]
                if ok[j]:
                    pending.append((rec, grid[j]))
                else:
                    skipped.append({"image_id": rec.image_id, "path": rec.path, "reason": "could not decode image"})
            if normalizer is None and len(pending) >= NORMALIZER_SAMPLE:
                normalizer = FeatureNormalizer.fit(np.stack([g for _, g in pending]))
            if normalizer is not None:
                flush()
            bar.update(len(ok))
    if pending:
        normalizer = normalizer or FeatureNormalizer.fit(np.stack([g for _, g in pending]))
        flush()
    writer.close()
    return {"shards": writer.shards, "image_ids": image_ids, "count": len(image_ids)}, grid_shape, normalizer


def build_feature_cache(
    dataset: CaptionDataset,
    cfg: FeatureConfig,
    force: bool = False,
    extractor=None,
    normalizer: FeatureNormalizer | None = None,
) -> FeatureCache:
    """Reuse the matching cache entry or extract features into a new one.

    `extractor` defaults to the configured backbone; a given `normalizer` is
    used as is (e.g. the phase-1 statistics for a fine-tuned backbone) instead
    of being fitted on the training images.
    """
    request = cache_request(dataset, cfg)
    directory = cache_directory(request, cfg)
    cached = None if force else open_cache(directory, request)
    if cached is None:
        # Several workers on one filesystem: the first extracts, the others wait and reuse it.
        with build_lock(directory):
            cached = None if force else open_cache(directory, request)
            if cached is None:
                return _extract_cache(dataset, cfg, request, directory, extractor, normalizer)
    print(f"Feature cache: reusing {directory}", flush=True)
    return cached


def _extract_cache(dataset, cfg: FeatureConfig, request: dict, directory: Path, extractor, normalizer) -> FeatureCache:
    """Extract every split into `<directory>.tmp` and publish it as `directory` with one rename."""
    print(f"Feature cache: extracting {cfg.backbone} features ({request['weights']}, {request['input_size']}px) into {directory}", flush=True)
    extractor = extractor or build_extractor(cfg.backbone, cfg.weights, cfg.input_size)
    fitted_here = normalizer is None
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started, skipped, splits, grid_shape = time.time(), [], {}, None
    for split in SPLITS:  # train first: its images fit the normalizer
        records = dataset.split(split)
        splits[split], shape, normalizer = extract_split(extractor, records, tmp, split, cfg, skipped, normalizer)
        grid_shape = grid_shape or shape
    if grid_shape is None or normalizer is None:
        raise ValueError(f"Dataset {dataset.name!r}: no image could be decoded; nothing to cache")
    normalizer.save(tmp / NORMALIZER_FILE)
    seconds = max(time.time() - started, 1e-9)
    manifest = {
        **request,
        "key": directory.name,
        "grid_shape": [int(d) for d in grid_shape],
        "splits": splits,
        "skipped": skipped,
        "normalizer": "fitted on the training images" if fitted_here else "given (statistics of an earlier cache)",
        "seconds": round(seconds, 2),
        "images_per_second": round(sum(s["count"] for s in splits.values()) / seconds, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(directory, ignore_errors=True)  # a stale entry with the same key
    os.replace(tmp, directory)
    if skipped:
        print(f"Feature cache: skipped {len(skipped)} unreadable images (listed in {directory / MANIFEST})", flush=True)
    return FeatureCache(directory, manifest)


def encode_images(paths: list[str], cfg: FeatureConfig, normalizer: FeatureNormalizer, batch_size: int = 16):
    """Grid features of arbitrary image files, standardised like the cache they must match.

    Returns (grids float32 [N, cells, C], ok bool [N]); unreadable files give ok=False.
    Use it to caption user images with a trained run:

    >>> grids, ok = encode_images(["a.jpg"], run.config.features, cache.normalizer())
    """
    extractor = build_extractor(cfg.backbone, cfg.weights, cfg.input_size)
    records = [ImageRecord(image_id=str(i), path=str(p), captions=[], split="test") for i, p in enumerate(paths)]
    grids, oks = [], []
    infer = compiled_extractor(extractor)
    for _, images, ok in decoded_image_batches(records, extractor.input_size, batch_size):
        grid, _ = infer(images)
        grids.append(normalizer(grid.numpy()).astype(np.float32))
        oks.append(ok.numpy())
    return np.concatenate(grids), np.concatenate(oks)
