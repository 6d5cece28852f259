"""FusedAdam (training/optimizers.py) is Keras's Adam to float rounding: the same weights and slots
after training, on one device, under XLA, on two replicas, with amsgrad; and a Keras Adam checkpoint
resumes into it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import tensorflow as tf

from caption_tf.training.optimizers import FusedAdam
from conftest import REPO_ROOT

SAME_TRAINING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from caption_tf.training.optimizers import FusedAdam

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 16, (64, 4)).astype("int32")
    targets = rng.normal(size=(64, 2)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((tokens, targets)).batch(16)

    def train(optimizer_class, strategy=None, jit=False, **options):
        with (strategy or tf.distribute.get_strategy()).scope():
            keras.utils.set_random_seed(0)
            # An embedding (sparse gradients: Keras's update) and dense layers (the fused kernel).
            # Not a whole decoder: its attention key biases get gradients of pure rounding noise,
            # which Adam turns into steps of +-lr, so float32 rounding alone sends two Adams apart.
            model = keras.Sequential([
                keras.Input((4,), dtype="int32"), keras.layers.Embedding(16, 8), keras.layers.Flatten(),
                keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(2),
            ])
            optimizer = optimizer_class(0.01, clipnorm=1.0, **options)  # clipped as train.py clips
            model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
        model.fit(data, epochs=3, verbose=0, shuffle=False)  # 12 steps
        if optimizer_class is FusedAdam and strategy is None and not jit and not options:
            @tf.function
            def update(x, y):
                with tf.GradientTape() as tape:
                    loss = keras.losses.mean_squared_error(y, model(x))
                optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

            graph = update.get_concrete_function(*next(iter(data))).graph.as_graph_def()  # traced, not run
            nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
            result["fused_kernels"] = [node.op for node in nodes].count("ResourceApplyAdam")
        return [v.numpy() for v in model.trainable_variables], [v.numpy() for v in optimizer.variables]

    def differences(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(a[0] + a[1], b[0] + b[1]))

    result = {}
    mirrored = lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras_adam = train(keras.optimizers.Adam)
    result.update({
        "one_device": differences(keras_adam, train(FusedAdam)),
        "xla": differences(train(keras.optimizers.Adam, jit=True), train(FusedAdam, jit=True)),
        "two_replicas": differences(train(keras.optimizers.Adam, mirrored()), train(FusedAdam, mirrored())),
        "amsgrad": differences(train(keras.optimizers.Adam, amsgrad=True), train(FusedAdam, amsgrad=True)),
        "trained": max(float(np.max(np.abs(x - y))) for x, y in zip(keras_adam[0], train(keras.optimizers.SGD)[0])),
    })
    with open(sys.argv[1], "w") as out:
        json.dump(result, out)
    """
)


def test_fused_adam_trains_exactly_as_keras_adam(tmp_path):
    """Same weights and slots after 12 clipped steps: one device, XLA, two MirroredStrategy
    replicas (two logical CPUs: a fresh process), amsgrad (Keras's update). The decoders train
    with it in every train.py test (kill/resume exactness included)."""
    out = tmp_path / "result.json"
    script = tmp_path / "same_training.py"
    script.write_text(SAME_TRAINING_SCRIPT)
    subprocess.run([sys.executable, str(script), str(out)], cwd=REPO_ROOT, check=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["trained"] > 1e-3  # the optimizers moved the weights: a comparison, not two no-ops
    assert result["fused_kernels"] == 4  # the dense kernels and biases; the embedding's sparse gradient takes Keras's update
    for setting in ("one_device", "xla", "two_replicas", "amsgrad"):
        assert result[setting] < 1e-5, (setting, result)  # float32 rounding: the kernel's sums differ in the last bits


def test_a_keras_adam_checkpoint_resumes_into_fused_adam(tmp_path):
    """Runs saved before FusedAdam resume: its variables are Keras Adam's, in the same order,
    and the next step after the restore is Keras Adam's next step."""
    def optimizer_and_variable(optimizer_class):
        variable = keras.Variable(np.array([1.0, -2.0, 3.0], "float32"))
        optimizer = optimizer_class(0.1)
        optimizer.build([variable])
        return optimizer, variable

    saved, variable = optimizer_and_variable(keras.optimizers.Adam)
    for gradient in ([0.5, -0.5, 1.0], [0.2, 0.1, -0.3]):
        saved.apply([tf.constant(gradient)], [variable])
    prefix = tf.train.Checkpoint(optimizer=saved, variable=variable).write(str(tmp_path / "ckpt"))

    restored, restored_variable = optimizer_and_variable(FusedAdam)
    tf.train.Checkpoint(optimizer=restored, variable=restored_variable).read(prefix).assert_consumed()
    assert int(restored.iterations.numpy()) == 2
    np.testing.assert_array_equal(restored.variables[2].numpy(), saved.variables[2].numpy())  # the first moment
    next_gradient = tf.constant([1.0, 1.0, -1.0])
    saved.apply([next_gradient], [variable])
    restored.apply([next_gradient], [restored_variable])
    np.testing.assert_allclose(restored_variable.numpy(), variable.numpy(), rtol=1e-6)  # float32 rounding
