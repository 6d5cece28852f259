"""Whole cost of crash recovery in real training: what checkpointing adds to a run's time.

The same run (`--preset`, `--epochs`) is trained, each time in a fresh process, with:

- `none`: checkpointing switched off in that process only (`ExactBackupAndRestore` saves nothing);
- `epoch`: `--checkpoint-every 0`, a verified checkpoint at each epoch end only;
- `every-N-async`: `--checkpoint-every N` (the presets' setting), TensorFlow-async writes;
- `every-N-sync`: the same with `--no-async-checkpoint`.

Time is run.json's `train_seconds`: `fit` from its first batch to the end of the final wait for
the last background write, so every save counts, epoch ends included, with the waits for async
writes and the CPU the background writes take from training. The overhead of a setting is its
median time over the median of `none`. The settings run interleaved, `--repeats` rounds, so load
from other processes on the machine spreads over all of them.

    python benchmarks/bench_checkpoint_overhead.py [--preset minimal] [--epochs 2] [--every 50] [--repeats 3]
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
    run_dir = train(load_config(preset, overrides))
    print("RUN_JSON " + (run_dir / "run.json").read_text().replace("\n", " "), flush=True)


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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.preset, json.loads(args.overrides), args.child)
        return

    with contextlib.nullcontext(args.dir) if args.dir else tempfile.TemporaryDirectory() as folder:
        base = {"epochs": args.epochs, "resume": "never", "data_root": f"{folder}/data", "cache_dir": f"{folder}/cache",
                "runs_dir": f"{folder}/runs"}
        if args.num_images:
            base["num_images"] = args.num_images
        settings = variants(args.every)
        seconds: dict[str, list[float]] = {name: [] for name in settings}
        blocking: dict[str, list[float]] = {name: [] for name in settings}
        loads = [os.getloadavg()[0]]
        run_once(args.preset, {**base, "epochs": 1, "checkpoint_every": 0, "run_name": "warm-up"}, "epoch")  # builds the feature cache
        for round_index in range(args.repeats):
            for name, extra in settings.items():
                info = run_once(args.preset, {**base, **extra, "run_name": name}, name)
                seconds[name].append(float(info["train_seconds"]))
                blocking[name].append(float(info.get("checkpoint_seconds", 0.0)))
                loads.append(os.getloadavg()[0])
                print(f"round {round_index + 1} {name}: {info['train_seconds']} s (checkpoint_seconds {blocking[name][-1]})", flush=True)
    baseline = float(np.median(seconds["none"]))
    rows = []
    for name in settings:
        median = float(np.median(seconds[name]))
        rows.append({"setting": name, "median_train_s": median, "runs_s": " / ".join(f"{s:.1f}" for s in seconds[name]),
                     "overhead_pct": 100.0 * (median - baseline) / baseline,
                     "median_checkpoint_seconds": float(np.median(blocking[name]))})
    report("checkpoint_overhead", rows, notes={"preset": args.preset, "epochs": args.epochs, "repeats": args.repeats,
                                               "num_images": args.num_images or "preset",
                                               "load_average_1min": f"{min(loads):.1f}-{max(loads):.1f}", "time": time.strftime("%Y-%m-%d %H:%M")})


if __name__ == "__main__":
    main()
