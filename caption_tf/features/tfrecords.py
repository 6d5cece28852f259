"""The feature-record format: one `tf.train.Example` per image in the feature cache's TFRecord shards.

This module owns the format: its spec, the writer (`features/cache.py`
extracts and writes) and the pure-TF parser (the training pipeline and the
evaluation read with it).

    index     int64     position of the image in its split (the captions table is aligned with it)
    image_id  bytes     the dataset's image id
    grid      bytes     float16 [H*W, C] standardised backbone grid
    pooled    bytes     float16 [C] its mean over the cells

Shards are named `<split>-00000.tfrecord`, `<split>-00001.tfrecord`, ...

Example:

```python
writer = ShardWriter(directory, "train", shard_size=512)
writer.write(serialize_feature_example(0, "img1", grid, grid.mean(0))); writer.close()
index, grid = next(iter(read_feature_shards([str(directory / writer.shards[0])], grid.shape)))
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

STORED_DTYPE = np.float16  # grids and pooled vectors are stored (and fed to the decoder) at this precision

FEATURE_SPEC = {
    "index": tf.io.FixedLenFeature([], tf.int64),
    "image_id": tf.io.FixedLenFeature([], tf.string),
    "grid": tf.io.FixedLenFeature([], tf.string),
    "pooled": tf.io.FixedLenFeature([], tf.string),
}


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def serialize_feature_example(index: int, image_id: str, grid: np.ndarray, pooled: np.ndarray) -> bytes:
    """One image's record; grids are stored as float16."""
    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[index])),
                "image_id": _bytes(image_id.encode()),
                "grid": _bytes(grid.astype(STORED_DTYPE).tobytes()),
                "pooled": _bytes(pooled.astype(STORED_DTYPE).tobytes()),
            }
        )
    ).SerializeToString()


class ShardWriter:
    """Writes `split-00000.tfrecord`, `split-00001.tfrecord`, ... of at most `shard_size` records."""

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


def write_shard(path: Path, payloads: Sequence[bytes]) -> None:
    """One shard file holding `payloads` in order (used to rewrite a damaged shard)."""
    with tf.io.TFRecordWriter(str(path)) as writer:
        for payload in payloads:
            writer.write(payload)


def parse_feature_example(serialized, grid_shape, fields: Sequence[str] = tuple(FEATURE_SPEC)) -> dict:
    """Pure-TF parser of a feature record; only `fields` are read (the training path needs two)."""
    ex = tf.io.parse_single_example(serialized, {k: FEATURE_SPEC[k] for k in fields})
    cells, dim = grid_shape
    if "grid" in ex:
        ex["grid"] = tf.reshape(tf.io.decode_raw(ex["grid"], tf.float16), (cells, dim))
    if "pooled" in ex:
        ex["pooled"] = tf.reshape(tf.io.decode_raw(ex["pooled"], tf.float16), (dim,))
    return ex


def read_feature_shards(shards: Sequence[str], grid_shape: tuple[int, int]) -> tf.data.Dataset:
    """(index, grid float16) per image, shards read in parallel, order deterministic."""

    def parse(raw):
        ex = parse_feature_example(raw, grid_shape, fields=("index", "grid"))
        return ex["index"], ex["grid"]

    files = tf.data.Dataset.from_tensor_slices(list(shards))
    records = files.interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(shards), 4) or 1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def feature_batches(shards: Sequence[str], grid_shape: tuple[int, int], batch_size: int) -> tf.data.Dataset:
    """(index, grid) batches, one per image, for decoding and evaluation."""
    return read_feature_shards(shards, grid_shape).batch(batch_size).prefetch(tf.data.AUTOTUNE)
