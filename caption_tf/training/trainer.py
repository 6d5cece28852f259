"""Training, top to bottom: dataset -> feature cache -> vocabulary -> tf.data -> fit.

Example:

```python
run_dir = train(load_config("minimal"))
sorted(p.name for p in run_dir.iterdir())
```
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from caption_tf import run_folder
from caption_tf.config import Config, profile_batch_range
from caption_tf.data.datasets import load_dataset
from caption_tf.data.images import load_rgb
from caption_tf.data.records import CaptionDataset
from caption_tf.data.text import CaptionVocabulary, clean_caption, truncation_warning
from caption_tf.features.cache import NORMALIZER_FILE, FeatureCache, build_feature_cache
from caption_tf.files import atomic_path
from caption_tf.models.decoder import build_decoder
from caption_tf.training import recovery, summaries
from caption_tf.training.autoconfig import resolve_auto_settings
from caption_tf.training.optimizers import FusedAdam
from caption_tf.training.pipeline import batch_count, caption_batches, captions_table, images_per_batch
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
from caption_tf.training.supervisor import EXIT_CHECKPOINT_FAILED


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
        per_image = [records[i].captions for i in self.cache.image_ids(split)]
        # One TextVectorization call for the split: one per image cost ~8 ms each (6 s for 720 images).
        encoded = self.vocab.encode([c for captions in per_image for c in captions])
        rows = np.split(encoded, np.cumsum([len(c) for c in per_image])[:-1]) if per_image else []
        return captions_table(rows, self.vocab.max_length)


def prepare_data(cfg: Config, replicas: int = 1) -> PreparedData:
    """Dataset, feature cache, the resolved config (`auto` settings derived from the data) and vocabulary.

    `cfg` is the requested config and is left unchanged; use `PreparedData.config` from here on.
    """
    dataset = load_dataset(cfg.data)
    details = "" if dataset.skips.summary() == "nothing skipped" else f" (details: {run_folder.SKIPS_FILE} in the run folder)"
    print(f"Dataset {dataset.summary()}{details}", flush=True)
    cache = build_feature_cache(dataset, cfg.features)
    records = dataset.by_id()
    train_captions = [c for i in cache.image_ids("train") for c in records[i].captions]
    if not train_captions:
        raise ValueError(f"Dataset {dataset.name!r} has no training image with captions")
    resolved = resolve_auto_settings(cfg, train_captions, len(cache.image_ids("train")), replicas)
    warning = truncation_warning(train_captions, resolved.text.max_length)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    vocab = CaptionVocabulary.build(train_captions, resolved.text)
    return PreparedData(resolved, dataset, cache, vocab)


def steps_per_epoch(data: PreparedData, split: str, cfg: Config, runtime: Runtime, captions=None) -> int:
    """Batches in one pass over the captions of `split`."""
    captions = data.captions(split) if captions is None else captions
    return batch_count(captions, batch_elements(cfg, runtime, captions), cfg.train.group_by_image)


def batch_elements(cfg: Config, runtime: Runtime, captions) -> int:
    """Rows of a global batch: images (each replica the same number) or (image, caption) pairs."""
    if cfg.train.group_by_image:
        return runtime.global_batch_size(images_per_batch(cfg.train.batch_size, captions))
    return runtime.global_batch_size(cfg.train.batch_size)


def make_split_dataset(
    data: PreparedData, split: str, cfg: Config, runtime: Runtime, training: bool, seed=None, captions=None
) -> tf.data.Dataset:
    """Batches of one split; `seed` (int or int64 tensor) defaults to `cfg.train.seed`.

    `captions` (`data.captions(split)`) may be passed in precomputed, e.g. when
    this is called inside a `tf.data` function (`recovery.epoch_feed`).
    """
    captions = data.captions(split) if captions is None else captions
    ds = caption_batches(
        data.cache.shards(split),
        data.cache.grid_shape,
        captions,
        batch_size=batch_elements(cfg, runtime, captions),
        group_by_image=cfg.train.group_by_image,
        shuffle=training,
        seed=cfg.train.seed if seed is None else seed,
        shuffle_buffer=cfg.train.shuffle_buffer,
        # Keep the decoded features in RAM when they fit; otherwise re-read the shards each epoch.
        cache=fits_in_memory(feature_bytes(len(data.cache.image_ids(split)), data.cache.grid_shape)),
    ).with_options(dataset_options(runtime.strategy))
    # Known length: progress bars show totals and schedules know the step count.
    return ds.apply(tf.data.experimental.assert_cardinality(steps_per_epoch(data, split, cfg, runtime, captions)))


def build_model(cfg: Config, data: PreparedData, runtime: Runtime, steps_per_epoch: int):
    # The same seed, however much randomness preparing the data used (e.g. building a backbone
    # for a fresh feature cache, which only one worker does): the same command always starts
    # from the same decoder.
    keras.utils.set_random_seed(cfg.train.seed)
    with runtime.strategy.scope():
        # Scheduled sampling reaches its probability halfway through the planned epochs.
        model = build_decoder(
            cfg.model, data.vocab.size, data.cache.grid_shape, data.vocab.max_length, recompute_grad=cfg.train.recompute_grad,
            sampling_ramp_steps=cfg.train.epochs * steps_per_epoch // 2,
        )
        # Linear scaling rule: the global batch grows with the replicas, so does the step size.
        learning_rate = learning_rate_for(cfg.train, steps_per_epoch, runtime.replicas)
        optimizer = FusedAdam(learning_rate, clipnorm=per_replica_clipnorm(cfg.train.clipnorm, runtime.replicas))
        # Under mixed_float16, compile wraps the optimizer in a LossScaleOptimizer.
        model.compile(optimizer=optimizer, jit_compile=runtime.jit_compile)
        model.optimizer.build(model.trainable_variables)  # slots now, in scope (also what a restore needs)
    keras_multi_worker_fixes(model, runtime.strategy)  # Keras 3 + MultiWorkerMirroredStrategy workaround
    return model


def make_callbacks(cfg: Config, run_dir: Path, axis: summaries.SummaryAxis, chief: bool = True) -> list[keras.callbacks.Callback]:
    """The loggers (TensorBoard on the chief only: one writer per curve) and early stopping."""
    tensorboard = summaries.TensorBoard(run_dir / run_folder.LOG_DIR, axis, profile_batch=profile_batch_range(cfg.train.profile_batches))
    callbacks = ([tensorboard] if chief else []) + [keras.callbacks.CSVLogger(str(run_dir / run_folder.HISTORY_FILE), append=True)]
    return callbacks + early_stopping(cfg.train)


def epoch_generator(vocab, eval_cfg) -> Callable:
    """model -> its `CaptionGenerator`, built once: the callbacks that decode every epoch (validation
    BLEU, TensorBoard's sample captions) share its traces (0.4-1.6 s each: `benchmarks/RESULTS.md`).
    It decodes as the run's test metrics and `evaluate.py` do (`eval.no_repeat_ngram`,
    `eval.block_repeated_mentions`), so early stopping on `val_bleu4` picks the epoch whose captions the user will get."""
    from caption_tf.models.decoding import CaptionGenerator

    return functools.lru_cache(maxsize=1)(lambda model: CaptionGenerator.for_vocabulary(
        model, vocab, no_repeat_ngram=eval_cfg.no_repeat_ngram, block_repeated_mentions=eval_cfg.block_repeated_mentions))


def sample_captions(data: PreparedData, run_dir: Path, axis: summaries.SummaryAxis, make_generator: Callable):
    """TensorBoard's per-epoch captions and attention grids of the first validation images, or None without a validation split."""
    ids = data.cache.image_ids("val")
    if not ids:
        return None
    records = data.dataset.by_id()
    grids = data.cache.load_split("val", fields=("grid",), limit=summaries.SAMPLE_IMAGES)["grid"]
    samples = summaries.sample_set(ids, [[clean_caption(c) for c in records[i].captions] for i in ids[: summaries.SAMPLE_IMAGES]], grids,
                                   lambda image_id: load_rgb(records[image_id].path), data.config.train.tensorboard_images)
    return summaries.SampleCaptions(run_dir / run_folder.LOG_DIR / summaries.VALIDATION_DIR, samples, data.vocab, axis,
                                    make_generator=make_generator)


def validation_bleu(data: PreparedData, cfg: Config, bleu: BleuFunction | None, make_generator: Callable):
    """The per-epoch val_bleu4 callback, or None without a scorer or validation split."""
    if bleu is None or not data.cache.image_ids("val"):
        return None
    records = data.dataset.by_id()
    references = [[clean_caption(c) for c in records[i].captions] for i in data.cache.image_ids("val")]
    grids = data.cache.load_split("val")["grid"]
    return validation_bleu_callback(grids, references, data.vocab, bleu, cfg.eval.eval_batch_size, make_generator)


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
    run_dir = run_folder.run_directory(requested)  # a plain name; the same for the resolved config
    run_folder.check_run_folder(run_dir)  # before any work: a folder that is not a run is never written to
    with worker_loss_reported(runtime.strategy):  # a worker that dies: one clear error, not a hang
        with run_folder.locked_run(run_dir, enabled=is_chief(runtime.strategy)):  # the chief holds it for the job
            return _train_locked(requested, bleu, runtime, run_dir)


def _train_locked(requested: Config, bleu: BleuFunction | None, runtime: Runtime, run_dir: Path) -> Path:
    data = prepare_data(requested, runtime.replicas)
    cfg = data.config  # resolved: every value below is final
    chief = is_chief(runtime.strategy)
    identity = run_folder.RunIdentity.of(cfg, data.vocab.fingerprint(), data.cache.fingerprint, runtime.replicas)
    complete = False
    if chief:  # only the chief decides about the run folder and writes it; other workers follow
        # Resume, refuse (different settings), or report a completed run: before any file is rewritten.
        previous = run_folder.read_run_info(run_dir, missing_ok=True)
        plan = recovery.plan_run(cfg, run_dir, identity, previous)
        if plan.message:
            print(plan.message, flush=True)
        complete = plan.complete
        if not complete:
            kept = {k: previous[k] for k in ("phases", "resume_overrides") if k in previous and plan.moved_to is None}
            save_run_files(cfg, data, runtime, identity, run_dir, kept)
    if broadcast_from_chief(runtime.strategy, int(complete)):  # a barrier too: the chief has decided and written
        return run_dir
    remove_worker_dir(run_dir, runtime.strategy)  # what a killed run of this worker left
    try:
        return _fit_and_publish(cfg, data, runtime, run_dir, identity, bleu)
    finally:
        remove_worker_dir(run_dir, runtime.strategy)


def save_run_files(cfg: Config, data: PreparedData, runtime: Runtime, identity: run_folder.RunIdentity, run_dir: Path, kept: dict) -> None:
    """config.yaml, vocab.json, run.json, the feature statistics and skips.json of a run about to train."""
    run_folder.save_run_files(
        run_dir,
        cfg,
        data.vocab,
        {
            **kept,
            "grid_shape": list(data.cache.grid_shape),
            "feature_cache": str(data.cache.directory),
            "feature_fingerprint": data.cache.fingerprint,
            "encoder": data.cache.manifest["encoder"],  # with feature_normalizer.npz: new images are encoded like the cache
            "dataset_fingerprint": data.dataset.fingerprint(),
            "vocab_fingerprint": data.vocab.fingerprint(),
            "vocab_size": data.vocab.size,
            "precision": runtime.precision,
            "replicas": runtime.replicas,
            "status": "training",
            "epochs_target": cfg.train.epochs,
            **identity.metadata(),
        },
    )
    with atomic_path(run_dir / run_folder.FEATURE_NORMALIZER_FILE) as tmp:
        shutil.copyfile(data.cache.directory / NORMALIZER_FILE, tmp)
    data.dataset.skips.skipped_images.extend(data.cache.skipped())
    data.dataset.skips.save(run_dir / run_folder.SKIPS_FILE)


def _fit_and_publish(cfg: Config, data: PreparedData, runtime: Runtime, run_dir: Path, identity: run_folder.RunIdentity, bleu) -> Path:
    """Build, restore and fit the model; the chief publishes the weights and the final run.json."""
    chief = is_chief(runtime.strategy)
    write_dir = worker_write_dir(run_dir, runtime.strategy)  # the chief: run_dir itself
    train_captions = data.captions("train")  # tokenised once: the step count and every epoch's batches
    train_steps = steps_per_epoch(data, "train", cfg, runtime, train_captions)
    val_ds = make_split_dataset(data, "val", cfg, runtime, training=False) if data.cache.image_ids("val") else None
    model = build_model(cfg, data, runtime, steps_per_epoch=train_steps)
    print(f"Decoder: {cfg.model.label}, {model.count_params():,} parameters, vocabulary {data.vocab.size}")

    # Verified checkpoints every --checkpoint-every batches and each epoch, exact resume, NaN guard, health monitor.
    axis = summaries.SummaryAxis()  # phase 1 starts TensorBoard's curves
    make_generator = epoch_generator(data.vocab, cfg.eval)
    callbacks = schedule_callbacks(cfg.train, validation_bleu(data, cfg, bleu, make_generator), val_ds is not None)
    callbacks += make_callbacks(cfg, write_dir, axis, chief)
    samples = sample_captions(data, run_dir, axis, make_generator) if chief else None
    session = recovery.ResumableTraining(
        model, run_dir, run_dir / run_folder.CHECKPOINT_DIR, cfg, identity, train_steps, callbacks + ([samples] if samples else []),
        runtime.strategy, write_dir / run_folder.LOG_DIR, axis=axis,
    )
    start = session.restore()
    if chief and axis.global_step() == 0:  # a fresh run: its HParams record (kept by a resume)
        hparams = summaries.run_hparams(cfg, data.vocab.size, runtime.replicas, runtime.precision)
        summaries.write_hparams(run_dir / run_folder.LOG_DIR, hparams, trial_id=run_dir.name)
    apply_resume_overrides(model, cfg, session.overrides(), train_steps, runtime, run_dir, step=session.backup.position["step"], chief=chief)
    run_folder.trim_history(write_dir / run_folder.HISTORY_FILE, start[0])  # epochs trained again
    started = time.time()

    def make_epoch(epoch):  # epoch e is shuffled with seed + e: a resumed run replays it exactly
        return make_split_dataset(data, "train", cfg, runtime, True, seed=cfg.train.seed + epoch, captions=train_captions)

    try:
        session.fit(make_epoch, cfg.train.epochs, val_ds, dataset_options=dataset_options(runtime.strategy))
    finally:
        stopped = session.finish_status()
    if stopped is not None:
        if chief:
            if stopped.exit_code == EXIT_CHECKPOINT_FAILED:
                run_folder.release_disk_reserve(run_dir)  # room for run.json on a full disk
            with contextlib.suppress(OSError):
                run_folder.update_run_info(run_dir, status=stopped.status)
        raise stopped
    if chief:
        with atomic_path(run_dir / run_folder.WEIGHTS_FILE) as tmp:
            model.save_weights(tmp)
        # checkpoint_seconds: how long every save of this process, and the waits for their background writes, held training up.
        run_folder.record_weights(run_dir, status="complete", train_seconds=round(time.time() - started, 1), epochs_run=session.epochs_done,
                                  steps_run=session.backup.position["step"], checkpoint_seconds=round(session.backup.blocking_seconds, 2))
    return run_dir


def apply_resume_overrides(model, cfg: Config, changes: dict, train_steps: int, runtime: Runtime, run_dir: Path, step: int, chief: bool = True) -> None:
    """A resumed run may change --learning-rate and --clipnorm (the NaN advice); say so and record it in run.json (the chief).

    The optimizer was built with the new values; only the learning-rate variable came back from the checkpoint.
    """
    if not changes:
        return
    print("Resuming with changed settings: " + ", ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changes.items()), flush=True)
    if "learning_rate" in changes and cfg.train.lr_schedule != "warmup_cosine":  # a schedule is not checkpointed
        model.optimizer.learning_rate = learning_rate_for(cfg.train, train_steps, runtime.replicas)
    if not chief:
        return
    history = run_folder.read_run_info(run_dir).get("resume_overrides", [])
    run_folder.update_run_info(run_dir, resume_overrides=history + [{"step": step, **changes}])
