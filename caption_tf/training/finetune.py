"""Two-phase training: decoder on cached features, then backbone + decoder end to end.

Phase 1 (`decoder`) is the ordinary trainer: the decoder learns on frozen,
cached backbone features. Phase 2 (`fine_tune`, when `--fine-tune-layers N`
> 0) unfreezes the last N layers of the backbone (BatchNormalization layers
stay frozen: their running statistics would drift on small batches) and
trains backbone + decoder on images with teacher forcing at
`--fine-tune-learning-rate` for `--fine-tune-epochs`. Each image passes the
backbone once per step and its grid is shared by all its reference captions.

Phase 2 writes into the run folder:

    backbone.weights.h5          the fine-tuned backbone (include_top=False)
    decoder_phase1.weights.h5    the decoder after phase 1 (phase 2 restarts from it)
    model.weights.h5             the decoder after phase 2
    history_fine_tune.csv        per-epoch phase-2 metrics

TensorBoard: phase 2 continues the phase-1 curves in `logs/` (its epochs and
steps come after phase 1's, `summaries.SummaryAxis`), captions and attention
of the same validation images included.

and re-extracts the feature cache with the fine-tuned backbone (standardised
with the phase-1 statistics the decoder was trained with), then points the
run's `config.yaml` (`features.weights`) and `run.json` (`feature_cache`) at
it, so `evaluate.py` scores the fine-tuned model unchanged.

Each phase has its own completion marker in `run.json` (`phases`), keyed by a
hash of the requested configuration: rerunning the same command after a
crash skips a completed phase 1 and resumes phase 2 exactly where it stopped,
through the same resume path as phase 1 (`recovery.ResumableTraining`, verified
checkpoints in `checkpoints_fine_tune/`).

Example:

```python
run_dir = train_in_phases(load_config("optimized", {"weights": "none"}))
(run_dir / "backbone.weights.h5").exists()
```
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from caption_tf import run_folder
from caption_tf.config import Config, save_config
from caption_tf.data.datasets import load_dataset
from caption_tf.data.images import load_rgb
from caption_tf.features.backbones import FeatureExtractor
from caption_tf.features.cache import FeatureCache, build_feature_cache, cache_request, open_cache, repair_cache
from caption_tf.features.encoder import EncoderSpec, ImageEncoder
from caption_tf.files import atomic_path, file_sha256, stable_hash
from caption_tf.models.base import flat_captions
from caption_tf.models.decoder import build_decoder
from caption_tf.models.decoding import CaptionGenerator
from caption_tf.run_folder import (
    BACKBONE_WEIGHTS_FILE,
    FINE_TUNE_CHECKPOINT_DIR,
    FINE_TUNE_HISTORY_FILE,
    PHASE1_WEIGHTS_FILE,
    config_hash,
)
from caption_tf.config import profile_batch_range
from caption_tf.data.text import clean_caption
from caption_tf.training import recovery, summaries
from caption_tf.training.optimizers import FusedAdam
from caption_tf.training.pipeline import captions_table
from caption_tf.training.runtime import cluster_workers, is_chief, process_is_chief, setup_runtime
from caption_tf.training.schedules import BleuFunction, LearningRateLogger
from caption_tf.training.trainer import train

PHASE_DECODER, PHASE_FINE_TUNE = "decoder", "fine_tune"


# ------------------------------------------------------------------ freezing


def unfreeze_last_layers(backbone: keras.Model, count: int) -> list[str]:
    """Make only the last `count` layers trainable, BatchNormalization excluded; returns their names.

    Example:

    ```python
    names = unfreeze_last_layers(build_backbone("mobilenet_v3_small", "none", 32), 10)
    ```
    """
    if count < 0:
        raise ValueError(f"--fine-tune-layers must be >= 0, got {count}")
    backbone.trainable = True
    first = max(len(backbone.layers) - count, 0)
    unfrozen = []
    for i, layer in enumerate(backbone.layers):
        # Frozen BatchNormalization runs in inference mode in Keras 3: statistics stay put.
        layer.trainable = i >= first and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen


# ------------------------------------------------------------------ the model


class EndToEndCaptioner(keras.Model):
    """Images -> backbone grid -> standardisation -> decoder, trained with teacher forcing.

    A batch is `(images uint8 [B, S, S, 3], tokens int32 [B, refs, max_length])`;
    reference slots without a caption are all padding and drop out of the loss. The loss is
    the decoder's own objective (`CaptionModel.objective`: label smoothing and attention
    penalty as in phase 1).

    Example:

    ```python
    model = EndToEndCaptioner(extractor, decoder, normalizer.mean, normalizer.std)
    model.compile(FusedAdam(1e-5)); model.fit(image_caption_batches(...))
    ```
    """

    def __init__(self, extractor: FeatureExtractor, decoder: keras.Model, mean: np.ndarray, std: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.extractor, self.decoder = extractor, decoder
        self.mean = ops.convert_to_tensor(np.asarray(mean, np.float32))
        self.std = ops.convert_to_tensor(np.asarray(std, np.float32))
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def grid(self, images, training=False):
        grid, _ = self.extractor(images, training=training)
        return (ops.cast(grid, "float32") - self.mean) / self.std

    def teacher_forcing_batch(self, inputs, training=False):
        """(grid [B, cells, C], decoder inputs and targets [B, refs, max_length - 1]).

        The decoder encodes each image's grid once for all its references (`models.base.group_captions`).
        """
        images, tokens = inputs
        return self.grid(images, training), tokens[..., :-1], tokens[..., 1:]

    def call(self, inputs, training=False):
        """(logits [B * refs, max_length - 1, V], targets [B * refs, max_length - 1])."""
        grid, decoder_inputs, targets = self.teacher_forcing_batch(inputs, training)
        return self.decoder((grid, decoder_inputs), training=training), flat_captions(targets)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def train_step(self, data):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            grid, decoder_inputs, targets = self.teacher_forcing_batch(data, training=True)
            loss = self.decoder.objective(grid, decoder_inputs, targets, training=True)[0]
            scaled = self.optimizer.scale_loss(loss / replicas)
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        grid, decoder_inputs, targets = self.teacher_forcing_batch(data, training=False)
        self.loss_tracker.update_state(self.decoder.objective(grid, decoder_inputs, targets, training=False)[0])
        return {"loss": self.loss_tracker.result()}


# ------------------------------------------------------------------ data


def image_caption_batches(
    paths: list[str], tokens: np.ndarray, size: int, batch_size: int, shuffle: bool = False, seed: int = 0
) -> tf.data.Dataset:
    """(images uint8, tokens [refs, max_length]) batches; images read like the feature cache reads them.

    Example:

    ```python
    ds = image_caption_batches(["a.jpg"], table[:1], size=224, batch_size=16)
    ```
    """

    def load(path: bytes):
        return load_rgb(path.decode(), size=(size, size))

    def decode(path, caption_tokens):
        image = tf.numpy_function(load, [path], tf.uint8, stateful=False)
        image.set_shape((size, size, 3))
        return image, caption_tokens

    ds = tf.data.Dataset.from_tensor_slices((list(paths), tokens))
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)


def split_batches(dataset, cache: FeatureCache, vocab, split: str, size: int, batch_size: int, shuffle: bool, seed: int):
    """Image-caption batches of the images the cache could decode, in cache order."""
    records = dataset.by_id()
    ids = cache.image_ids(split)
    if not ids:
        return None
    table, _ = captions_table([vocab.encode(records[i].captions) for i in ids], vocab.max_length)
    return image_caption_batches([records[i].path for i in ids], table, size, batch_size, shuffle, seed)


# ------------------------------------------------------------------ phase markers


def phase_complete(run_dir: Path, phase: str, requested: str) -> bool:
    """True when `phase` finished for the same requested configuration (`config_hash`)."""
    marker = run_folder.read_run_info(run_dir, missing_ok=True).get("phases", {}).get(phase, {})
    return marker.get("status") == "complete" and marker.get("config_hash") == requested


def mark_phase(run_dir: Path, phase: str, requested: str, **details) -> None:
    phases = run_folder.read_run_info(run_dir).get("phases", {})
    phases[phase] = {"status": "complete", "config_hash": requested, **details}
    run_folder.update_run_info(run_dir, phases=phases)


def fine_tune(cfg: Config, run_dir: Path) -> Path:
    """Phase 2 on a run whose phase 1 is complete; `cfg` is the requested configuration.

    Example:

    ```python
    fine_tune(cfg, Path("runs/optimized-shapes-inception_v3-lstm-bahdanau"))
    ```
    """
    run = run_folder.load_run(run_dir, with_model=False)
    phase1 = run.info["phases"][PHASE_DECODER]
    saved = run.config  # resolved `auto` settings
    features_cfg = dataclasses.replace(saved.features, weights=cfg.features.weights)
    dataset = load_dataset(saved.data)
    cache = open_cache(Path(phase1["feature_cache"]), cache_request(dataset, features_cfg))
    if cache is None:
        raise FileNotFoundError(f"{phase1['feature_cache']}: the phase-1 feature cache is missing; rerun without it to rebuild")
    cache = repair_cache(cache, dataset)
    runtime = setup_runtime(saved.train)
    with run_folder.locked_run(run_dir, enabled=is_chief(runtime.strategy)):
        return _fine_tune_locked(cfg, run_dir, run, saved, features_cfg, dataset, cache, runtime)


def _fine_tune_locked(cfg, run_dir, run, saved, features_cfg, dataset, cache, runtime) -> Path:
    batch = runtime.global_batch_size(saved.train.fine_tune_batch_size)
    with runtime.strategy.scope():
        # The very backbone (a random one rebuilt from its seed) and statistics the decoder learned on.
        extractor = cache.encoder_spec.build_extractor()
        unfrozen = unfreeze_last_layers(extractor.backbone, saved.features.fine_tune_layers)
        decoder = build_decoder(saved.model, run.vocab.size, cache.grid_shape, run.vocab.max_length)
        decoder.load_weights(run_dir / PHASE1_WEIGHTS_FILE)
        normalizer = cache.normalizer()
        model = EndToEndCaptioner(extractor, decoder, normalizer.mean, normalizer.std, name="end_to_end")
        # Built before fit: BackupAndRestore restores into an existing model.
        model((np.zeros((1, extractor.input_size, extractor.input_size, 3), np.uint8), np.zeros((1, 1, run.vocab.max_length), np.int32)))
        optimizer = FusedAdam(saved.train.fine_tune_learning_rate * runtime.replicas, clipnorm=saved.train.clipnorm)
        model.compile(optimizer=optimizer, jit_compile=False)  # a whole CNN under XLA: long compiles, no gain measured
    print(
        f"Phase 2: fine-tuning {len(unfrozen)} weighted layers of the last {saved.features.fine_tune_layers} "
        f"of {features_cfg.backbone} + decoder, lr {saved.train.fine_tune_learning_rate:g}, "
        f"{saved.train.fine_tune_epochs} epoch(s), batch {batch} images",
        flush=True,
    )
    size = extractor.input_size
    records, train_ids = dataset.by_id(), cache.image_ids("train")
    table, _ = captions_table([run.vocab.encode(records[i].captions) for i in train_ids], run.vocab.max_length)
    paths, steps = [records[i].path for i in train_ids], math.ceil(len(train_ids) / batch)

    def make_epoch(epoch):  # epoch e is shuffled with seed + e: a resumed run replays it exactly
        ds = image_caption_batches(paths, table, size, batch, shuffle=True, seed=saved.train.seed + epoch)
        return ds.apply(tf.data.experimental.assert_cardinality(steps))

    val_ds = split_batches(dataset, cache, run.vocab, "val", size, batch, False, 0)
    # TensorBoard: the phase-1 curves go on (phase 1's epochs and steps come first).
    log_dir = run_dir / run_folder.LOG_DIR
    axis = summaries.SummaryAxis(epoch_offset=int(run.info.get("epochs_run", 0)), step_offset=int(run.info.get("steps_run", 0)))
    callbacks = [LearningRateLogger(), keras.callbacks.CSVLogger(str(run_dir / FINE_TUNE_HISTORY_FILE), append=True)]
    chief, val_ids = is_chief(runtime.strategy), cache.image_ids("val")
    if chief:  # one writer per curve
        callbacks.append(summaries.TensorBoard(log_dir, axis, profile_batch=profile_batch_range(saved.train.profile_batches)))
    if val_ids and chief:
        ids = val_ids[: summaries.SAMPLE_IMAGES]
        samples = summaries.sample_set(ids, [[clean_caption(c) for c in records[i].captions] for i in ids], None, lambda i: load_rgb(records[i].path),
                                       saved.train.tensorboard_images)
        inputs = np.stack([load_rgb(records[i].path, size=(size, size)) for i in ids])  # as the training images are read
        vocab = run.vocab
        callbacks.append(summaries.SampleCaptions(
            log_dir / summaries.VALIDATION_DIR, samples, vocab, axis, encode=lambda m: m.grid(inputs),
            make_generator=lambda m: CaptionGenerator.for_vocabulary(m.decoder, vocab),
        ))
    # What phase-2 checkpoints must match: the phase-1 decoder they start from and the phase-2 settings.
    phase2 = {k: getattr(saved.train, k) for k in ("fine_tune_learning_rate", "fine_tune_batch_size", "seed")}
    phase2.update(fine_tune_layers=saved.features.fine_tune_layers, decoder=file_sha256(run_dir / PHASE1_WEIGHTS_FILE))
    identity = run_folder.RunIdentity(stable_hash(phase2), run.vocab.fingerprint(), cache.fingerprint, {"fine_tune": phase2})
    session = recovery.ResumableTraining(
        model, run_dir, run_dir / FINE_TUNE_CHECKPOINT_DIR, saved, identity, steps, callbacks, runtime.strategy, log_dir, axis=axis,
    )
    start = session.restore()
    run_folder.trim_history(run_dir / FINE_TUNE_HISTORY_FILE, start[0])
    started = time.time()
    try:
        session.fit(make_epoch, saved.train.fine_tune_epochs, val_ds)
    finally:
        stopped = session.finish_status()
    if stopped is not None:
        run_folder.release_disk_reserve(run_dir)  # room for run.json on a full disk
        with contextlib.suppress(OSError):
            run_folder.update_run_info(run_dir, status=f"phase 2 {stopped.status}")
        raise stopped

    # Publish: backbone, cache, decoder, then config and run.json; the marker is written last.
    backbone_path = (run_dir / BACKBONE_WEIGHTS_FILE).resolve()
    with atomic_path(backbone_path) as tmp:
        extractor.backbone.save_weights(tmp)
    tuned_features = dataclasses.replace(saved.features, weights=str(backbone_path))
    tuned_encoder = ImageEncoder(EncoderSpec.from_config(tuned_features), normalizer, extractor=extractor)
    tuned_cache = build_feature_cache(dataset, tuned_features, encoder=tuned_encoder)
    with atomic_path(run_dir / run_folder.WEIGHTS_FILE) as tmp:
        decoder.save_weights(tmp)
    tuned_config = copy.deepcopy(saved)
    tuned_config.features = tuned_features
    save_config(tuned_config, run_dir / run_folder.CONFIG_FILE)
    run_folder.record_weights(
        run_dir, feature_cache=str(tuned_cache.directory), feature_fingerprint=tuned_cache.fingerprint, encoder=tuned_cache.manifest["encoder"]
    )
    mark_phase(
        run_dir,
        PHASE_FINE_TUNE,
        config_hash(cfg),
        unfrozen_layers=unfrozen,
        seconds=round(time.time() - started, 1),
        feature_cache=str(tuned_cache.directory),
    )
    return run_dir


def train_in_phases(cfg: Config, bleu: Optional[BleuFunction] = None) -> Path:
    """Phase 1 (skipped when already complete for this config), then phase 2 if requested.

    Example:

    ```python
    run_dir = train_in_phases(load_config("optimized"), bleu=corpus_bleu_scores)
    ```
    """
    requested = config_hash(cfg)
    run_dir = run_folder.run_directory(cfg)
    two_phases = cfg.features.fine_tune_layers > 0
    if two_phases and cfg.train.distribute in ("auto", "multiworker") and cluster_workers():
        raise ValueError(
            "--fine-tune-layers: two-phase training does not run on several workers yet (TF_CONFIG is set)."
            " Run it on one machine (without TF_CONFIG; several GPUs there are used), or train the decoder alone"
            " on the workers with --fine-tune-layers 0"
        )
    # The weights of a finished run are checked too: damaged ones are written again from its checkpoints.
    weights_ok = not run_folder.weights_problem(run_dir, run_folder.read_run_info(run_dir, missing_ok=True))
    if phase_complete(run_dir, PHASE_DECODER, requested) and (run_dir / PHASE1_WEIGHTS_FILE).exists() and (weights_ok or two_phases):
        print(f"Phase 1 (decoder) already complete in {run_dir}: skipping it", flush=True)
    else:
        run_dir = train(cfg, bleu)
        if not process_is_chief():  # multi-worker: the chief publishes the phase
            return run_dir
        # A (re)trained decoder invalidates any half-finished phase 2 (phase 2 starts only after this).
        shutil.rmtree(run_dir / FINE_TUNE_CHECKPOINT_DIR, ignore_errors=True)
        with atomic_path(run_dir / PHASE1_WEIGHTS_FILE) as tmp:
            shutil.copyfile(run_dir / run_folder.WEIGHTS_FILE, tmp)
        mark_phase(run_dir, PHASE_DECODER, requested, feature_cache=run_folder.read_run_info(run_dir)["feature_cache"])
    if not two_phases:
        return run_dir
    if phase_complete(run_dir, PHASE_FINE_TUNE, requested) and weights_ok:
        print(f"Phase 2 (fine-tune) already complete in {run_dir}", flush=True)
        return run_dir
    return fine_tune(cfg, run_dir)
