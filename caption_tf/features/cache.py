"""Feature cache: backbone features extracted once, stored as sharded TFRecords.

Layout of one cache entry (a folder under `FeatureConfig.cache_dir`):

    <dataset>-<backbone>-<key>/
        manifest.json            the encoder (backbone, weights, input size, seed), dataset
                                 fingerprint, grid shape, per-split shards and image ids,
                                 skipped images, and the size and SHA-256 of every file
        normalizer.npz           per-channel statistics of the training images
        train-00000.tfrecord     one tf.train.Example per image: index, image_id,
        ...                      grid (float16 [H*W, C]) and pooled (float16 [C]);
                                 the format is `caption_tf.features.tfrecords`

Features come from `features.encoder.ImageEncoder`, the one path from image
file to standardised grid (also used for new images and fine-tuning).

An entry is reused when its manifest matches the request and rebuilt when it
does not; it is written to a temporary folder and published with one rename,
so a crash mid-extraction never leaves a half cache that looks complete.
Images that fail to decode are skipped, counted and listed in the manifest.

Before an entry is reused, every file is checked against the size and
SHA-256 in its manifest (`FeatureCache.damaged`). A damaged or missing shard
is re-extracted from its images (the same backbone, rebuilt from the
manifest's encoder, and the same statistics) and the repair is recorded in
the manifest; what cannot be repaired stops with a `FeatureCacheError`
naming the file and the fix.

Extraction and repair run under `files.build_lock`: several processes on one
filesystem (the workers of a multi-worker job) write an entry once; the others
wait and reuse it.

Example:

```python
cache = build_feature_cache(dataset, FeatureConfig(backbone="densenet121", weights="none"))
cache.grid_shape
```
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from caption_tf.config import FeatureConfig
from caption_tf.data.records import SPLITS, CaptionDataset, ImageRecord
from caption_tf.features.encoder import EncoderSpec, FeatureNormalizer, ImageEncoder
from caption_tf.features.tfrecords import ShardWriter, parse_feature_example, serialize_feature_example, write_shard
from caption_tf.files import build_lock, file_sha256, write_json

CACHE_FORMAT_VERSION = 3  # 3: encoder spec (seeded random backbones), file sizes and hashes
MANIFEST = "manifest.json"
NORMALIZER_FILE = "normalizer.npz"
NORMALIZER_SAMPLE = 256  # training images used to fit the per-channel standardisation


class FeatureCacheError(RuntimeError):
    """A damaged cache entry that cannot be repaired in place; the message names the file and the fix."""


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

    @property
    def encoder_spec(self) -> EncoderSpec:
        return EncoderSpec.from_dict(self.manifest["encoder"])

    def encoder(self) -> ImageEncoder:
        """The image -> grid function these features came from (backbone rebuilt on first use)."""
        return ImageEncoder(self.encoder_spec, self.normalizer())

    def shards(self, split: str) -> list[str]:
        return [str(self.directory / s) for s in self.manifest["splits"][split]["shards"]]

    def image_ids(self, split: str) -> list[str]:
        return list(self.manifest["splits"][split]["image_ids"])

    def normalizer(self) -> FeatureNormalizer:
        return FeatureNormalizer.load(self.directory / NORMALIZER_FILE)

    def skipped(self) -> list[dict]:
        return list(self.manifest.get("skipped", []))

    def load_split(self, split: str, fields: Sequence[str] = ("grid", "pooled"), limit: Optional[int] = None) -> dict[str, np.ndarray]:
        """Features of a split in memory: {"grid": [N, H*W, C], "pooled": [N, C], "n": N} (float16).

        Only `fields` are decoded: the pooled vectors of a large split are a
        small fraction of its grids. `limit`: only the first `limit` images
        (in `image_ids` order); "n" stays the split's size.
        """
        (cells, dim), fields = self.grid_shape, tuple(fields)
        empty = {"grid": np.zeros((0, cells, dim), np.float16), "pooled": np.zeros((0, dim), np.float16)}
        values: dict[str, list] = {f: [] for f in fields}
        records = tf.data.TFRecordDataset(self.shards(split))
        for raw in records if limit is None else records.take(limit):
            ex = parse_feature_example(raw, self.grid_shape, fields=fields)
            for f in fields:
                values[f].append(ex[f].numpy())
        out = {f: (np.stack(v) if v else empty[f]) for f, v in values.items()}
        out["n"] = len(self.image_ids(split))
        return out

    def damaged(self) -> list[dict]:
        """Files that differ from the manifest: [{"file", "reason"}] (missing, wrong size, wrong SHA-256)."""
        problems = []
        for name, expected in self.manifest.get("files", {}).items():
            path = self.directory / name
            if not path.is_file():
                problems.append({"file": name, "reason": "missing"})
            elif path.stat().st_size != expected["bytes"]:
                problems.append({"file": name, "reason": f"{path.stat().st_size:,} bytes instead of {expected['bytes']:,}: truncated or overwritten"})
            elif file_sha256(path) != expected["sha256"]:
                problems.append({"file": name, "reason": "its SHA-256 differs from the manifest's: corrupted"})
        return problems


def cache_request(dataset: CaptionDataset, cfg: FeatureConfig) -> dict:
    """What identifies a cache entry; a stored manifest must match it to be reused."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        **EncoderSpec.from_config(cfg).identity(),
    }


def cache_directory(request: dict, cfg: FeatureConfig) -> Path:
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / f"{request['dataset']}-{request['backbone']}-{key}"


def open_cache(directory: Path, request: dict) -> Optional[FeatureCache]:
    """The cache entry at `directory` if its manifest is readable and matches `request`, else None.

    Its files are not checked here: see `FeatureCache.damaged` and `repair_cache`.
    """
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in request.items()):
        return None
    return FeatureCache(Path(directory), manifest)


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def repair_cache(cache: FeatureCache, dataset: CaptionDataset) -> FeatureCache:
    """Check every file of `cache` against its manifest; re-extract the shards that are damaged.

    A shard's images are encoded again with the cache's own encoder (the
    backbone rebuilt from the manifest, the stored statistics) and the shard is
    rewritten and published by one rename; the manifest records the repair.

    Raises:
        FeatureCacheError: naming the file, when the statistics file is damaged
            or a damaged shard's image can no longer be read.
    """
    problems = cache.damaged()
    if not problems:
        return cache
    shard_of = {name: (split, k) for split, entry in cache.manifest["splits"].items() for k, name in enumerate(entry["shards"])}
    for problem in problems:
        if problem["file"] not in shard_of:
            raise FeatureCacheError(
                f"{cache.directory / problem['file']}: {problem['reason']}. It cannot be rebuilt on its own: "
                f"delete {cache.directory} and rerun train.py to extract the features again"
            )
    encoder = cache.encoder()
    records = dataset.by_id()
    size = cache.manifest["shard_size"]
    for problem in problems:
        split, k = shard_of[problem["file"]]
        path = cache.directory / problem["file"]
        ids = cache.image_ids(split)[k * size : (k + 1) * size]
        print(f"Feature cache: {path} is damaged ({problem['reason']}); re-extracting its {len(ids)} images", flush=True)
        missing = [i for i in ids if i not in records]
        if missing:
            raise FeatureCacheError(f"{path}: damaged, and its image {missing[0]!r} is no longer in the dataset; delete {cache.directory} and rerun train.py")
        grids, ok = encoder.encode([records[i].path for i in ids])
        if not ok.all():
            bad = records[ids[int(np.flatnonzero(~ok)[0])]].path
            raise FeatureCacheError(f"{path}: damaged, and its image {bad} can no longer be read to rebuild it; restore the image, or delete {cache.directory} and rerun train.py")
        payloads = [serialize_feature_example(k * size + j, image_id, grid, grid.astype(np.float32).mean(0)) for j, (image_id, grid) in enumerate(zip(ids, grids))]
        tmp = path.with_name(path.name + ".tmp")
        write_shard(tmp, payloads)
        os.replace(tmp, path)
        cache.manifest["files"][problem["file"]] = _file_entry(path)
        cache.manifest.setdefault("repairs", []).append(
            {"file": problem["file"], "reason": problem["reason"], "images": len(ids), "time": datetime.datetime.now().isoformat(timespec="seconds")}
        )
    write_json(cache.directory / MANIFEST, cache.manifest, indent=1)
    return cache


def extract_split(encoder: ImageEncoder, records: list[ImageRecord], out_dir: Path, split: str, cfg: FeatureConfig, skipped: list[dict]) -> tuple[dict, Optional[tuple]]:
    """Extract and write one split; fits `encoder.normalizer` on the first training images when it has none."""
    writer = ShardWriter(out_dir, split, cfg.shard_size)
    image_ids, grid_shape, pending = [], None, []

    def flush():
        for rec, raw in pending:
            grid = encoder.standardise(raw)
            writer.write(serialize_feature_example(len(image_ids), rec.image_id, grid, grid.astype(np.float32).mean(0)))
            image_ids.append(rec.image_id)
        pending.clear()

    with tqdm(total=len(records), desc=f"features {split}", unit="img") as bar:
        for index, _, raw, ok in encoder.raw_batches([r.path for r in records], cfg.extract_batch_size):
            grid_shape = raw.shape[1:]
            for j, i in enumerate(index):
                rec = records[int(i)]
                if ok[j]:
                    pending.append((rec, raw[j]))
                else:
                    skipped.append({"image_id": rec.image_id, "path": rec.path, "reason": "could not decode image"})
            if encoder.normalizer is None and len(pending) >= NORMALIZER_SAMPLE:
                encoder.normalizer = FeatureNormalizer.fit(np.stack([g for _, g in pending]))
            if encoder.normalizer is not None:
                flush()
            bar.update(len(ok))
    if pending:
        encoder.normalizer = encoder.normalizer or FeatureNormalizer.fit(np.stack([g for _, g in pending]))
        flush()
    writer.close()
    return {"shards": writer.shards, "image_ids": image_ids, "count": len(image_ids)}, grid_shape


def build_feature_cache(dataset: CaptionDataset, cfg: FeatureConfig, force: bool = False, encoder: Optional[ImageEncoder] = None) -> FeatureCache:
    """Reuse the matching cache entry (checked, damaged shards re-extracted) or extract features into a new one.

    Args:
        dataset: the images to encode, with their splits.
        cfg: backbone, weights, input size, cache folder, shard size.
        force: extract again even when a matching entry exists.
        encoder: the encoder to use, e.g. a fine-tuned backbone with the
            phase-1 statistics (its normalizer, when set, is used as is).
            Default: the configured backbone, statistics fitted on the
            training images.
    """
    request = cache_request(dataset, cfg)
    directory = cache_directory(request, cfg)
    cached = None if force else open_cache(directory, request)
    if cached is not None and not cached.damaged():  # the common case: nothing to write, no lock
        print(f"Feature cache: reusing {directory}", flush=True)
        return cached
    # A repair or an extraction. Several workers on one filesystem: the first one writes,
    # the others wait here and then find the entry whole (checked again under the lock).
    with build_lock(directory):
        cached = None if force else open_cache(directory, request)
        if cached is not None:
            print(f"Feature cache: reusing {directory}", flush=True)
            try:
                return repair_cache(cached, dataset)
            except FeatureCacheError as err:
                if encoder is not None or cached.manifest.get("normalizer") != "fitted on the training images":
                    raise
                print(f"{err}\nFeature cache: extracting the whole entry again", flush=True)
        return _extract_cache(dataset, cfg, request, directory, encoder)


def _extract_cache(dataset: CaptionDataset, cfg: FeatureConfig, request: dict, directory: Path, encoder: Optional[ImageEncoder]) -> FeatureCache:
    """Extract every split into `<directory>.tmp` and publish it as `directory` with one rename."""
    spec = EncoderSpec.from_config(cfg)
    if encoder is not None and encoder.spec.identity() != spec.identity():
        raise ValueError(f"build_feature_cache: the encoder given ({encoder.spec.identity()}) is not the configured one ({spec.identity()})")
    print(f"Feature cache: extracting {cfg.backbone} features ({spec.weights_tag}, {spec.input_size}px) into {directory}", flush=True)
    encoder = encoder or ImageEncoder(spec)
    fitted_here = encoder.normalizer is None
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started, skipped, splits, grid_shape = time.time(), [], {}, None
    for split in SPLITS:  # train first: its images fit the normalizer
        splits[split], shape = extract_split(encoder, dataset.split(split), tmp, split, cfg, skipped)
        grid_shape = grid_shape or shape
    if grid_shape is None or encoder.normalizer is None:
        raise ValueError(f"Dataset {dataset.name!r}: no image could be decoded; nothing to cache")
    encoder.normalizer.save(tmp / NORMALIZER_FILE)
    seconds = max(time.time() - started, 1e-9)
    files = [NORMALIZER_FILE] + [name for s in splits.values() for name in s["shards"]]
    manifest = {
        **request,
        "key": directory.name,
        "encoder": spec.to_dict(),
        "grid_shape": [int(d) for d in grid_shape],
        "shard_size": cfg.shard_size,
        "splits": splits,
        "skipped": skipped,
        "normalizer": "fitted on the training images" if fitted_here else "given (statistics of an earlier cache)",
        "files": {name: _file_entry(tmp / name) for name in files},
        "seconds": round(seconds, 2),
        "images_per_second": round(sum(s["count"] for s in splits.values()) / seconds, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(directory, ignore_errors=True)  # a stale entry with the same key
    os.replace(tmp, directory)
    if skipped:
        print(f"Feature cache: skipped {len(skipped)} unreadable images (listed in {directory / MANIFEST})", flush=True)
    return FeatureCache(directory, manifest)
