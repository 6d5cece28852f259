"""Learning-rate schedules and the callbacks that steer training.

- `--lr-schedule constant`: the configured learning rate throughout.
- `--lr-schedule warmup_cosine`: `warmup_cosine`, Keras' `CosineDecay`: linear
  warmup over the first `--warmup-epochs`, then cosine decay to `COSINE_FLOOR` x the
  peak at the end of training; driven by optimizer steps (steps per epoch come from
  the dataset cardinality).
- `--lr-schedule plateau`: `keras.callbacks.ReduceLROnPlateau` on `val_loss`.

`ValidationBleu` greedy-decodes the validation images at each epoch end and
writes `val_bleu4` into the epoch logs, so `EarlyStopping(monitor="val_bleu4")`,
`CSVLogger` and TensorBoard see it. Training must not import evaluation, so the
BLEU function is passed in (the CLI passes
`caption_tf.evaluation.metrics.corpus_bleu_scores`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import keras
import numpy as np

from caption_tf.config import TrainConfig

COSINE_FLOOR = 0.0  # fraction of the peak rate left at the last step
PLATEAU_FACTOR = 0.5  # ReduceLROnPlateau: multiply the rate by this ...
PLATEAU_PATIENCE = 2  # ... after this many epochs without val_loss improvement
PLATEAU_MIN_LR = 1e-6
BLEU_MONITOR = "val_bleu4"
LR_LOG_KEY = "learning_rate"

# A BLEU scorer: (references per image, one hypothesis per image) -> {"bleu4": ..., ...}
BleuFunction = Callable[[list[list[str]], list[str]], dict]


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, floor: float = COSINE_FLOOR) -> keras.optimizers.schedules.CosineDecay:
    """Linear warmup to `peak` over `warmup_steps`, then cosine decay to `floor * peak` at `total_steps`.

    Keras' `CosineDecay` with `warmup_target`. The warmup starts at `peak / warmup_steps`,
    not 0, so the first update already moves.

    Example:

    >>> schedule = warmup_cosine(peak=1e-3, warmup_steps=10, total_steps=110)
    >>> [round(float(schedule(step)), 7) for step in (0, 10, 60, 110, 200)]
    [0.0001, 0.001, 0.0005, 0.0, 0.0]
    """
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"warmup_cosine needs total_steps >= 1 and warmup_steps >= 0, got total_steps={total_steps}, warmup_steps={warmup_steps}")
    warmup_steps = min(int(warmup_steps), int(total_steps))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / warmup_steps if warmup_steps else peak,
        decay_steps=max(int(total_steps) - warmup_steps, 1),
        alpha=floor,
        warmup_target=peak if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def learning_rate_for(cfg: TrainConfig, steps_per_epoch: int, replicas: int = 1, peak: Optional[float] = None):
    """The optimizer's learning rate: a float, or a `warmup_cosine` schedule.

    `peak` defaults to `cfg.learning_rate`; it is scaled linearly with the replicas
    (the global batch grows with them).

    Example:

    >>> learning_rate_for(TrainConfig(lr_schedule="constant", learning_rate=1e-3), steps_per_epoch=10)
    0.001
    """
    rate = (cfg.learning_rate if peak is None else peak) * replicas
    if cfg.lr_schedule != "warmup_cosine":
        return rate
    total = max(int(steps_per_epoch) * cfg.epochs, 1)
    return warmup_cosine(rate, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), total_steps=total)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate the optimizer applies at its current step (schedules evaluated)."""
    rate = optimizer.learning_rate  # Keras 3 evaluates a schedule at the current iteration here
    return float(keras.ops.convert_to_numpy(rate))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds `learning_rate` to the epoch logs (so CSVLogger and TensorBoard record it).

    Example:

    ```python
    model.fit(ds, callbacks=[LearningRateLogger(), keras.callbacks.TensorBoard("logs")])
    ```
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[LR_LOG_KEY] = current_learning_rate(self.model.optimizer)


class ValidationBleu(keras.callbacks.Callback):
    """Greedy-decodes validation grids at each epoch end and logs `val_bleu4`.

    `grids` are the validation feature grids [N, cells, dim], `references` their
    cleaned reference captions, `decode` maps token ids to text, `make_generator`
    builds a `CaptionGenerator` for the model, `bleu` scores captions.

    Example:

    ```python
    ValidationBleu(grids, refs, vocab.decode, lambda m: CaptionGenerator(m, 2, 3, 15), corpus_bleu_scores)
    ```
    """

    def __init__(self, grids: np.ndarray, references: list[list[str]], decode, make_generator, bleu: BleuFunction, batch_size: int = 64):
        super().__init__()
        self.grids, self.references, self.decode = grids, references, decode
        self.make_generator, self.bleu, self.batch_size = make_generator, bleu, batch_size
        self._generator = None

    def on_epoch_end(self, epoch, logs=None):
        if self._generator is None:  # built once: its tf.function traces once
            self._generator = self.make_generator(self.model)
        captions = []
        for start in range(0, len(self.grids), self.batch_size):
            tokens, _ = self._generator.greedy(self.grids[start : start + self.batch_size])
            captions.extend(self.decode(row) for row in tokens.numpy())
        score = float(self.bleu(self.references, captions)["bleu4"])
        if logs is not None:
            logs[BLEU_MONITOR] = score


def monitor_mode(monitor: str) -> str:
    """'max' for BLEU, 'min' for losses."""
    return "max" if "bleu" in monitor else "min"


def schedule_callbacks(
    cfg: TrainConfig,
    validation_bleu: Optional[ValidationBleu] = None,
    has_validation: bool = True,
) -> list[keras.callbacks.Callback]:
    """Callbacks that must run before the loggers: they add keys to the epoch logs.

    Order matters: Keras calls callbacks in list order with one shared `logs`
    dict, so BLEU and the learning rate are written before EarlyStopping,
    CSVLogger and TensorBoard read them.

    Example:

    >>> callbacks = schedule_callbacks(TrainConfig(lr_schedule="plateau")) + [keras.callbacks.CSVLogger("h.csv")]
    """
    monitor = cfg.early_stopping_monitor
    if monitor == BLEU_MONITOR and validation_bleu is None:
        raise ValueError(
            "--early-stopping-monitor val_bleu4 needs a validation split and a BLEU scorer "
            "(train.py passes one; from Python call train(cfg, bleu=corpus_bleu_scores))"
        )
    callbacks: list[keras.callbacks.Callback] = [LearningRateLogger()]
    if validation_bleu is not None:
        callbacks.insert(0, validation_bleu)
    if cfg.lr_schedule == "plateau":
        if not has_validation:
            raise ValueError("--lr-schedule plateau monitors val_loss: the dataset needs a validation split")
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE, min_lr=PLATEAU_MIN_LR, verbose=1
            )
        )
    return callbacks


def early_stopping(cfg: TrainConfig) -> list[keras.callbacks.Callback]:
    """EarlyStopping on `val_loss` (min) or `val_bleu4` (max) with best-weights restore, if enabled."""
    if cfg.early_stopping_patience <= 0:
        return []
    return [
        keras.callbacks.EarlyStopping(
            monitor=cfg.early_stopping_monitor,
            mode=monitor_mode(cfg.early_stopping_monitor),
            patience=cfg.early_stopping_patience,
            restore_best_weights=True,
            verbose=1,
        )
    ]


def validation_bleu_callback(
    grids: np.ndarray,
    references: Sequence[Sequence[str]],
    vocab,
    bleu: Optional[BleuFunction],
    batch_size: int,
    make_generator: Callable,
) -> Optional[ValidationBleu]:
    """A `ValidationBleu` for a vocabulary, or None when there is no scorer or no validation image.

    `make_generator` (model -> `CaptionGenerator`) is shared with the other callbacks that decode
    each epoch, so they share its traces.
    """
    if bleu is None or len(grids) == 0:
        return None
    return ValidationBleu(grids, [list(r) for r in references], vocab.decode, make_generator, bleu, batch_size)
