"""Peak decoder training memory with and without `--recompute-grad` (gradient checkpointing).

Method: TensorFlow's own allocator statistics, `tf.config.experimental.get_memory_info`.
On a GPU they are on by default; on a CPU they are off (the call reports zeros), so the
script switches them on through the C++ function `tsl::EnableCPUAllocatorStats()` in
`libtensorflow_framework.so.2` (via ctypes) before TensorFlow allocates anything. Each
configuration runs in a fresh Python process: build the decoder, trace and run one
training step, `reset_memory_stats`, run more steps, and report the peak bytes of live
tensors minus those live before the steps: what a training step adds on top of weights,
optimizer state and inputs, i.e. mostly the activations kept for the backward pass.

With `--recompute-grad` the train step uses `CaptionDecoder.checkpointed_loss`.

    python benchmarks/bench_memory.py [--max-length 40] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import quiet_tensorflow, report

CHILD = r"""
import ctypes, json, os, sys, time
import tensorflow as tf
gpu = bool(tf.config.list_physical_devices("GPU"))
device = "GPU:0" if gpu else "CPU:0"
if not gpu:  # CPU allocator statistics are off unless switched on before the first allocation
    ctypes.CDLL(os.path.join(os.path.dirname(tf.__file__), "libtensorflow_framework.so.2"))._ZN3tsl23EnableCPUAllocatorStatsEv()
import numpy as np, keras
from caption_tf.models.decoder import CaptionDecoder
from caption_tf.training.optimizers import FusedAdam
args = json.loads(sys.argv[1])
keras.utils.set_random_seed(0)
model = CaptionDecoder(vocab_size=args["vocab"], embedding_dim=64, units=args["units"], decoder=args["decoder"],
                       attention=args["attention"], dropout=0.1, recompute_grad=args["recompute"])
rng = np.random.default_rng(0)
grid = tf.constant(rng.random((args["batch"], args["cells"], args["dim"]), dtype=np.float32))
tokens = tf.constant(rng.integers(1, args["vocab"], (args["batch"], args["max_length"])).astype("int32"))
model.compile(optimizer=FusedAdam(1e-3))  # train.py's optimizer
model((grid, tokens[:, :-1]))
batches = tf.data.Dataset.from_tensors(((grid, tokens[:, :-1]), tokens[:, 1:])).repeat(args["steps"])
model.fit(batches.take(1), epochs=1, verbose=0)  # traces and builds the optimizer
tf.config.experimental.reset_memory_stats(device)
before = tf.config.experimental.get_memory_info(device)["current"]
started = time.perf_counter()
model.fit(batches, epochs=1, verbose=0)
seconds = (time.perf_counter() - started) / args["steps"]
peak = tf.config.experimental.get_memory_info(device)["peak"] - before
print(json.dumps({"peak_bytes": peak, "device": "GPU" if gpu else "CPU", "step_seconds": seconds}))
"""


def measure(settings: dict) -> dict:
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(settings)], cwd=root, capture_output=True, text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    quiet_tensorflow()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--grid", type=int, nargs=2, default=[64, 2048], help="cells, channels (InceptionV3 at 299 px)")
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=["lstm-bahdanau", "gru-luong"])
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        decoder, attention = config.split("-")
        peaks = {}
        for recompute in (False, True):
            settings = {"decoder": decoder, "attention": attention, "recompute": recompute, "batch": args.batch,
                        "cells": args.grid[0], "dim": args.grid[1], "units": args.units, "vocab": args.vocab,
                        "max_length": args.max_length, "steps": args.steps}
            result = measure(settings)
            peaks[recompute] = result["peak_bytes"]
            rows.append({"decoder": config, "recompute_grad": recompute, "device": result["device"],
                         "train-step peak MB": result["peak_bytes"] / 2**20,
                         "s/step": result["step_seconds"]})
        rows[-1]["reduction"] = f"{1 - peaks[True] / peaks[False]:.0%}"
    report("memory", rows, {
        "setting": f"batch {args.batch}, grid {args.grid}, units {args.units}, vocab {args.vocab}, max length {args.max_length}",
        "method": "peak bytes of live tensors (TF allocator stats, CPU stats switched on) added by training steps, fresh process per row",
        "goal": "recompute_grad >= 30% lower peak decoder memory at max length 40",
    })


if __name__ == "__main__":
    main()
