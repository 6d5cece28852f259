"""Train step time and tokens/s: LSTM/GRU x Bahdanau/Luong, XLA on/off, recompute on/off.

Minimal-preset sizes by default: batch 32, 128 units, embedding 64, grid 25x2048
(InceptionV3 at 224 px), max length 15, vocab 1000, Adam. Random features and tokens
(step time does not depend on what is learned). Each configuration gets a fresh decoder,
the compiled train step (`common.train_step`) is called `--warmup` times (tracing, XLA compilation) and then timed
`--steps` times; the table shows the median step and the tokens (targets, no padding)
per second at that median.

    python benchmarks/bench_train_step.py [--steps 20] [--grid 64 2048]
"""

from __future__ import annotations

import argparse
import itertools
import time

from common import quiet_tensorflow, report, train_step

quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from caption_tf.models.decoder import CaptionDecoder  # noqa: E402
from caption_tf.training.optimizers import FusedAdam  # noqa: E402


def step_times(model, batch, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first call: trace/compile + one step, median step seconds)."""
    (grid, inputs), targets = batch
    started = time.perf_counter()
    train_step(model, (grid, inputs), targets)
    first = time.perf_counter() - started
    for _ in range(warmup - 1):
        train_step(model, (grid, inputs), targets)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        train_step(model, (grid, inputs), targets)
        times.append(time.perf_counter() - started)
    return first, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--embedding", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--grid", type=int, nargs=2, default=[25, 2048], help="cells, channels")
    parser.add_argument("--max-length", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--decoders", nargs="+", default=["lstm", "gru"])
    parser.add_argument("--attentions", nargs="+", default=["bahdanau", "luong"])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    grid = rng.random((args.batch, *args.grid), dtype=np.float32)
    tokens = rng.integers(4, args.vocab, (args.batch, args.max_length)).astype("int32")
    batch = ((grid, tokens[:, :-1]), tokens[:, 1:])
    tokens_per_step = args.batch * (args.max_length - 1)
    rows = []
    for decoder, attention, jit, recompute in itertools.product(args.decoders, args.attentions, (False, True), (False, True)):
        keras.utils.set_random_seed(0)
        model = CaptionDecoder(args.vocab, args.embedding, args.units, decoder, attention, dropout=0.1, recompute_grad=recompute)
        model.compile(optimizer=FusedAdam(1e-3), jit_compile=jit)  # train.py's optimizer
        model(batch[0])  # builds the weights
        first, median = step_times(model, batch, args.steps, args.warmup)
        rows.append({
            "decoder": decoder, "attention": attention, "xla": jit, "recompute": recompute,
            "first call s": first, "median step ms": median * 1000, "tokens/s": tokens_per_step / median,
        })
        print(rows[-1], flush=True)
    report("train_step", rows, {
        "setting": f"batch {args.batch}, units {args.units}, embedding {args.embedding}, vocab {args.vocab}, "
                   f"grid {args.grid[0]}x{args.grid[1]}, max length {args.max_length}, dropout 0.1, Adam",
        "method": f"median of {args.steps} train steps after {args.warmup} warm-up calls; "
                  f"tokens/s = {tokens_per_step} target tokens per step / median step",
    })


if __name__ == "__main__":
    main()
