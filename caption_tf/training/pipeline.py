"""The training input pipeline: cached feature shards + tokenised captions -> teacher-forcing batches.

The pipeline is pure TensorFlow ops (no `py_function`), so its iterator can
be checkpointed with `tf.train.Checkpoint` and a resumed run continues with
the exact next batch. Each element is `((grid, input_tokens), target_tokens)`
with teacher forcing: inputs are tokens[:-1], targets tokens[1:]. A row is one
(grid, caption) pair, tokens [B, T]; with `group_by_image` (`train.group_by_image`)
a row is a whole image, grid [images, cells, C] and tokens [images, refs, T] (every
reference caption of the image), so the decoder encodes each grid once for all its
captions (`models.base.group_captions`). The shards are read with
`caption_tf.features.tfrecords`, which owns their format.

Example:

```python
ds = caption_batches(shards, (64, 2048), captions, batch_size=6, shuffle=True, seed=1, group_by_image=True)
(grid, inputs), targets = next(iter(ds))   # grid [6, 64, 2048], inputs and targets [6, refs, T - 1]
```
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from caption_tf.features.tfrecords import read_feature_shards


def captions_table(token_rows: Sequence[np.ndarray], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-image caption token arrays into [images, max_refs, max_length] plus a valid mask."""
    max_refs = max((len(r) for r in token_rows), default=1)
    table = np.zeros((len(token_rows), max_refs, max_length), np.int32)
    valid = np.zeros((len(token_rows), max_refs), bool)
    for i, rows in enumerate(token_rows):
        table[i, : len(rows)] = rows
        valid[i, : len(rows)] = True
    return table, valid


def images_per_batch(captions_per_batch: int, captions: tuple[np.ndarray, np.ndarray]) -> int:
    """Whole images closest to `captions_per_batch` captions, at the table's references per image.

    >>> table = captions_table([np.ones((5, 4), np.int32)], max_length=4)
    >>> images_per_batch(64, table), images_per_batch(32, table), images_per_batch(2, table)
    (13, 6, 1)
    """
    return max(1, round(captions_per_batch / captions[0].shape[1]))


def batch_count(captions: tuple[np.ndarray, np.ndarray], batch_size: int, group_by_image: bool) -> int:
    """Batches in one pass of `caption_batches` over `captions` (`batch_size` as given to it).

    >>> table = captions_table([np.ones((5, 4), np.int32), np.ones((2, 4), np.int32)], max_length=4)
    >>> batch_count(table, 4, group_by_image=False), batch_count(table, 1, group_by_image=True)
    (2, 2)
    """
    valid = captions[1]
    examples = valid.any(axis=1).sum() if group_by_image else valid.sum()
    return math.ceil(int(examples) / batch_size)


def caption_batches(
    shards: Sequence[str],
    grid_shape: tuple[int, int],
    captions: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 4096,
    cache: bool = True,
    drop_remainder: bool = False,
    group_by_image: bool = False,
) -> tf.data.Dataset:
    """Teacher-forcing batches: whole images with all their captions, or (image, caption) pairs.

    Args:
        shards: the split's feature shards.
        grid_shape: (cells, channels) of a grid.
        captions: `captions_table(...)` in the order of the shard `index` field.
        batch_size: images per batch with `group_by_image` (`images_per_batch`), else pairs.
        shuffle, seed, shuffle_buffer: shuffle the images (or pairs) each pass.
        cache: keep the decoded features in memory after the first pass.
        drop_remainder: drop a last, smaller batch.
        group_by_image: rows are images, tokens [images, refs, T] (see the module docstring).
    """
    table, valid = (tf.constant(a) for a in captions)
    images = read_feature_shards(shards, grid_shape)
    if cache:  # features fit in memory for the datasets we train on; saves re-reading shards
        images = images.cache()

    def expand(index, grid):  # one row per reference slot: (grid, caption, slot holds a caption)
        refs = table[index]
        grids = tf.repeat(grid[None], tf.shape(refs)[0], axis=0)
        return tf.data.Dataset.from_tensor_slices((grids, refs, valid[index]))

    if group_by_image:  # one row per image: (grid, all its reference slots, it has a caption)
        rows = images.map(lambda index, grid: (grid, table[index], tf.reduce_any(valid[index])))
    else:
        rows = images.flat_map(expand)
    rows = rows.filter(lambda g, t, ok: ok)
    if shuffle:
        rows = rows.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    rows = rows.batch(batch_size, drop_remainder=drop_remainder)
    return rows.map(lambda g, t, ok: ((g, t[..., :-1]), t[..., 1:]), num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE
    )
