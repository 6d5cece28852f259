"""Feature cache: backbone features extracted once, stored as sharded TFRecords.

Layout of one cache entry (a folder under `FeatureConfig.cache_dir`):

    <dataset>-<backbone>-<key>/
        manifest.json            backbone, weights, input size, dataset fingerprint,
                                 grid shape, per-split shards and image ids, skipped images
        train-00000.tfrecord     one tf.train.Example per image: index, image_id,
        ...                      grid (float16 [H*W, C]) and pooled (float16 [C])

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

CACHE_FORMAT_VERSION = 1
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

    def skipped(self) -> list[dict]:
        return list(self.manifest.get("skipped", []))

    def load_split(self, split: str) -> dict[str, np.ndarray]:
        """All features of a split in memory: {"grid": [N, H*W, C], "pooled": [N, C]} (float16)."""
        grids, pooled = [], []
        for raw in tf.data.TFRecordDataset(self.shards(split)):
            ex = parse_example(raw, self.grid_shape)
            grids.append(ex["grid"].numpy())
            pooled.append(ex["pooled"].numpy())
        n, (cells, dim) = len(grids), self.grid_shape
        return {
            "grid": np.stack(grids) if grids else np.zeros((0, cells, dim), np.float16),
            "pooled": np.stack(pooled) if pooled else np.zeros((0, dim), np.float16),
            "n": n,
        }


def feature_spec() -> dict:
    return {
        "index": tf.io.FixedLenFeature([], tf.int64),
        "image_id": tf.io.FixedLenFeature([], tf.string),
        "grid": tf.io.FixedLenFeature([], tf.string),
        "pooled": tf.io.FixedLenFeature([], tf.string),
    }


def parse_example(serialized, grid_shape) -> dict:
    """Pure-TF parser (the training pipeline must stay checkpointable)."""
    ex = tf.io.parse_single_example(serialized, feature_spec())
    cells, dim = grid_shape
    return {
        "index": ex["index"],
        "image_id": ex["image_id"],
        "grid": tf.reshape(tf.io.decode_raw(ex["grid"], tf.float16), (cells, dim)),
        "pooled": tf.reshape(tf.io.decode_raw(ex["pooled"], tf.float16), (dim,)),
    }


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def serialize_example(index: int, image_id: str, grid: np.ndarray, pooled: np.ndarray) -> bytes:
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[index])),
                "image_id": _bytes(image_id.encode()),
                "grid": _bytes(grid.astype(np.float16).tobytes()),
                "pooled": _bytes(pooled.astype(np.float16).tobytes()),
            }
        )
    ).SerializeToString()


def cache_request(dataset: CaptionDataset, cfg: FeatureConfig) -> dict:
    """What identifies a cache entry; a stored manifest must match it to be reused."""
    from caption_tf.features.backbones import resolve_input_size, weights_tag

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
    shards = [directory / s for split in manifest["splits"].values() for s in split["shards"]]
    if not all(s.exists() for s in shards):
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


def image_batches(records: list[ImageRecord], size: int, batch_size: int) -> tf.data.Dataset:
    """(index, image uint8, ok) batches; decoding runs in parallel, order kept."""
    paths = [r.path for r in records]
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    ds = ds.map(_decode_for_backbone(size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class _ShardWriter:
    """Writes `split-00000.tfrecord`, `split-00001.tfrecord`, ... of at most `shard_size` examples."""

    def __init__(self, directory: Path, split: str, shard_size: int):
        self.directory, self.split, self.shard_size = directory, split, shard_size
        self.shards: list[str] = []
        self.count = 0
        self._writer = None

    def write(self, payload: bytes) -> None:
        if self.count % self.shard_size == 0:
            self.close()
            name = f"{self.split}-{len(self.shards):05d}.tfrecord"
            self.shards.append(name)
            self._writer = tf.io.TFRecordWriter(str(self.directory / name))
        self._writer.write(payload)
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def extract_split(extractor, records, out_dir, split, cfg: FeatureConfig, skipped: list[dict]) -> dict:
    writer = _ShardWriter(out_dir, split, cfg.shard_size)
    image_ids, grid_shape = [], None
    batches = image_batches(records, extractor.input_size, cfg.extract_batch_size)
    infer = tf.function(lambda images: extractor(images, training=False), reduce_retracing=True)
    with tqdm(total=len(records), desc=f"features {split}", unit="img") as bar:
        for index, images, ok in batches:
            grid, pooled = infer(images)
            grid, pooled, ok = grid.numpy(), pooled.numpy(), ok.numpy()
            grid_shape = grid.shape[1:]
            for j, i in enumerate(index.numpy()):
                rec = records[int(i)]
                if not ok[j]:
                    skipped.append({"image_id": rec.image_id, "path": rec.path, "reason": "could not decode image"})
                    continue
                writer.write(serialize_example(len(image_ids), rec.image_id, grid[j], pooled[j]))
                image_ids.append(rec.image_id)
            bar.update(len(ok))
    writer.close()
    return {"shards": writer.shards, "image_ids": image_ids, "count": len(image_ids)}, grid_shape


def build_feature_cache(dataset: CaptionDataset, cfg: FeatureConfig, force: bool = False) -> FeatureCache:
    """Reuse the matching cache entry or extract features into a new one."""
    from caption_tf.features.backbones import build_extractor

    request = cache_request(dataset, cfg)
    directory = cache_directory(request, cfg)
    cached = None if force else open_cache(directory, request)
    if cached is not None:
        print(f"Feature cache: reusing {directory}", flush=True)
        return cached
    print(f"Feature cache: extracting {cfg.backbone} features ({request['weights']}, {request['input_size']}px) into {directory}", flush=True)
    extractor = build_extractor(cfg.backbone, cfg.weights, cfg.input_size)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started, skipped, splits, grid_shape = time.time(), [], {}, None
    for split in SPLITS:
        records = dataset.split(split)
        splits[split], shape = extract_split(extractor, records, tmp, split, cfg, skipped)
        grid_shape = grid_shape or shape
    if grid_shape is None:
        raise ValueError(f"Dataset {dataset.name!r}: no image could be decoded; nothing to cache")
    manifest = {
        **request,
        "key": directory.name,
        "grid_shape": [int(d) for d in grid_shape],
        "splits": splits,
        "skipped": skipped,
        "seconds": round(time.time() - started, 2),
        "images_per_second": round(sum(s["count"] for s in splits.values()) / max(time.time() - started, 1e-9), 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(directory, ignore_errors=True)  # a stale entry with the same key
    os.replace(tmp, directory)
    if skipped:
        print(f"Feature cache: skipped {len(skipped)} unreadable images (listed in {directory / MANIFEST})", flush=True)
    return FeatureCache(directory, manifest)
