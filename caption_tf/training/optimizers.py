"""The optimizer: `keras.optimizers.Adam`, each variable updated by TensorFlow's fused Adam kernel.

Keras 3's Adam builds every variable's update from some 40 small graph ops (reads, casts, the
step's powers of beta, three assignments); a caption decoder has 17-64 small variables, so on
a CPU the update was 1.4-2.4 ms of an 11-15 ms train step, paid in op dispatch, not arithmetic
(benchmarks/RESULTS.md). `ResourceApplyAdam` computes the same update, with the same formula,
in one kernel per variable; the step's scalars are computed once, not once per variable.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable("caption_tf")
class FusedAdam(keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose per-variable update is TensorFlow's fused `ResourceApplyAdam`.

    The same arguments, variables (checkpoints of either load into the other) and update, to
    float rounding, as Keras's Adam (Kingma & Ba, 2015, with epsilon outside the square root):

        m += (g - m) (1 - beta_1);  v += (g^2 - v) (1 - beta_2)
        w -= lr sqrt(1 - beta_2^t) / (1 - beta_1^t) m / (sqrt(v) + epsilon)

    Gradient clipping, weight decay, EMA and loss scaling stay Keras's (they run around
    `update_step`). Two cases keep Keras's own update: `amsgrad=True`, and sparse gradients
    (`tf.IndexedSlices`, an embedding's): for a row that several words of a batch share, Keras
    squares each word's slice before summing them into the second moment, where the dense
    kernel would square the sum; keeping Keras's keeps the update `keras.optimizers.Adam`'s.
    Under `tf.distribute` each device's copy of a variable is updated by its own kernel, as
    Keras's update does.

    Example:

    >>> variable = keras.Variable([1.0, 2.0])
    >>> optimizer = FusedAdam(0.1)
    >>> optimizer.apply([keras.ops.convert_to_tensor([0.5, -0.5])], [variable])
    >>> [round(float(x), 4) for x in variable.numpy()]
    [0.9, 2.1]
    """

    _step_scalars = None  # the current step's scalars while its variables are updated

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        # Keras's TensorFlow backend calls this once per step (in cross-replica context under a
        # strategy) with every variable: the scalars are built here once. If a Keras version
        # stops calling it, `update_step` builds them per variable: slower, the same update.
        self._step_scalars = self._scalars(learning_rate)
        try:
            return super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
        finally:
            self._step_scalars = None

    def _scalars(self, learning_rate) -> dict:
        step = tf.cast(self.iterations + 1, "float32")
        beta_1, beta_2 = tf.constant(self.beta_1, "float32"), tf.constant(self.beta_2, "float32")
        return {
            "lr": tf.cast(learning_rate, "float32"),
            "beta1": beta_1,
            "beta2": beta_2,
            "beta1_power": tf.pow(beta_1, step),
            "beta2_power": tf.pow(beta_2, step),
            "epsilon": tf.constant(self.epsilon, "float32"),
        }

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        scalars = self._step_scalars or self._scalars(learning_rate)
        if variable.dtype != tf.float32:  # the kernel wants every input in the variable's dtype
            scalars = {name: tf.cast(value, variable.dtype) for name, value in scalars.items()}
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            grad=tf.cast(gradient, variable.dtype),
            **scalars,
        )
