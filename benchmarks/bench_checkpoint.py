"""Cost of a checkpoint save: how long it blocks training, plain write vs verified store (sync, async).

The model is Dense(512->2*units->units->10) with a built Adam optimizer
(units=1024: 3.2M parameters, ~38 MB checkpoint). Medians over `--repeats` saves.

    python benchmarks/bench_checkpoint.py [--units 1024] [--repeats 5] [--dir FOLDER]
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

from caption_tf.training.integrity import CHECKPOINT_FILE_PREFIX, VerifiedCheckpointStore  # noqa: E402


def benchmark_save(directory: str | Path, units: int = 1024, repeats: int = 5) -> dict[str, float]:
    """Median seconds a save blocks the caller: plain write, sync store, async store (and its total)."""
    model = keras.Sequential(
        [keras.Input((512,)), keras.layers.Dense(2 * units), keras.layers.Dense(units), keras.layers.Dense(10)]
    )
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    directory = Path(directory)
    timings: dict[str, list[float]] = {"plain_write_s": [], "sync_blocking_s": [], "async_blocking_s": [], "async_total_s": []}
    sync_store = VerifiedCheckpointStore(directory / "sync", ckpt, keep=1, async_save=False)
    async_store = VerifiedCheckpointStore(directory / "async", ckpt, keep=1, async_save=True)
    for step in range(repeats):
        start = time.perf_counter()
        ckpt.write(str(directory / "plain" / f"step{step}" / CHECKPOINT_FILE_PREFIX))
        timings["plain_write_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sync_store.save(step)
        timings["sync_blocking_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        async_store.save(step)
        timings["async_blocking_s"].append(time.perf_counter() - start)
        async_store.flush()
        timings["async_total_s"].append(time.perf_counter() - start)
    async_store.close()
    result = {key: float(np.median(values)) for key, values in timings.items()}
    result["parameters"] = model.count_params()
    result["checkpoint_mb"] = (sync_store.last_checkpoint_bytes or 0) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Time sync vs async verified checkpoint saves.")
    parser.add_argument("--units", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        result = benchmark_save(folder, args.units, args.repeats)
    report("checkpoint", [result], notes={"units": args.units, "repeats": args.repeats})


if __name__ == "__main__":
    main()
