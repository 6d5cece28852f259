"""Crash-safe training: resume decisions, exact mid-epoch resume, supervision.

A run folder `runs/<name>/` resumes by itself: rerunning the same command
restores the newest valid checkpoint of `runs/<name>/checkpoints/` (model,
optimizer, dropout RNG state, epoch/batch position, callback state) and
continues with the exact next batch, so the final weights equal those of an
uninterrupted run.

Exact resume uses a deterministic position scheme instead of checkpointing
Keras' own `tf.data` iterator (Keras creates and owns that iterator inside
`fit`): epoch `e` shuffles with the seed `seed + e` (a fixed order per
epoch), and a run resumed at batch `b` of epoch `e` skips the first `b`
batches of that epoch. `epoch_feed` chains the epochs into one dataset that
`fit` reads with `steps_per_epoch`; a resumed partial epoch is one short
`fit` call, the remaining epochs a second one (`fit_from_position`).

Example:

>>> plan = plan_run(cfg, run_dir, fingerprints)     # never / auto / complete
>>> state = TrainingState(model, run_dir / "checkpoints", cfg.checkpoint)
>>> position = state.restore(fingerprints)           # (epoch, batch) to start at
>>> history = fit_from_position(model, make_epoch, position, steps, cfg.train.epochs, val_ds, callbacks)
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from caption_tf import run_folder
from caption_tf.config import Config
from caption_tf.files import atomic_path, stable_hash
from caption_tf.run_folder import CHECKPOINT_DIR, OLD_RUN_SUFFIX
from caption_tf.training.supervisor import EXIT_CHECKPOINT_FAILED, EXIT_NON_FINITE, TrainingStopped
from caption_tf.training.health import HealthMonitor, NonFiniteLossGuard
from caption_tf.training.runtime import broadcast_from_chief, is_chief, worker_write_dir
from caption_tf.training.integrity import (
    FOLDER_PREFIX,
    CheckpointCallback,
    CheckpointInfo,
    CheckpointMismatchError,
    TrainingPosition,
    VerifiedCheckpointStore,
    check_compatible,
)

logger = logging.getLogger(__name__)

EPOCH_SECONDS_KEY = "epoch_seconds"
CHECKPOINT_SECONDS_KEY = "checkpoint_seconds"
EPOCH_SEED_STRIDE = 1  # epoch e shuffles with seed + e * stride

# Config fields that do not change the training maths: they may differ between
# the interrupted run and the resumed one. `epochs` is here so a finished run
# can be trained longer (except under warmup_cosine, see `compat_config`).
NEUTRAL_FIELDS = frozenset(
    {
        "data_root", "data_dir", "download", "cache_dir", "extract_batch_size",
        "runs_dir", "run_name", "tune", "trials", "epochs", "early_stopping_patience",
        "jit", "cluster_start_timeout",
        "fine_tune_layers", "fine_tune_epochs", "fine_tune_learning_rate", "fine_tune_batch_size",
        "checkpoint_every", "keep_checkpoints", "resume", "async_checkpoint", "max_restarts",
    }
)
NEUTRAL_SECTIONS = frozenset({"eval", "preset"})

# Test hooks (documented in README.md (crash recovery)), honoured only when set:
CRASH_AFTER_BATCHES_ENV = "CAPTION_TF_CRASH_AFTER_BATCHES"  # SIGKILL itself after N batches of this process
NAN_AT_STEP_ENV = "CAPTION_TF_NAN_AT_STEP"  # poison a weight with NaN after global step N


# ------------------------------------------------------------------ identity of a run


def compat_config(cfg: Config) -> dict:
    """The config fields that change the training maths (what a resume must match).

    Example:

    >>> "epochs" in compat_config(load_config("minimal"))["train"]
    False
    """
    raw = cfg.to_dict()
    kept = {}
    for section, values in raw.items():
        if section in NEUTRAL_SECTIONS or not isinstance(values, dict):
            continue
        kept[section] = {k: v for k, v in values.items() if k not in NEUTRAL_FIELDS}
    if cfg.train.lr_schedule == "warmup_cosine":  # the decay is planned over all epochs
        kept["train"]["epochs"] = cfg.train.epochs
    return kept


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to be resumed: config, vocabulary, feature cache.

    Example:

    >>> identity = RunIdentity.of(cfg, vocab.fingerprint(), cache.fingerprint)
    >>> sorted(identity.metadata())
    ['config_hash', 'feature_fingerprint', 'vocab_hash']
    """

    config_hash: str
    vocab_hash: str
    feature_fingerprint: str
    config: dict

    @classmethod
    def of(cls, cfg: Config, vocab_hash: str, feature_fingerprint: str, replicas: int = 1) -> "RunIdentity":
        config = compat_config(cfg)
        # The global batch, so the steps per epoch and a checkpoint's data position, depend on
        # the replicas. Hashed only when > 1: one-device runs keep the identity they had.
        shown = {**config, "train": {**config["train"], "replicas": replicas}}
        return cls(stable_hash(shown if replicas != 1 else config), vocab_hash, feature_fingerprint, shown)

    def metadata(self) -> dict:
        """For checkpoint metadata and run.json; `compat_config` lets a mismatch name the changed flags."""
        return {
            "config_hash": self.config_hash,
            "vocab_hash": self.vocab_hash,
            "feature_fingerprint": self.feature_fingerprint,
            "compat_config": self.config,
        }

    def check(self, saved: Mapping[str, Any], where: str) -> None:
        """Raise `CheckpointMismatchError` naming each differing setting and how to start fresh."""
        try:
            check_compatible(saved, self.metadata())  # compares the three hashes only
        except CheckpointMismatchError as err:
            details = _config_differences(saved.get("compat_config") or {}, self.config)
            raise CheckpointMismatchError(
                f"{where}: {err}"
                + (f" Changed settings: {details}." if details else "")
                + " To keep the old run and start over, rerun with --resume never (it is moved to"
                f" <run>{OLD_RUN_SUFFIX}<time>) or pick another --run-name."
            ) from None


def _config_differences(saved: dict, current: dict) -> str:
    changes = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section, {}), current.get(section, {})
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                changes.append(f"--{name.replace('_', '-')} {old.get(name)!r} -> {new.get(name)!r}")
    return ", ".join(changes)


# ------------------------------------------------------------------ what to do with an existing run folder


@dataclasses.dataclass
class RunPlan:
    """The decision for a run folder: train (fresh or resumed) or report it complete.

    Example:

    >>> plan = plan_run(cfg, Path("runs/x"), identity)
    >>> plan.complete, plan.moved_to
    (False, None)
    """

    run_dir: Path
    complete: bool = False
    moved_to: Optional[Path] = None
    message: str = ""


def read_run_info(run_dir: Path) -> Optional[dict]:
    """The run's `run.json`, or None when there is none (or it is unreadable: a crash mid-write)."""
    try:
        return run_folder.read_run_info(run_dir)
    except (OSError, run_folder.RunFolderError):
        return None


def move_aside(run_dir: Path) -> Path:
    """Rename `runs/<name>` to `runs/<name>.old-<UTC time>` (never deletes anything)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}{OLD_RUN_SUFFIX}{stamp}")
    suffix = 1
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}{OLD_RUN_SUFFIX}{stamp}-{suffix}")
        suffix += 1
    os.replace(run_dir, target)
    return target


def plan_run(cfg: Config, run_dir: Path, identity: RunIdentity, info: Optional[dict]) -> RunPlan:
    """Decide what training does with `run_dir` given `--resume` and its `run.json` (`info`).

    - `--resume never` and a non-empty folder: the folder is moved aside, training starts fresh.
    - `run.json` says complete for this identity and `--epochs` is not larger: nothing to train.
    - a completed run made under other settings: refuse (`CheckpointMismatchError`).
    - otherwise: train; `TrainingState.restore` picks up any checkpoint.
    """
    plan = RunPlan(run_dir)
    if cfg.checkpoint.resume == "never":
        if run_dir.exists() and any(run_dir.iterdir()):
            plan.moved_to = move_aside(run_dir)
            plan.message = f"--resume never: moved the existing run to {plan.moved_to}; starting fresh in {run_dir}"
        return plan
    latest = check_checkpoints(run_dir / CHECKPOINT_DIR, identity)
    if not info or info.get("status") != "complete":
        return plan
    if latest is None:  # a completed run without checkpoints: its run.json holds the identity
        identity.check(info, f"{run_dir} is a completed run")
    trained_epochs = int(info.get("epochs_target", info.get("epochs_run", 0)))
    if cfg.train.epochs <= trained_epochs:
        plan.complete = True
        plan.message = (
            f"{run_dir} is already complete ({info.get('epochs_run', trained_epochs)} epoch(s)); not training again."
            f" To train longer pass a larger --epochs (it resumes from the last checkpoint); to retrain from"
            f" scratch pass --resume never (the old run is kept as {run_dir.name}{OLD_RUN_SUFFIX}<time>)."
        )
    return plan


def check_checkpoints(directory: Path, identity: RunIdentity) -> Optional[CheckpointInfo]:
    """The newest valid checkpoint in `directory` (quarantining corrupt ones), checked against `identity`.

    Runs before the run folder's files are rewritten, so a refused resume leaves
    the old run untouched.
    """
    if not directory.is_dir():
        return None
    store = VerifiedCheckpointStore(directory, checkpoint=None, async_save=False)
    info = store.latest_valid()
    for path, reason in store.quarantined:
        print(f"Checkpoint quarantined: {path} ({reason}); an older checkpoint is used", flush=True)
    if info is not None:
        identity.check(info.metadata, f"Checkpoint {info.path}")
    return info


# ------------------------------------------------------------------ what a checkpoint holds


def rng_state_variables(model: keras.Model) -> list:
    """The Keras `SeedGenerator` states of a model (dropout masks, recurrent dropout).

    `tf.train.Checkpoint(model=...)` does not track them (measured, Keras 3.15),
    so they are saved explicitly: a resumed run then draws the same masks.

    Example:

    >>> [v.path for v in rng_state_variables(model)]
    ['seed_generator/seed_generator_state', 'seed_generator_1/seed_generator_state']
    """
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class CallbackStates(keras.callbacks.Callback):
    """Carries EarlyStopping / ReduceLROnPlateau counters across resumes and `fit` calls.

    Those callbacks reset their counters in `on_train_begin`; this one, placed
    after them, puts the saved counters back. `capture()` returns JSON-able
    state for the checkpoint metadata. `EarlyStopping.best_weights` is not
    carried (it is a copy of the weights; the store keeps the best checkpoint).

    Example:

    >>> states = CallbackStates(callbacks, saved=info.metadata.get("callbacks"))
    >>> model.fit(ds, callbacks=callbacks + [states])
    """

    FIELDS = {
        keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
        keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
    }

    def __init__(self, callbacks: Sequence[keras.callbacks.Callback], saved: Optional[Mapping[str, dict]] = None):
        super().__init__()
        self.tracked = {f"{type(cb).__name__}_{i}": cb for i, cb in enumerate(callbacks) if type(cb) in self.FIELDS}
        self.pending = dict(saved or {})

    def capture(self) -> dict:
        state = {}
        for key, cb in self.tracked.items():
            state[key] = {name: _plain(getattr(cb, name, None)) for name in self.FIELDS[type(cb)]}
        return state

    def on_train_begin(self, logs=None):
        for key, values in self.pending.items():
            if key in self.tracked:
                for name, value in values.items():
                    setattr(self.tracked[key], name, value)
        self.pending = {}

    def on_train_end(self, logs=None):
        self.pending = self.capture()  # for the next fit call of the same run


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds` and `checkpoint_seconds` to the epoch logs.

    `epoch_seconds`: training batches, mid-epoch saves and the Keras validation
    pass. `checkpoint_seconds`: how long the mid-epoch saves of this epoch
    blocked training. Placed before CSVLogger/TensorBoard so they record both
    (the checkpoint overhead in README.md (crash recovery) comes from them).

    Example:

    >>> model.fit(ds, callbacks=[EpochTimer(checkpoint_callback), keras.callbacks.CSVLogger("history.csv")])
    """

    def __init__(self, checkpoint_callback: Optional[CheckpointCallback] = None):
        super().__init__()
        self.checkpoint_callback = checkpoint_callback

    def _blocked(self) -> float:
        return self.checkpoint_callback.blocking_seconds if self.checkpoint_callback else 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()
        self._blocked_at_start = self._blocked()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[EPOCH_SECONDS_KEY] = time.perf_counter() - self._started
            logs[CHECKPOINT_SECONDS_KEY] = self._blocked() - self._blocked_at_start


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item()
    return value


class TrainingState:
    """The checkpointed training state of a run and its verified store.

    Holds model, optimizer (moments, iterations, learning rate, loss scale),
    the dropout RNG states and a `TrainingPosition` (step, epoch, batch).

    Example:

    >>> state = TrainingState(model, run_dir / "checkpoints", cfg.checkpoint, best_metric="val_loss")
    >>> info = state.restore(identity)     # None for a fresh run
    >>> state.start(steps_per_epoch=40)    # (epoch, batch) to continue at
    (2, 17)
    """

    def __init__(
        self,
        model: keras.Model,
        directory: Path,
        checkpoint_cfg,
        best_metric: str = "val_loss",
        best_mode: str = "min",
        restore_directory: Optional[Path] = None,
    ):
        self.model = model
        # Multi-worker: a non-chief worker saves into its own folder (`directory`) but
        # restores the chief's checkpoints (`restore_directory`), read-only.
        self.restore_directory = Path(restore_directory or directory)
        optimizer = model.optimizer
        # The position is host-side bookkeeping (plain variables, read with int()); the
        # optimizer slots are created in the model's strategy scope, mirrored like its weights.
        self.position = TrainingPosition()
        with model.distribute_strategy.scope():
            optimizer.build(model.trainable_variables)  # slots must exist before a restore
            self.checkpoint = tf.train.Checkpoint(
                model=model, optimizer=optimizer, position=self.position, rng=rng_state_variables(model)
            )
        self.store = VerifiedCheckpointStore(
            directory,
            self.checkpoint,
            keep=checkpoint_cfg.keep_checkpoints,
            best_metric=best_metric,
            best_mode=best_mode,
            async_save=checkpoint_cfg.async_checkpoint,
        )
        self.restored: Optional[CheckpointInfo] = None

    def restore(self, identity: RunIdentity) -> Optional[CheckpointInfo]:
        """Restore the newest valid checkpoint (corrupt ones are quarantined and reported).

        Multi-worker: the chief picks the checkpoint (and quarantines); every other
        worker restores the same one from the chief's folder, without writing to it.
        """
        strategy = self.model.distribute_strategy
        info = self.store.latest_valid() if is_chief(strategy) else None
        for path, reason in self.store.quarantined:
            print(f"Checkpoint quarantined: {path} ({reason})", flush=True)
        step = broadcast_from_chief(strategy, info.step if info else -1)
        if step < 0:
            return None
        if info is None:
            info = self.store.verify(self.restore_directory / f"{FOLDER_PREFIX}{step}")
        identity.check(info.metadata, f"Checkpoint {info.path}")
        self.restored = self.store.restore(info)
        print(f"Resuming from {info.path}: epoch {int(self.position.epoch) + 1}, {int(self.position.batch)} batch(es) done", flush=True)
        return self.restored

    def start(self, steps_per_epoch: int) -> tuple[int, int]:
        """(epoch, batch) where training continues; (0, 0) for a fresh run."""
        if self.restored is None:
            return 0, 0
        epoch, batch = int(self.position.epoch), int(self.position.batch)
        return (epoch + 1, 0) if batch >= steps_per_epoch else (epoch, batch)



class RecoverySession:
    """The crash-safety callbacks of one training process and how it ends.

    Order in `callbacks(...)`: NaN guard and `EpochTimer` first; then the caller's callbacks
    (validation BLEU, schedules, TensorBoard, CSVLogger, EarlyStopping);
    then `CallbackStates` (restores EarlyStopping/plateau counters after their
    `on_train_begin` reset); then the checkpoint callback, so an epoch-end save
    sees the final epoch logs and counters; then the health monitor; then
    the test hooks.

    Example:

    >>> session = RecoverySession(model, run_dir, cfg, identity, steps_per_epoch=40)
    >>> start = session.restore()
    >>> history = fit_from_position(model, make_epoch, start, 40, cfg.train.epochs, val_ds,
    ...                             session.callbacks(callbacks), session.checkpoint_callback)
    >>> stopped = session.finish_status()   # a TrainingStopped after a NaN or a failed/low-disk save
    """

    def __init__(self, model: keras.Model, run_dir: Path, cfg: Config, identity: RunIdentity, steps_per_epoch: int, log_dir: Path):
        monitor_key = cfg.train.early_stopping_monitor
        best_mode = "max" if "bleu" in monitor_key else "min"
        self.identity = identity
        self.steps_per_epoch = steps_per_epoch
        # Only the chief writes the run folder; another worker writes into its own temporary folder.
        write_dir = worker_write_dir(run_dir, model.distribute_strategy)
        self.state = TrainingState(
            model, write_dir / CHECKPOINT_DIR, cfg.checkpoint, best_metric=monitor_key, best_mode=best_mode,
            restore_directory=run_dir / CHECKPOINT_DIR,
        )
        self.guard = NonFiniteLossGuard(self.state.store)
        self.checkpoint_callback = CheckpointCallback(
            self.state.store, self.state.position, every_n_batches=cfg.checkpoint.checkpoint_every, metadata_fn=self.metadata
        )
        self.monitor = HealthMonitor(
            write_dir,
            log_dir=log_dir,
            checkpoint_bytes=lambda: self.state.store.last_checkpoint_bytes,
            final_save=self.checkpoint_callback.save_now,
        )
        self.faults = FaultInjection.from_environment(self.state.position)
        self.callback_states: Optional[CallbackStates] = None

    def restore(self) -> tuple[int, int]:
        """Restore the newest valid checkpoint; (epoch, batch) to continue at."""
        self.state.restore(self.identity)
        return self.state.start(self.steps_per_epoch)

    def metadata(self) -> dict:
        states = self.callback_states.capture() if self.callback_states else {}
        return {**self.identity.metadata(), "callbacks": states, "steps_per_epoch": self.steps_per_epoch}

    def callbacks(self, others: Sequence[keras.callbacks.Callback]) -> list[keras.callbacks.Callback]:
        saved = self.state.restored.metadata.get("callbacks") if self.state.restored else None
        self.callback_states = CallbackStates(others, saved)
        ordered = [self.guard, EpochTimer(self.checkpoint_callback), *others, self.callback_states, self.checkpoint_callback, self.monitor]
        return ordered + ([self.faults] if self.faults else [])

    @property
    def epochs_done(self) -> int:
        position = self.state.position
        return int(position.epoch) + (1 if int(position.batch) >= self.steps_per_epoch else 0)

    def finish_status(self) -> Optional[TrainingStopped]:
        """Wait for the last save; a `TrainingStopped` (not raised) if training did not end normally."""
        try:
            self.state.store.close()
        except Exception as err:  # noqa: BLE001 - reported as a failed save below
            self.checkpoint_callback.failure = self.checkpoint_callback.failure or err
        last = self.state.store.last_published
        last_text = f"{last.path} (step {last.step})" if last else "none"
        if self.guard.tripped_at is not None:
            return TrainingStopped(self.guard.message, EXIT_NON_FINITE, "stopped: non-finite loss")
        if self.checkpoint_callback.failure is not None:
            return TrainingStopped(
                f"Training stopped: saving a checkpoint failed ({self.checkpoint_callback.failure}). "
                f"Last good checkpoint: {last_text}. Free disk space and rerun the same command to resume.",
                EXIT_CHECKPOINT_FAILED,
                "stopped: checkpoint save failed",
            )
        if self.monitor.stopped_for_disk:
            return TrainingStopped(
                f"Training stopped: the disk is almost full. Last good checkpoint: {last_text}. "
                "Free disk space and rerun the same command to resume.",
                EXIT_CHECKPOINT_FAILED,
                "stopped: low disk",
            )
        return None


# ------------------------------------------------------------------ exact data position


def epoch_feed(make_epoch: Callable[[tf.Tensor], tf.data.Dataset], start_epoch: int, start_batch: int, end_epoch: int) -> tf.data.Dataset:
    """The batches of epochs [start_epoch, end_epoch), skipping `start_batch` batches of the first.

    `make_epoch(e)` builds epoch `e`'s batches shuffled with a seed derived from
    `e` (a scalar int64 tensor), so every epoch has a fixed order that a resumed
    run reproduces. Pure `tf.data`: no Python in the loop.

    Example:

    >>> ds = epoch_feed(lambda e: pairs.shuffle(100, seed=42 + e).batch(8), 2, 5, 4)
    >>> model.fit(ds, steps_per_epoch=steps, initial_epoch=2, epochs=4)
    """
    first = tf.constant(start_epoch, tf.int64)
    skip = tf.constant(start_batch, tf.int64)

    @tf.autograph.experimental.do_not_convert  # plain tf.data construction; nothing to convert
    def one_epoch(epoch):
        return make_epoch(epoch * EPOCH_SEED_STRIDE).skip(tf.where(epoch == first, skip, tf.constant(0, tf.int64)))

    return tf.data.Dataset.range(start_epoch, end_epoch).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def fit_from_position(
    model: keras.Model,
    make_epoch: Callable[[tf.Tensor], tf.data.Dataset],
    start: tuple[int, int],
    steps_per_epoch: int,
    epochs: int,
    validation_data: Optional[tf.data.Dataset],
    callbacks: Sequence[keras.callbacks.Callback],
    checkpoint_callback: CheckpointCallback,
    dataset_options: Optional[tf.data.Options] = None,
    **fit_kwargs,
) -> dict:
    """`fit` from (epoch, batch) to `epochs`: a short fit for a partial epoch, then the rest.

    Keras reads the chained epochs of `epoch_feed` through one iterator when
    `steps_per_epoch` is given. Returns the merged `history.history`.

    Example:

    >>> fit_from_position(model, make_epoch, (2, 17), 40, 5, val_ds, callbacks, checkpoint_callback)
    """
    epoch, batch = start
    segments = []
    if batch > 0:
        segments.append((epoch, batch, epoch + 1))
        epoch += 1
    if epoch < epochs:
        segments.append((epoch, 0, epochs))
    history: dict[str, list] = {}
    model.stop_training = False
    for first, skip, end in segments:
        if model.stop_training:
            break
        checkpoint_callback.batch_offset = skip
        feed = epoch_feed(make_epoch, first, skip, end)
        result = model.fit(
            feed.with_options(dataset_options) if dataset_options is not None else feed,
            validation_data=validation_data,
            initial_epoch=first,
            epochs=end,
            steps_per_epoch=steps_per_epoch - skip,  # skip > 0 only for a one-epoch segment
            callbacks=list(callbacks),
            shuffle=False,
            **fit_kwargs,
        )
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
    return history


def trim_history(path: Path, first_epoch: int) -> None:
    """Drop rows of epochs >= `first_epoch` from a CSVLogger file (they are trained again).

    Example:

    >>> trim_history(run_dir / "history.csv", first_epoch=2)   # keeps epochs 0 and 1
    """
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or "epoch" not in rows[0]:
        return
    column = rows[0].index("epoch")
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[column])) < first_epoch]
    if len(kept) == len(rows):
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(kept if len(kept) > 1 else [])


# ------------------------------------------------------------------ test hooks


class FaultInjection(keras.callbacks.Callback):
    """Test hooks: crash (SIGKILL) or poison a weight with NaN, from environment variables.

    `CAPTION_TF_CRASH_AFTER_BATCHES=N`: this process SIGKILLs itself after
    running N batches (counted in this process, so a restarted run crashes
    again N batches later). `CAPTION_TF_NAN_AT_STEP=N`: after global step N a
    weight becomes NaN, so the next loss is NaN. Inactive unless set.

    Example:

    >>> hooks = FaultInjection.from_environment(position)   # None when no hook is set
    """

    def __init__(self, position: TrainingPosition, crash_after: Optional[int], nan_at: Optional[int]):
        super().__init__()
        self.position, self.crash_after, self.nan_at = position, crash_after, nan_at
        self._batches = 0

    @classmethod
    def from_environment(cls, position: TrainingPosition) -> Optional["FaultInjection"]:
        crash = os.environ.get(CRASH_AFTER_BATCHES_ENV)
        nan = os.environ.get(NAN_AT_STEP_ENV)
        if not crash and not nan:
            return None
        return cls(position, int(crash) if crash else None, int(nan) if nan else None)

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.nan_at is not None and int(self.position.step) == self.nan_at:
            weight = self.model.trainable_variables[0]
            weight.assign(tf.fill(weight.shape, float("nan")))
        if self.crash_after is not None and self._batches >= self.crash_after:
            print(f"{CRASH_AFTER_BATCHES_ENV}: killing this process after {self._batches} batches", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
