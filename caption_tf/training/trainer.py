"""Training, top to bottom: dataset -> feature cache -> vocabulary -> tf.data -> fit.

Example:

>>> run_dir = train(load_config("minimal"))
>>> sorted(p.name for p in run_dir.iterdir())
['config.yaml', 'history.csv', 'logs', 'model.weights.h5', 'run.json', 'skips.json', 'vocab.json']
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from caption_tf import run_folder
from caption_tf.config import Config
from caption_tf.data.datasets import load_dataset
from caption_tf.data.records import CaptionDataset
from caption_tf.data.text import CaptionVocabulary, clean_caption
from caption_tf.features.cache import FeatureCache, build_feature_cache
from caption_tf.files import atomic_path
from caption_tf.models.decoder import build_decoder
from caption_tf.training import recovery
from caption_tf.training.autoconfig import resolve_auto_settings
from caption_tf.training.pipeline import caption_batches, captions_table
from caption_tf.training.runtime import (
    Runtime,
    broadcast_from_chief,
    dataset_options,
    feature_bytes,
    fits_in_memory,
    is_chief,
    keras_multi_worker_fixes,
    per_replica_clipnorm,
    remove_worker_dir,
    setup_runtime,
    worker_loss_reported,
    worker_write_dir,
)
from caption_tf.training.schedules import BleuFunction, early_stopping, learning_rate_for, schedule_callbacks, validation_bleu_callback
from caption_tf.training.supervisor import TrainingStopped


@dataclass
class PreparedData:
    """What training reads: the resolved config, the dataset, its feature cache and the vocabulary."""

    config: Config  # resolved: no `auto` left; the vocabulary's max_length is the caption length
    dataset: CaptionDataset
    cache: FeatureCache
    vocab: CaptionVocabulary

    def captions(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Token table aligned with the cache's image order for `split`."""
        records = self.dataset.by_id()
        rows = [self.vocab.encode(records[i].captions) for i in self.cache.image_ids(split)]
        return captions_table(rows, self.vocab.max_length)

    def pair_count(self, split: str) -> int:
        records = self.dataset.by_id()
        return sum(len(records[i].captions) for i in self.cache.image_ids(split))


def prepare_data(cfg: Config, replicas: int = 1) -> PreparedData:
    """Dataset, feature cache, the resolved config (`auto` settings derived from the data) and vocabulary.

    `cfg` is the requested config and is left unchanged; use `PreparedData.config` from here on.
    """
    dataset = load_dataset(cfg.data)
    print(dataset.summary(), flush=True)
    cache = build_feature_cache(dataset, cfg.features)
    records = dataset.by_id()
    train_captions = [c for i in cache.image_ids("train") for c in records[i].captions]
    if not train_captions:
        raise ValueError(f"Dataset {dataset.name!r} has no training image with captions")
    resolved = resolve_auto_settings(cfg, train_captions, len(cache.image_ids("train")), replicas)
    vocab = CaptionVocabulary.build(train_captions, resolved.text)
    return PreparedData(resolved, dataset, cache, vocab)


def steps_per_epoch(data: PreparedData, split: str, cfg: Config, runtime: Runtime) -> int:
    """Batches in one pass over the (image, caption) pairs of `split`."""
    return math.ceil(data.pair_count(split) / runtime.global_batch_size(cfg.train.batch_size))


def make_split_dataset(
    data: PreparedData, split: str, cfg: Config, runtime: Runtime, training: bool, seed=None, captions=None
) -> tf.data.Dataset:
    """Batches of one split; `seed` (int or int64 tensor) defaults to `cfg.train.seed`.

    `captions` (`data.captions(split)`) may be passed in precomputed, e.g. when
    this is called inside a `tf.data` function (`recovery.epoch_feed`).
    """
    ds = caption_batches(
        data.cache.shards(split),
        data.cache.grid_shape,
        data.captions(split) if captions is None else captions,
        batch_size=runtime.global_batch_size(cfg.train.batch_size),
        shuffle=training,
        seed=cfg.train.seed if seed is None else seed,
        shuffle_buffer=cfg.train.shuffle_buffer,
        # Keep the decoded features in RAM when they fit; otherwise re-read the shards each epoch.
        cache=fits_in_memory(feature_bytes(len(data.cache.image_ids(split)), data.cache.grid_shape)),
    ).with_options(dataset_options(runtime.strategy))
    # Known length: progress bars show totals and schedules know the step count.
    return ds.apply(tf.data.experimental.assert_cardinality(steps_per_epoch(data, split, cfg, runtime)))


def build_model(cfg: Config, data: PreparedData, runtime: Runtime, steps_per_epoch: int):
    # Reseed: the initial weights must not depend on what ran before in this process
    # (e.g. extracting the feature cache with a randomly initialised backbone).
    keras.utils.set_random_seed(cfg.train.seed)
    with runtime.strategy.scope():
        model = build_decoder(
            cfg.model, data.vocab.size, data.cache.grid_shape, data.vocab.max_length, recompute_grad=cfg.train.recompute_grad
        )
        # Linear scaling rule: the global batch grows with the replicas, so does the step size.
        learning_rate = learning_rate_for(cfg.train, steps_per_epoch, runtime.replicas)
        optimizer = keras.optimizers.Adam(learning_rate, clipnorm=per_replica_clipnorm(cfg.train.clipnorm, runtime.replicas))
        # Under mixed_float16, compile wraps the optimizer in a LossScaleOptimizer.
        model.compile(optimizer=optimizer, jit_compile=runtime.jit_compile)
        model.optimizer.build(model.trainable_variables)  # slots now, in scope (also what a restore needs)
    keras_multi_worker_fixes(model, runtime.strategy)  # Keras 3 + MultiWorkerMirroredStrategy workaround
    return model


def make_callbacks(cfg: Config, run_dir: Path) -> list[keras.callbacks.Callback]:
    callbacks = [
        keras.callbacks.TensorBoard(str(run_dir / run_folder.LOG_DIR), update_freq="epoch"),
        keras.callbacks.CSVLogger(str(run_dir / run_folder.HISTORY_FILE), append=True),
    ]
    return callbacks + early_stopping(cfg.train)


def validation_bleu(data: PreparedData, cfg: Config, bleu: BleuFunction | None):
    """The per-epoch val_bleu4 callback, or None without a scorer or validation split."""
    if bleu is None or not data.cache.image_ids("val"):
        return None
    records = data.dataset.by_id()
    references = [[clean_caption(c) for c in records[i].captions] for i in data.cache.image_ids("val")]
    grids = data.cache.load_split("val")["grid"]
    return validation_bleu_callback(grids, references, data.vocab, bleu, cfg.eval.eval_batch_size)


def train(requested: Config, bleu: BleuFunction | None = None) -> Path:
    """Train a decoder as configured; returns the run folder.

    `requested` is left unchanged; training uses its resolved copy (`prepare_data`).
    `bleu` (e.g. `caption_tf.evaluation.metrics.corpus_bleu_scores`) enables the
    per-epoch `val_bleu4` (needed by `--early-stopping-monitor val_bleu4`).
    In a multi-worker job every worker calls it: only the chief writes the run folder
    (`runtime.is_chief`), the others train alongside and write only into their
    `runtime.worker_write_dir`, deleted at the end (docs/distributed.md).
    """
    runtime = setup_runtime(requested.train)
    print(f"Runtime: {runtime.replicas} replica(s), precision {runtime.precision}, XLA {'on' if runtime.jit_compile else 'off'}")
    with worker_loss_reported(runtime.strategy):  # a worker that dies: one clear error, not a hang
        return _train(requested, runtime, bleu)


def _train(requested: Config, runtime: Runtime, bleu: BleuFunction | None) -> Path:
    data = prepare_data(requested, runtime.replicas)
    cfg = data.config  # resolved: every value below is final
    run_dir = run_folder.run_directory(cfg)
    chief = is_chief(runtime.strategy)
    identity = recovery.RunIdentity.of(cfg, data.vocab.fingerprint(), data.cache.fingerprint, runtime.replicas)
    complete = False
    if chief:  # only the chief decides about the run folder and writes it; other workers follow
        # Resume, refuse (different settings), or report a completed run: before any file is rewritten.
        plan = recovery.plan_run(cfg, run_dir, identity, recovery.read_run_info(run_dir))
        if plan.message:
            print(plan.message, flush=True)
        complete = plan.complete
    if broadcast_from_chief(runtime.strategy, int(complete)):  # a barrier too: the chief has decided
        return run_dir
    if chief:
        run_folder.save_run_files(run_dir, cfg, data.vocab, run_info(cfg, data, runtime, identity))
        data.dataset.skips.skipped_images.extend(data.cache.skipped())
        data.dataset.skips.save(run_dir / run_folder.SKIPS_FILE)
    write_dir = worker_write_dir(run_dir, runtime.strategy)  # the chief: run_dir itself
    remove_worker_dir(run_dir, runtime.strategy)  # what a killed run of this worker left
    try:
        return _fit_and_publish(cfg, data, runtime, run_dir, write_dir, identity, bleu)
    finally:
        remove_worker_dir(run_dir, runtime.strategy)


def run_info(cfg: Config, data: PreparedData, runtime: Runtime, identity: recovery.RunIdentity) -> dict:
    """The run.json of a run about to train."""
    return {
        "grid_shape": list(data.cache.grid_shape),
        "feature_cache": str(data.cache.directory),
        "feature_fingerprint": data.cache.fingerprint,
        "dataset_fingerprint": data.dataset.fingerprint(),
        "vocab_fingerprint": data.vocab.fingerprint(),
        "vocab_size": data.vocab.size,
        "precision": runtime.precision,
        "replicas": runtime.replicas,
        "status": "training",
        "epochs_target": cfg.train.epochs,
        **identity.metadata(),
    }


def _fit_and_publish(cfg, data, runtime, run_dir, write_dir, identity, bleu) -> Path:
    """Build, restore and fit the model; the chief publishes the weights and the final run.json."""
    chief = is_chief(runtime.strategy)
    train_steps = steps_per_epoch(data, "train", cfg, runtime)
    val_ds = make_split_dataset(data, "val", cfg, runtime, training=False) if data.cache.image_ids("val") else None
    model = build_model(cfg, data, runtime, steps_per_epoch=train_steps)
    print(f"Decoder: {cfg.model.decoder} + {cfg.model.attention}, {model.count_params():,} parameters, vocabulary {data.vocab.size}")

    # Checkpoints (every --checkpoint-every batches and each epoch), NaN guard, health monitor.
    session = recovery.RecoverySession(model, run_dir, cfg, identity, train_steps, write_dir / run_folder.LOG_DIR)
    start = session.restore()
    recovery.trim_history(write_dir / run_folder.HISTORY_FILE, start[0])  # epochs trained again
    started = time.time()
    callbacks = schedule_callbacks(cfg.train, validation_bleu(data, cfg, bleu), val_ds is not None) + make_callbacks(cfg, write_dir)

    train_captions = data.captions("train")

    def make_epoch(epoch_seed):  # epoch e is shuffled with seed + e: a resumed run replays it exactly
        return make_split_dataset(data, "train", cfg, runtime, True, seed=cfg.train.seed + epoch_seed, captions=train_captions)

    lost = None
    try:
        with worker_loss_reported(runtime.strategy):  # a dead worker: a clear error, not a hang
            recovery.fit_from_position(
                model, make_epoch, start, train_steps, cfg.train.epochs, val_ds,
                session.callbacks(callbacks), session.checkpoint_callback, dataset_options=dataset_options(runtime.strategy),
            )
    except TrainingStopped as err:  # another worker died; the last checkpoint stays the resume point
        lost = err
    finally:
        stopped = session.finish_status()
    stopped = lost or stopped
    if stopped is not None:
        if chief:
            run_folder.update_run_info(run_dir, status=stopped.status)
        raise stopped
    if chief:
        with atomic_path(run_dir / run_folder.WEIGHTS_FILE) as tmp:
            model.save_weights(tmp)
        run_folder.update_run_info(
            run_dir, status="complete", train_seconds=round(time.time() - started, 1), epochs_run=session.epochs_done
        )
    return run_dir
