"""Cost of a checkpoint save: how long it holds training up, plain write vs verified (sync, TensorFlow async).

The model is Dense(512->2*units->units->10) with a built Adam optimizer (units=1024: 3.2M
parameters, ~36 MB checkpoint), saved the way training saves it (`ExactBackupAndRestore`'s
checkpoint: the TF variables under the Keras ones). Medians over `--repeats` saves; the
weights change between saves, as in training.

    python benchmarks/bench_checkpoint.py [--units 1024] [--repeats 7] [--dir FOLDER]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import quiet_tensorflow, report

quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caption_tf.training.checkpoints import VerifiedCheckpointManager  # noqa: E402


def benchmark_save(directory: str | Path, units: int = 1024, repeats: int = 7) -> dict[str, float]:
    """Median seconds a save blocks the caller: plain write, verified sync, verified async (and its total)."""
    model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(2 * units), keras.layers.Dense(units), keras.layers.Dense(10)])
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    ckpt = tf.train.Checkpoint(model=[v.value for v in model.variables], optimizer=[v.value for v in optimizer.variables])
    directory = Path(directory)
    timings: dict[str, list[float]] = {"plain_write_s": [], "sync_blocking_s": [], "async_blocking_s": [], "async_total_s": []}
    sync = VerifiedCheckpointManager(ckpt, directory / "sync", max_to_keep=1, async_save=False)
    background = VerifiedCheckpointManager(ckpt, directory / "async", max_to_keep=1, async_save=True)
    for step in range(1, repeats + 2):  # the first round (async: creating its CPU copies, tracing) is not counted
        for variable in model.trainable_variables:
            variable.assign_add(tf.ones_like(variable))
        rounds = {}
        start = time.perf_counter()
        ckpt.write(str(directory / "plain" / f"step{step}" / "ckpt"))
        rounds["plain_write_s"] = time.perf_counter() - start
        start = time.perf_counter()
        sync.save(step)
        rounds["sync_blocking_s"] = time.perf_counter() - start
        start = time.perf_counter()
        background.save(step)
        rounds["async_blocking_s"] = time.perf_counter() - start
        background.flush()
        rounds["async_total_s"] = time.perf_counter() - start
        if step > 1:
            for key, value in rounds.items():
                timings[key].append(value)
    background.close()
    result = {key: float(np.median(values)) for key, values in timings.items()}
    result["parameters"] = model.count_params()
    result["checkpoint_mb"] = sync.last_published.total_bytes / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Time sync vs TensorFlow-async verified checkpoint saves.")
    parser.add_argument("--units", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        result = benchmark_save(folder, args.units, args.repeats)
    report("checkpoint", [result], notes={"units": args.units, "repeats": args.repeats})


if __name__ == "__main__":
    main()
