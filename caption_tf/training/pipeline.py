"""The training input pipeline: cached feature shards + tokenised captions -> teacher-forcing batches.

The pipeline is pure TensorFlow ops (no `py_function`), so its iterator can
be checkpointed with `tf.train.Checkpoint` and a resumed run continues with
the exact next batch. Each element is `((grid, input_tokens), target_tokens)`
with teacher forcing: inputs are tokens[:-1], targets tokens[1:]. The shards
are read with `caption_tf.features.tfrecords`, which owns their format.

Example:

```python
ds = caption_batches(shards, (64, 2048), captions, batch_size=32, shuffle=True, seed=1)
(grid, inputs), targets = next(iter(ds))
```
"""

from __future__ import annotations

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
) -> tf.data.Dataset:
    """One element per (image, reference caption) pair, batched for teacher forcing.

    `captions` is `captions_table(...)` in the order of the shard `index` field.
    """
    table, valid = (tf.constant(a) for a in captions)
    images = read_feature_shards(shards, grid_shape)
    if cache:  # features fit in memory for the datasets we train on; saves re-reading shards
        images = images.cache()

    def expand(index, grid):
        refs = table[index]
        grids = tf.repeat(grid[None], tf.shape(refs)[0], axis=0)
        return tf.data.Dataset.from_tensor_slices((grids, refs, valid[index]))

    pairs = images.flat_map(expand).filter(lambda g, t, ok: ok)
    if shuffle:
        pairs = pairs.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    pairs = pairs.batch(batch_size, drop_remainder=drop_remainder)
    return pairs.map(lambda g, t, ok: ((g, t[:, :-1]), t[:, 1:]), num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE
    )
