"""MirroredStrategy over two logical CPU devices trains exactly like one device.

Logical devices must be configured before TensorFlow initialises its devices,
so the distributed run happens in a fresh Python process.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from caption_tf.models.decoder import CaptionDecoder
    from caption_tf.training.runtime import resolve_jit

    VOCAB, CELLS, DIM, LENGTH, PAIRS, GLOBAL_BATCH = 16, 4, 8, 8, 32, 8
    rng = np.random.default_rng(0)
    grid = rng.random((PAIRS, CELLS, DIM), dtype=np.float32)
    tokens = rng.integers(1, VOCAB, (PAIRS, LENGTH)).astype("int32")
    # Equal real-token counts per replica half-batch: then the mean of the replicas' mean
    # losses is the global mean, and the runs must agree up to float rounding.
    tokens[:, -2:] = 0
    data = tf.data.Dataset.from_tensor_slices(((grid, tokens[:, :-1]), tokens[:, 1:])).batch(GLOBAL_BATCH)

    def train(strategy, initial=None):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = CaptionDecoder(vocab_size=VOCAB, embedding_dim=8, units=16)
            model((np.zeros((1, CELLS, DIM), "float32"), np.zeros((1, LENGTH - 1), "int32")))
            if initial is not None:
                model.set_weights(initial)
            start = model.get_weights()
            # SGD, not Adam: Adam is blind to a wrong gradient scale (e.g. a missing 1/replicas).
            model.compile(optimizer=keras.optimizers.SGD(0.5))
        history = model.fit(data, epochs=2, verbose=0, shuffle=False).history["loss"]
        return start, model.get_weights(), history

    start, single, single_loss = train(tf.distribute.get_strategy())
    mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    _, mirrored, mirrored_loss = train(mirrored_strategy, initial=start)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jit = resolve_jit("on", mirrored_strategy)
    json.dump({
        "replicas": mirrored_strategy.num_replicas_in_sync,
        "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(single, mirrored)),
        "max_update": max(float(np.max(np.abs(a - b))) for a, b in zip(single, start)),
        "single_loss": single_loss, "mirrored_loss": mirrored_loss,
        "jit_on_under_cpu_mirrored": jit, "jit_warning": " ".join(str(w.message) for w in caught),
    }, open(sys.argv[1], "w"))
    """
)


def test_mirrored_two_cpus_matches_single_device(tmp_path):
    script, result = tmp_path / "mirrored.py", tmp_path / "result.json"
    script.write_text(SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(result)], cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["replicas"] == 2
    assert out["max_update"] > 1e-3  # training moved the weights, so agreement means something
    assert out["max_weight_diff"] < 1e-4, out
    assert abs(out["single_loss"][-1] - out["mirrored_loss"][-1]) < 1e-4, out
    assert out["jit_on_under_cpu_mirrored"] is False and "XLA" in out["jit_warning"]
