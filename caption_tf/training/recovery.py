"""Crash-safe training: what to do with a run folder, and the exact resume of `fit`.

One resume path serves phase 1 (the decoder) and phase 2 (fine-tuning): `ExactBackupAndRestore`,
a `keras.callbacks.BackupAndRestore` subclass, checkpoints model, optimizer, RNG, position and
the stateful callbacks through a `VerifiedCheckpointManager`. Keras owns the data iterator, so
the data order is a function of the position: epoch `e` is shuffled with seed `seed + e` and
`fit_from_position` feeds `fit` from the restored (epoch, batch). See docs/recovery.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from caption_tf import run_folder
from caption_tf.config import Config
from caption_tf.training.checkpoints import CheckpointInfo, CheckpointWriteError, VerifiedCheckpointManager, latest_valid
from caption_tf.training import summaries
from caption_tf.training.faults import FaultInjection
from caption_tf.training.health import HealthMonitor, NonFiniteLossGuard
from caption_tf.training.runtime import broadcast_from_chief, is_chief, is_multi_worker, worker_loss_reported, worker_write_dir
from caption_tf.training.supervisor import EXIT_CHECKPOINT_FAILED, EXIT_NON_FINITE, TrainingStopped, is_disk_full

EPOCH_SECONDS_KEY, CHECKPOINT_SECONDS_KEY = "epoch_seconds", "checkpoint_seconds"


# ------------------------------------------------------------------ what to do with a run folder


@dataclasses.dataclass
class RunPlan:
    """Train (fresh or resumed), or report the run complete."""

    run_dir: Path
    complete: bool = False
    moved_to: Optional[Path] = None
    message: str = ""


def check_checkpoints(directory: Path, identity: run_folder.RunIdentity) -> Optional[CheckpointInfo]:
    """The newest valid checkpoint (damaged ones quarantined and reported), checked against `identity`."""
    info, moved = latest_valid(directory)
    for path, reason in moved:
        print(f"Checkpoint quarantined: {path} ({reason})", flush=True)
    if moved:
        print(f"Using the older checkpoint {info.path}" if info else "No valid checkpoint is left: training starts from the beginning", flush=True)
    if info is not None:
        identity.check(info.metadata, f"Checkpoint {info.path}")
    return info


def plan_run(cfg: Config, run_dir: Path, identity: run_folder.RunIdentity, info: dict) -> RunPlan:
    """Decide what training does with `run_dir`, before any of its files is rewritten.

    `--resume never` moves a non-empty run aside; a complete run (same settings, `--epochs` not larger,
    weights intact) is not trained again; anything else resumes from the newest valid checkpoint.
    Multi-worker: only the chief calls it; the others follow (`runtime.broadcast_from_chief`).
    """
    run_folder.check_run_folder(run_dir)
    plan = RunPlan(run_dir)
    if cfg.checkpoint.resume == "never":
        if run_dir.exists() and any(run_dir.iterdir()):
            plan.moved_to = run_folder.move_aside(run_dir)
            plan.message = f"--resume never: moved the existing run to {plan.moved_to}; starting fresh in {run_dir}"
        return plan
    latest = check_checkpoints(run_dir / run_folder.CHECKPOINT_DIR, identity)
    if info.get("status") != "complete":
        return plan
    if latest is None:  # a completed run without checkpoints: its run.json holds the identity
        identity.check(info, f"{run_dir} is a completed run")
    trained, problem = int(info.get("epochs_target", info.get("epochs_run", 0))), run_folder.weights_problem(run_dir, info)
    if cfg.train.epochs > trained:
        return plan
    if problem and latest is None:
        raise run_folder.RunFolderError(f"{problem}, and the run has no checkpoint left: retrain it with --resume never")
    plan.complete = not problem
    plan.message = f"{problem}: writing it again from the newest verified checkpoint" if problem else (
        f"{run_dir} is already complete ({info.get('epochs_run', trained)} epoch(s)); not training again. To train longer pass a"
        f" larger --epochs (it resumes from the last checkpoint); to retrain from scratch pass --resume never (the old run"
        f" is kept as {run_dir.name}{run_folder.OLD_RUN_SUFFIX}<time>)."
    )
    return plan


# ------------------------------------------------------------------ what a checkpoint holds

_SCALAR = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


class TrainingPosition(tf.Module):
    """Step, epoch and batches done in that epoch; `batch == steps_per_epoch` only after the epoch's validation."""

    def __init__(self):
        super().__init__(name="training_position")
        self.step, self.epoch, self.batch = (tf.Variable(0, dtype=tf.int64, name=n, **_SCALAR) for n in ("step", "epoch", "batch"))

    def advance(self, epoch: int, batch: int) -> None:
        self.step.assign_add(1)
        self.epoch.assign(epoch)
        self.batch.assign(batch + 1)

    def __getitem__(self, name: str) -> int:  # .numpy(): int() does not take a MirroredVariable
        return int(getattr(self, name).numpy())

    def as_dict(self) -> dict:
        return {name: self[name] for name in ("step", "epoch", "batch")}


class CallbackState:
    """The state of stateful Keras callbacks, as checkpoint variables.

    EarlyStopping and ReduceLROnPlateau reset their counters in `on_train_begin`, and
    EarlyStopping keeps its best weights in memory: `capture()` copies both into
    variables before a save, `apply()` puts them back after the reset.
    """

    FIELDS = {keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
              keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter")}

    def __init__(self, callbacks: Sequence[keras.callbacks.Callback], model: keras.Model):
        self.fields = [(cb, name) for cb in callbacks for kind, names in self.FIELDS.items() if isinstance(cb, kind) for name in names]
        self.early_stopping = next((cb for cb in callbacks if isinstance(cb, keras.callbacks.EarlyStopping) and cb.restore_best_weights), None)
        self.values = [tf.Variable(math.nan, dtype=tf.float64, **_SCALAR) for _ in self.fields]
        self.flags = tf.Variable([0, 0], dtype=tf.int64, **_SCALAR)  # [state saved, best weights saved]
        self.best_weights = [tf.Variable(tf.zeros(w.shape, w.dtype), **_SCALAR) for w in model.weights] if self.early_stopping else []

    def capture(self) -> None:
        for variable, (cb, name) in zip(self.values, self.fields):
            variable.assign(math.nan if getattr(cb, name, None) is None else float(getattr(cb, name)))
        best = self.early_stopping.best_weights if self.early_stopping else None
        for variable, value in zip(self.best_weights, best or []):
            variable.assign(value)
        self.flags.assign([1, int(best is not None)])

    def apply(self) -> None:
        saved, has_best = (int(v) for v in self.flags.numpy())
        for variable, (cb, name) in zip(self.values, self.fields) if saved else ():
            value = float(variable.numpy())
            setattr(cb, name, None if math.isnan(value) else value if name == "best" else int(value))
        if saved and self.early_stopping:
            self.early_stopping.best_weights = [v.numpy() for v in self.best_weights] if has_best else None

    @property
    def stopped_early(self) -> bool:
        return any(name == "stopped_epoch" and float(v.numpy()) > 0 for v, (_, name) in zip(self.values, self.fields))


class ExactBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` that resumes exactly, mid-epoch included.

    Keras' callback saves weights and epoch and restarts an interrupted epoch from its first
    batch. This subclass keeps its contract (restore in `on_train_begin`, save every `save_freq`
    batches) but saves a verified checkpoint of all the state, numbered by global step. An
    epoch's end is saved after its validation and callbacks: an epoch is done only with its metrics.

    Args:
        backup_dir, save_freq: as Keras' (`save_freq`: "epoch" or batches between saves).
        model: the compiled, built model; steps_per_epoch: batches per epoch.
        callbacks: the other callbacks of `fit`; the stateful ones are carried.
        max_to_keep, async_save, chief, write_dir: see `VerifiedCheckpointManager` (`write_directory`).
        metadata_fn: extra manifest metadata; check: raises to refuse another run's checkpoint.

    Create it inside `strategy.scope()`: it creates variables.
    """

    def __init__(self, backup_dir, model: keras.Model, steps_per_epoch: int, save_freq="epoch", callbacks=(), max_to_keep: int = 3, async_save: bool = True,
                 chief: bool = True, metadata_fn: Callable[[], dict] = dict, check: Optional[Callable[[CheckpointInfo], None]] = None, write_dir=None):
        super().__init__(str(backup_dir), save_freq=save_freq, delete_checkpoint=False)
        if not model.optimizer.built:  # slots must exist before a restore; once: LossScaleOptimizer.build adds variables on each call
            model.optimizer.build(model.trainable_variables)
        self.steps_per_epoch, self.metadata_fn, self.check, self._model_ref = steps_per_epoch, metadata_fn, check, model
        self.position, self.states = TrainingPosition(), CallbackState(callbacks, model)
        # The TF variables under the Keras ones, by position: Keras 3.15's Variable makes a new CPU copy
        # on every async save ("tf.function only supports singleton tf.Variables" on the second one).
        plain = lambda variables: [getattr(v, "value", v) for v in variables]  # noqa: E731
        checkpoint = tf.train.Checkpoint(model=plain(model.variables), optimizer=plain(model.optimizer.variables), position=self.position,
                                         callbacks=[*self.states.values, self.states.flags, *self.states.best_weights])
        self.store = VerifiedCheckpointManager(checkpoint, backup_dir, max_to_keep, async_save, chief, write_directory=write_dir)
        self.restored: Optional[CheckpointInfo] = None
        self.failure: Optional[BaseException] = None  # a failed save: training stops, the last checkpoint stays
        self.blocking_seconds = 0.0  # how long saves and waits for background writes held training up
        self.final_segment = True  # False while fit_from_position runs the rest of an interrupted epoch
        self._restore_done, self._offset, self._epoch, self._last_loss, self._saved_step = False, 0, 0, None, None  # a step is saved once

    def restore(self) -> tuple[int, int]:
        """Restore the newest valid checkpoint (once per process); (epoch, batch) where training continues.

        Multi-worker: the chief picks the checkpoint (quarantining damaged ones); the others
        restore that step from the chief's folder, read-only, so all start from the same state.
        """
        if not self._restore_done:
            strategy, step = self._model_ref.distribute_strategy, None
            if is_multi_worker(strategy):
                chosen = self.store.latest_valid() if self.store.chief else None
                step = broadcast_from_chief(strategy, chosen.step if chosen else -1)
            self.restored = None if step == -1 else self.store.restore(check=self.check, step=step)
            self._restore_done, self._saved_step = True, self.restored.step if self.restored else None
        epoch, batch = self.position["epoch"], self.position["batch"]
        return (epoch + 1, 0) if batch >= self.steps_per_epoch else (epoch, batch)

    def save_now(self) -> None:
        """A save outside the schedule: the health monitor's last one before a low-disk stop."""
        self._save_model()

    def _load_model(self):  # Keras: called by on_train_begin, after the other callbacks reset
        epoch, self._offset = self.restore()
        self.model._initial_epoch = epoch  # as Keras' BackupAndRestore; the batch is skipped in the data
        self.states.apply()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.position.advance(self._epoch, batch + self._offset)
        loss = (logs or {}).get("loss")
        self._last_loss = None if loss is None else float(np.asarray(loss))
        super().on_train_batch_end(batch, logs)  # -> _should_save_on_batch -> _save_model

    def _should_save_on_batch(self, batch):
        every = self.save_freq if isinstance(self.save_freq, int) else 0  # "epoch": epoch ends only
        return every > 0 and self.position["step"] % every == 0 and self.position["batch"] < self.steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        self._offset = 0
        if self.position["batch"] >= self.steps_per_epoch:  # a whole epoch, validated: it counts as done
            self._save_model(logs, epoch_end=True)
        if not self.final_segment and not self.model.stop_training and self.states.early_stopping is not None:
            self.states.early_stopping.best_weights = None  # saved; else its on_train_end would restore them already

    def on_train_end(self, logs=None):
        self.wait_for_writes()

    def wait_for_writes(self, close: bool = False) -> None:
        """Wait for the background write (the wait is part of the checkpoint cost); a failure goes to `failure`."""
        started = time.perf_counter()
        try:
            self.store.close() if close else self.store.flush()
        except CheckpointWriteError as err:
            self._fail(err)
        finally:
            self.blocking_seconds += time.perf_counter() - started

    def _save_model(self, logs=None, epoch_end: bool = False) -> None:
        if self.failure is not None or self.store.refusal or (not epoch_end and self.position["batch"] >= self.steps_per_epoch):
            return  # a failed store, NaN weights, or an epoch end to be saved after its validation
        variables = [v for v in self.model.weights + self.model.optimizer.variables if v.dtype.startswith("float")]
        if (self._last_loss is not None and not math.isfinite(self._last_loss)) or not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables):
            return
        step = self.position["step"]
        if step == self._saved_step:  # e.g. the health monitor's final save right after a scheduled one
            return
        self.states.capture()
        metrics = {k: float(np.asarray(v)) for k, v in (logs or {}).items() if np.size(v) == 1}
        started = time.perf_counter()
        try:
            self.store.save(step, {**self.position.as_dict(), **metrics, **self.metadata_fn()})
            self._saved_step = step
        except CheckpointWriteError as err:
            self._fail(err)
        finally:
            self.blocking_seconds += time.perf_counter() - started

    def _fail(self, err: BaseException) -> None:
        self.failure = self.failure or err
        self._model_ref.stop_training = True


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds` (since the previous row) and `checkpoint_seconds` (how long saves held
    training up in that time) to the epoch logs. The windows have no gaps, so the rows add up to
    the run: an epoch's end checkpoint, saved after its row, counts in the next row; the last one
    is in run.json's `checkpoint_seconds`."""

    def __init__(self, backup: ExactBackupAndRestore):
        super().__init__()
        self.backup, self._started = backup, None

    def _start_window(self) -> None:
        self._started, self._blocked = time.perf_counter(), self.backup.blocking_seconds

    def on_train_begin(self, logs=None):
        if self._started is None:  # fit_from_position may call fit twice: one run, one clock
            self._start_window()

    def on_epoch_end(self, epoch, logs=None):
        logs[EPOCH_SECONDS_KEY] = time.perf_counter() - self._started
        logs[CHECKPOINT_SECONDS_KEY] = self.backup.blocking_seconds - self._blocked
        self._start_window()


# ------------------------------------------------------------------ one training process


class ResumableTraining:
    """The crash-safety stack of one training process, phase 1 or phase 2.

    Callback order: NaN guard, epoch timer, the caller's callbacks, `ExactBackupAndRestore`
    (it sets their state after their reset, saves the epoch after their updates), the
    health monitor (its final save sees the updated position), test hooks.
    Multi-worker (docs/distributed.md): a worker other than the chief writes under its
    `runtime.worker_write_dir`; another worker's death stops `fit` (exit code 5).
    `axis` (shared with the caller's TensorBoard callbacks) is the checkpointed position, so
    a resumed process continues the curves; `restore` drops what was logged past it.
    """

    def __init__(self, model: keras.Model, run_dir: Path, checkpoint_dir: Path, cfg: Config, identity: run_folder.RunIdentity, steps_per_epoch: int,
                 callbacks: Sequence[keras.callbacks.Callback], strategy: tf.distribute.Strategy, log_dir: Optional[Path] = None,
                 axis: Optional[summaries.SummaryAxis] = None):
        self.model, self.identity, self.others, self.strategy, chief = model, identity, list(callbacks), strategy, is_chief(strategy)
        self.write_dir = worker_write_dir(run_dir, strategy)
        own_checkpoint_dir = checkpoint_dir if chief else self.write_dir / Path(checkpoint_dir).relative_to(run_dir)
        self.log_dir, self.chief, self.axis = (Path(log_dir) if log_dir else None), chief, axis or summaries.SummaryAxis()
        # TensorFlow's async checkpoint copies plain variables only: mirrored ones are saved synchronously.
        async_save = cfg.checkpoint.async_checkpoint and strategy.num_replicas_in_sync == 1
        with strategy.scope():  # every variable of the stack: position, callback state, optimizer slots
            self.backup = ExactBackupAndRestore(
                checkpoint_dir, model, steps_per_epoch, cfg.checkpoint.checkpoint_every or "epoch", self.others, cfg.checkpoint.keep_checkpoints,
                async_save, chief, lambda: {**identity.metadata(), "steps_per_epoch": steps_per_epoch},
                check=lambda info: identity.check(info.metadata, f"Checkpoint {info.path}"), write_dir=own_checkpoint_dir,
            )
        store, position = self.backup.store, self.backup.position
        self.axis.step = lambda: position["step"]
        self.guard = NonFiniteLossGuard(store)
        self.monitor = HealthMonitor(self.write_dir, log_dir=log_dir if chief else None, final_save=self.backup.save_now, step=self.axis.global_step,
                                     checkpoint_bytes=lambda: store.last_published.total_bytes if store.last_published else None)
        self.faults = FaultInjection.from_environment(self.backup.position)
        self.disk_error, self.worker_lost = None, None  # how `fit` ended: a full disk, or a lost worker (TrainingStopped)

    def restore(self) -> tuple[int, int]:
        """Restore the newest valid checkpoint; drop what TensorBoard got past it; (epoch, batch) where training continues."""
        start = self.backup.restore()
        if self.backup.restored is not None:
            position = self.backup.position.as_dict()
            print(f"Resuming from {self.backup.restored.path}: epoch {position['epoch'] + 1}, {position['batch']} batch(es) done", flush=True)
        if self.chief and self.log_dir is not None:  # those batches are trained (and logged) again; at step 0, all of them
            step = self.axis.global_step()
            summaries.trim_events(self.log_dir, self.axis.epoch_offset + self.epochs_done, step if step > 0 else -1)
        return start

    def overrides(self) -> dict:
        return self.identity.overrides(self.backup.restored.metadata) if self.backup.restored else {}

    def fit(self, make_epoch: Callable[[tf.Tensor], tf.data.Dataset], epochs: int, validation_data=None, dataset_options=None) -> dict:
        """`fit_from_position` with this stack; a full disk anywhere (TensorBoard, CSV, checkpoint) stops cleanly,
        and so does another worker's death (multi-worker: `runtime.worker_loss_reported`)."""
        callbacks = [self.guard, EpochTimer(self.backup), *self.others, self.backup, self.monitor] + ([self.faults] if self.faults else [])
        try:
            with worker_loss_reported(self.strategy):
                return fit_from_position(self.model, make_epoch, self.backup, epochs, validation_data, callbacks, dataset_options)
        except TrainingStopped as lost:  # the last checkpoint stays the resume point
            self.worker_lost = lost
            return {}
        except Exception as err:
            if not is_disk_full(err):
                raise
            self.disk_error = err
            return {}

    @property
    def epochs_done(self) -> int:
        return self.backup.position["epoch"] + (1 if self.backup.position["batch"] >= self.backup.steps_per_epoch else 0)

    def finish_status(self) -> Optional[TrainingStopped]:
        """Wait for the last save; a `TrainingStopped` (not raised) when training did not end normally."""
        self.backup.wait_for_writes(close=True)
        last, failure = self.backup.store.last_published, self.disk_error or self.backup.failure
        last_text = f"{last.path} (step {last.step})" if last else "none"
        if self.worker_lost is not None:
            return self.worker_lost
        if self.guard.tripped_at is not None:
            return TrainingStopped(
                f"{self.guard.message} Last good checkpoint: {last_text}. Lower the learning rate (--learning-rate) or clip"
                " gradients harder (--clipnorm) and rerun the command: it resumes from that checkpoint with the new values.",
                EXIT_NON_FINITE, "stopped: non-finite loss")
        if failure is None and not self.monitor.stopped_for_disk:
            return None
        disk = self.monitor.stopped_for_disk or is_disk_full(failure)
        what, fix = ("the disk is full or almost full", "Free disk space") if disk else ("saving a checkpoint failed", "Fix the cause")
        reason = f" ({str(failure).splitlines()[0]})" if failure is not None else ""
        return TrainingStopped(f"Training stopped: {what}{reason}. Last good checkpoint: {last_text}. {fix} and rerun the same command to resume.",
                               EXIT_CHECKPOINT_FAILED, "stopped: disk full" if disk else "stopped: checkpoint save failed")


# ------------------------------------------------------------------ exact data position


def epoch_feed(make_epoch: Callable[[tf.Tensor], tf.data.Dataset], start_epoch: int, start_batch: int, end_epoch: int) -> tf.data.Dataset:
    """The batches of epochs [start_epoch, end_epoch), skipping `start_batch` batches of the first.

    `make_epoch(e)` builds epoch `e` (an int64 tensor) shuffled with a seed derived from `e`: a resume reproduces it.
    """
    first, skip = tf.constant(start_epoch, tf.int64), tf.constant(start_batch, tf.int64)

    @tf.autograph.experimental.do_not_convert  # plain tf.data construction
    def one_epoch(epoch):
        return make_epoch(epoch).skip(tf.where(epoch == first, skip, tf.constant(0, tf.int64)))

    return tf.data.Dataset.range(start_epoch, end_epoch).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def fit_from_position(model: keras.Model, make_epoch, backup: ExactBackupAndRestore, epochs: int, validation_data,
                      callbacks: Sequence[keras.callbacks.Callback], dataset_options: Optional[tf.data.Options] = None, **fit_kwargs) -> dict:
    """`fit` from the restored (epoch, batch) to `epochs`: the rest of an interrupted epoch, then the others.

    Keras reads `epoch_feed`'s chained epochs through one iterator (`steps_per_epoch` given); returns the merged history.
    """
    epoch, batch = backup.restore()
    if backup.states.stopped_early or epoch >= epochs:  # nothing left: what EarlyStopping does at the end of `fit`
        backup.states.apply()
        if getattr(backup.states.early_stopping, "best_weights", None) is not None:
            model.set_weights(backup.states.early_stopping.best_weights)
        return {}
    segments = [(epoch, batch, epoch + 1)] if batch else []  # the rest of an interrupted epoch: a fit of its own
    if epoch + bool(batch) < epochs:
        segments.append((epoch + bool(batch), 0, epochs))
    history: dict[str, list] = {}
    model.stop_training = False
    for index, (first, skip, end) in enumerate(segments):
        if model.stop_training:
            break
        backup.final_segment = index == len(segments) - 1
        feed = epoch_feed(make_epoch, first, skip, end)
        result = model.fit(feed.with_options(dataset_options) if dataset_options else feed, validation_data=validation_data, initial_epoch=first,
                           epochs=end, steps_per_epoch=backup.steps_per_epoch - skip, callbacks=list(callbacks), shuffle=False, **fit_kwargs)
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
    return history
