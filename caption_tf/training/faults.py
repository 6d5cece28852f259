"""The attacks the tests make on a real training process, switched on by environment variables.

The kill and NaN tests run `train.py` as a user would; these hooks let them strike at an exact
point (after N batches, at step N) as well as at random moments (a SIGKILL from outside).
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import keras
import tensorflow as tf

CRASH_AFTER_BATCHES_ENV = "CAPTION_TF_CRASH_AFTER_BATCHES"  # SIGKILL this process after N of its batches
NAN_AT_STEP_ENV = "CAPTION_TF_NAN_AT_STEP"  # a weight becomes NaN after global step N


class FaultInjection(keras.callbacks.Callback):
    """Test hooks from the environment: SIGKILL this process after N of its batches; a NaN weight after step N.

    `position` is the `recovery.TrainingPosition` the checkpoints carry.
    """

    def __init__(self, position: tf.Module, crash_after: Optional[int], nan_at: Optional[int]):
        super().__init__()
        self.position, self.crash_after, self.nan_at, self._batches = position, crash_after, nan_at, 0

    @classmethod
    def from_environment(cls, position: tf.Module) -> Optional["FaultInjection"]:
        crash, nan = os.environ.get(CRASH_AFTER_BATCHES_ENV), os.environ.get(NAN_AT_STEP_ENV)
        return cls(position, int(crash) if crash else None, int(nan) if nan else None) if crash or nan else None

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self.nan_at is not None and self.position["step"] == self.nan_at:
            self.model.trainable_variables[0].assign(tf.fill(self.model.trainable_variables[0].shape, float("nan")))
        if self.crash_after is not None and self._batches >= self.crash_after:
            print(f"{CRASH_AFTER_BATCHES_ENV}: killing this process after {self._batches} batches", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
