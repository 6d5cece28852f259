"""One training epoch from the feature cache vs one that recomputes the features every step.

Both epochs train the same decoder (minimal preset: LSTM + Bahdanau, 128 units, batch 32,
max length 15) on the same (image, caption) pairs of a generated shapes dataset:

- cache: the project's own path. `prepare_data` extracts the features once into the
  sharded TFRecord cache (not timed: it is paid once per dataset/backbone), then
  `make_split_dataset` (`caption_batches`) + `CaptionDecoder.fit` for one epoch.
- images: every step reads and decodes the PNGs of its batch (tf.data, parallel), runs
  the backbone forward pass (the cache's traced extractor), standardises the grid like
  the cache does, and runs the same compiled decoder train step (`common.train_step`).

Both are timed after a warm-up (one cached epoch, one extractor call) so tracing is
not counted. Backbone weights are `none` (random init: same arithmetic as ImageNet).

    python benchmarks/bench_cache.py [--images 200] [--backbone inception_v3] [--input-size 299]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import quiet_tensorflow, report, train_step

quiet_tensorflow()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caption_tf.config import load_config  # noqa: E402
from caption_tf.features.backbones import build_extractor  # noqa: E402
from caption_tf.features.encoder import compiled_extractor  # noqa: E402
from caption_tf.training.runtime import setup_runtime  # noqa: E402
from caption_tf.training.trainer import build_model, make_split_dataset, prepare_data  # noqa: E402


def image_pairs(data, size: int, batch_size: int, seed: int) -> tf.data.Dataset:
    """((image uint8, input tokens), target tokens) batches of the training pairs, decoded from the files."""
    records = data.dataset.by_id()
    table, valid = data.captions("train")
    paths, tokens = [], []
    for image_id, rows, ok in zip(data.cache.image_ids("train"), table, valid):
        for row in rows[ok]:
            paths.append(records[image_id].path)
            tokens.append(row)

    def decode(path, row):
        image = tf.image.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = tf.cast(tf.image.resize(image, (size, size)), tf.uint8)
        return (image, row[:-1]), row[1:]

    ds = tf.data.Dataset.from_tensor_slices((paths, np.stack(tokens))).shuffle(len(paths), seed=seed)
    return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE), len(paths)


def image_epoch(model, extractor, normalizer, batches) -> float:
    """Seconds for one epoch that recomputes the features from the images at every step."""
    infer = compiled_extractor(extractor)
    mean, std = tf.constant(normalizer.mean), tf.constant(normalizer.std)
    started = time.perf_counter()
    for (images, inputs), targets in batches:
        grid, _ = infer(images)
        grid = tf.cast((grid - mean) / std, tf.float16)  # what the cache stores
        train_step(model, (grid, inputs), targets)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="shapes scenes generated (80%% are training images)")
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--input-size", type=int, default=299)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("minimal", {
            "num_images": args.images, "data_dir": f"{tmp}/data", "cache_dir": f"{tmp}/cache",
            "backbone": args.backbone, "weights": "none", "input_size": args.input_size,
        })
        runtime = setup_runtime(cfg.train)
        data = prepare_data(cfg, runtime.replicas)  # extracts the cache once (not timed)
        cfg = data.config  # the resolved config
        train = make_split_dataset(data, "train", cfg, runtime, training=True)
        steps = int(train.cardinality())
        model = build_model(cfg, data, runtime, steps)
        model.fit(train, epochs=1, verbose=0)  # warm-up: traces the train step, fills the RAM cache
        started = time.perf_counter()
        model.fit(train, epochs=1, verbose=0)
        cache_seconds = time.perf_counter() - started

        extractor = build_extractor(cfg.features.backbone, "none", cfg.features.input_size)
        batches, pairs = image_pairs(data, extractor.input_size, cfg.train.batch_size, cfg.train.seed)
        (images, _), _ = next(iter(batches))
        compiled_extractor(extractor)(images)  # warm-up: traces the extractor
        images_seconds = image_epoch(model, extractor, data.cache.normalizer(), batches)

    rows = [
        {"epoch": "from feature cache (caption_batches + fit)", "pairs": pairs, "steps": steps,
         "seconds": cache_seconds, "ms/step": cache_seconds / steps * 1000, "x": 1.0},
        {"epoch": "recompute features (decode + backbone + decoder step)", "pairs": pairs, "steps": steps,
         "seconds": images_seconds, "ms/step": images_seconds / steps * 1000, "x": images_seconds / cache_seconds},
    ]
    report("cache", rows, {
        "setting": f"{args.images} shapes images, {args.backbone} {extractor.input_size} px (weights none), "
                   f"grid {data.cache.grid_shape}, decoder {cfg.model.decoder}+{cfg.model.attention} {cfg.model.units} units, "
                   f"batch {cfg.train.batch_size}, max length {cfg.text.max_length}",
        "speed-up (cache vs recompute)": f"{images_seconds / cache_seconds:.1f}x",
        "goal": "cache >= 20x faster per epoch",
    })


if __name__ == "__main__":
    main()
