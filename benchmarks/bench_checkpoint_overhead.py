"""Whole cost of crash recovery in real training: what checkpointing adds to a run's time.

The same run (`--preset`, `--epochs`) is trained, each time in a fresh process, with:

- `none`: checkpointing switched off in that process only (`ExactBackupAndRestore` saves nothing);
- `epoch`: `--checkpoint-every 0`, a verified checkpoint at each epoch end only;
- `every-N-async`: `--checkpoint-every N` (the presets' setting), TensorFlow-async writes;
- `every-N-sync`: the same with `--no-async-checkpoint`.

Three figures per setting, medians over `--repeats` interleaved rounds:

- `train_s`: run.json's `train_seconds`, wall time of `fit` from its first batch to the end of
  the final wait for the last background write: every save counts, epoch ends included.
- `checkpoint_s`: run.json's `checkpoint_seconds`, how long saves and waits held training up.
- `cpu_s`: CPU seconds of the whole training process (all its threads, the background writes
  included; data loading and model building are the same in every setting). On a shared machine
  this is far steadier than wall time, which other processes' load moves by tens of percent.

    python benchmarks/bench_checkpoint_overhead.py [--preset minimal] [--epochs 2] [--every 50] [--repeats 3]

`--per-save` instead times every single save, in one process: the preset's decoder (vocabulary 35,
InceptionV3 5x5x2048 grid, as on the shapes data) fitted for 3 epochs of 20 batches on random
features, with saves at epoch ends only or every 10 batches, async and sync.

    python benchmarks/bench_checkpoint_overhead.py --per-save
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import quiet_tensorflow, report

quiet_tensorflow()


def child(preset: str, overrides: dict, variant: str) -> None:
    """Train once in this process and print run.json as one JSON line."""
    from caption_tf.config import load_config
    from caption_tf.training import recovery
    from caption_tf.training.trainer import train

    if variant == "none":
        recovery.ExactBackupAndRestore._save_model = lambda self, logs=None, epoch_end=False: None
    started = time.process_time()
    run_dir = train(load_config(preset, overrides))
    info = {**json.loads((run_dir / "run.json").read_text()), "cpu_seconds": time.process_time() - started}
    print("RUN_JSON " + json.dumps(info), flush=True)


def per_save(preset: str) -> list[dict]:
    """Seconds each save blocked `fit`, in order, for epoch-end and every-10-batch saves, async and sync."""
    import keras
    import tensorflow as tf

    from caption_tf.config import load_config
    from caption_tf.models.decoder import build_decoder
    from caption_tf.training.optimizers import FusedAdam
    from caption_tf.training.recovery import ExactBackupAndRestore

    cfg, rows = load_config(preset), []
    rng = np.random.default_rng(0)
    grids = rng.normal(size=(640, 25, 2048)).astype("float32")
    tokens = rng.integers(1, 35, size=(640, 15)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices(((grids, tokens[:, :-1]), tokens[:, 1:])).batch(32)  # 20 batches
    for save_freq, async_save in (("epoch", True), (10, True), ("epoch", False), (10, False)):
        keras.utils.set_random_seed(0)
        model = build_decoder(cfg.model, 35, (25, 2048), 15)
        model.compile(optimizer=FusedAdam(1e-3))  # train.py's optimizer
        with tempfile.TemporaryDirectory() as folder:
            backup = ExactBackupAndRestore(folder, model, steps_per_epoch=20, save_freq=save_freq, async_save=async_save)
            blocked, save = [], backup.store.save

            def timed(step, metadata=None, save=save, blocked=blocked):
                started = time.perf_counter()
                save(step, metadata)
                blocked.append(f"{step}: {time.perf_counter() - started:.3f}")

            backup.store.save = timed
            model.fit(data, epochs=3, callbacks=[backup], verbose=0)
            rows.append({"saves": f"every {save_freq}" if save_freq != "epoch" else "epoch ends", "mode": "async" if async_save else "sync",
                         "seconds blocked per save (step: s)": ", ".join(blocked), "total incl. final wait": backup.blocking_seconds,
                         "checkpoint_mb": backup.store.last_published.total_bytes / 2**20})
    return rows


def variants(every: int) -> dict[str, dict]:
    return {
        "none": {"checkpoint_every": every},
        "epoch": {"checkpoint_every": 0},
        f"every-{every}-async": {"checkpoint_every": every, "async_checkpoint": True},
        f"every-{every}-sync": {"checkpoint_every": every, "async_checkpoint": False},
    }


def run_once(preset: str, overrides: dict, variant: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--preset", preset, "--overrides", json.dumps(overrides)],
        capture_output=True, text=True, check=False,
    )
    line = next((line for line in done.stdout.splitlines() if line.startswith("RUN_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{variant}: training failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(line[len("RUN_JSON "):])


def main() -> None:
    parser = argparse.ArgumentParser(description="Time a training run with and without checkpoints.")
    parser.add_argument("--preset", default="minimal")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--every", type=int, default=50, help="--checkpoint-every of the mid-epoch settings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=None, help="dataset size (default: the preset's)")
    parser.add_argument("--dir", default=None, help="data, feature cache and runs go here and are kept (default: a temp folder)")
    parser.add_argument("--per-save", action="store_true", help="time each save of a short in-process fit instead")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.preset, json.loads(args.overrides), args.child)
        return
    if args.per_save:
        report("checkpoint_per_save", per_save(args.preset), notes={"preset": args.preset, "load_average_1min": f"{os.getloadavg()[0]:.1f}"})
        return

    with contextlib.nullcontext(args.dir) if args.dir else tempfile.TemporaryDirectory() as folder:
        base = {"epochs": args.epochs, "resume": "never", "data_root": f"{folder}/data", "cache_dir": f"{folder}/cache",
                "runs_dir": f"{folder}/runs"}
        if args.num_images:
            base["num_images"] = args.num_images
        settings = variants(args.every)
        seconds: dict[str, list[float]] = {name: [] for name in settings}
        blocking: dict[str, list[float]] = {name: [] for name in settings}
        cpu: dict[str, list[float]] = {name: [] for name in settings}
        loads = [os.getloadavg()[0]]
        run_once(args.preset, {**base, "epochs": 1, "checkpoint_every": 0, "run_name": "warm-up"}, "epoch")  # builds the feature cache
        for round_index in range(args.repeats):
            for name, extra in settings.items():
                info = run_once(args.preset, {**base, **extra, "run_name": name}, name)
                seconds[name].append(float(info["train_seconds"]))
                blocking[name].append(float(info.get("checkpoint_seconds", 0.0)))
                cpu[name].append(float(info["cpu_seconds"]))
                loads.append(os.getloadavg()[0])
                print(f"round {round_index + 1} {name}: {info['train_seconds']} s, checkpoint_seconds {blocking[name][-1]}, "
                      f"CPU {cpu[name][-1]:.1f} s", flush=True)
    wall_base, cpu_base = float(np.median(seconds["none"])), float(np.median(cpu["none"]))
    rows = []
    for name in settings:
        wall, cpu_s, held = float(np.median(seconds[name])), float(np.median(cpu[name])), float(np.median(blocking[name]))
        rows.append({"setting": name, "train_s": wall, "train_s_runs": " / ".join(f"{s:.1f}" for s in seconds[name]),
                     "wall_overhead_pct": 100.0 * (wall - wall_base) / wall_base, "checkpoint_s": held,
                     "checkpoint_pct_of_train": 100.0 * held / wall, "cpu_s": cpu_s,
                     "cpu_s_runs": " / ".join(f"{s:.1f}" for s in cpu[name]), "cpu_overhead_pct": 100.0 * (cpu_s - cpu_base) / cpu_base})
    report("checkpoint_overhead", rows, notes={"preset": args.preset, "epochs": args.epochs, "repeats": args.repeats,
                                               "num_images": args.num_images or "preset",
                                               "load_average_1min": f"{min(loads):.1f}-{max(loads):.1f}", "time": time.strftime("%Y-%m-%d %H:%M")})


if __name__ == "__main__":
    main()
