"""Captions per second: batched greedy and beam search vs a per-image greedy Python loop.

The decoder is randomly initialised (throughput does not depend on training; a random
model rarely says <end>, so every method decodes the full length, except the Python
loop, which may stop early: that only favours the baseline).

    python benchmarks/bench_decoding.py [--batch-sizes 1 8 32 64] [--loop-images 16]
    python benchmarks/bench_decoding.py --first-calls     # tracing: first greedy/beam call per decoder family

`--first-calls` builds the minimal preset's LSTM + Bahdanau and Transformer decoders (35-word
vocabulary, like the shapes dataset) and times, for a batch of 32 with `no_repeat_ngram=3`, the
first greedy and beam-3 calls (tracing included), then captions/s of the next calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from common import best_time, quiet_tensorflow, report

quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caption_tf.config import load_config  # noqa: E402
from caption_tf.models.decoder import CaptionDecoder, build_decoder  # noqa: E402
from caption_tf.models.decoding import CaptionGenerator  # noqa: E402

START, END = 2, 3


def python_loop_greedy(model, grid, max_length):
    """The naive baseline: one image at a time, one eager step call per word."""
    captions = []
    for image in grid:
        values, keys, state = model.encode(image[None])
        token, words = tf.constant([START]), []
        for _ in range(max_length - 1):
            logits, state, _ = model.step(token, state, values, keys)
            token = tf.argmax(logits, -1, output_type=tf.int32)
            if int(token[0]) == END:
                break
            words.append(int(token[0]))
        captions.append(words)
    return captions


def first_calls(args) -> None:
    """Seconds of the first greedy and beam calls (tracing) per family, then captions/s."""
    preset, rows = load_config("minimal").model, []
    grid = tf.constant(np.random.default_rng(0).random((32, *args.grid), dtype=np.float32))
    for decoder in ("lstm", "transformer"):
        keras.utils.set_random_seed(0)
        model = build_decoder(dataclasses.replace(preset, decoder=decoder), 35, tuple(args.grid), args.max_length)
        generator = CaptionGenerator(model, START, END, args.max_length, no_repeat_ngram=3)
        greedy = lambda: generator.greedy(grid)[0].numpy()  # noqa: E731
        beam = lambda: generator.beam(grid, args.beam_size, 0.7)[0].numpy()  # noqa: E731
        row = {"decoder": f"{decoder} ({model.count_params():,} parameters)"}
        for name, fn in (("greedy", greedy), (f"beam {args.beam_size}", beam)):
            started = time.perf_counter()
            fn()
            row[f"first {name} call s"] = time.perf_counter() - started
            row[f"{name} captions/s"] = 32 / best_time(fn, repeats=args.repeats, warmup=0)
        rows.append(row)
    report("decoding_first_calls", rows, {"sizes": f"batch 32, grid {args.grid}, max length {args.max_length}, no_repeat_ngram 3"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--loop-images", type=int, default=16)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--grid", type=int, nargs=2, default=[25, 2048], help="cells, channels (InceptionV3 at 224 px)")
    parser.add_argument("--max-length", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--first-calls", action="store_true", help="time tracing (first calls) of greedy and beam per family")
    args = parser.parse_args()
    if args.first_calls:
        return first_calls(args)

    keras.utils.set_random_seed(0)
    model = CaptionDecoder(vocab_size=args.vocab, embedding_dim=64, units=args.units)
    grid = np.random.default_rng(0).random((max(args.batch_sizes + [args.loop_images]), *args.grid), dtype=np.float32)
    model((grid[:1], np.zeros((1, args.max_length - 1), "int32")))
    generator = CaptionGenerator(model, START, END, args.max_length)

    rows = []
    loop_grid = grid[: args.loop_images]
    started = time.perf_counter()
    python_loop_greedy(model, loop_grid[:1], args.max_length)  # warm-up
    loop_seconds = best_time(lambda: python_loop_greedy(model, loop_grid, args.max_length), repeats=1, warmup=0)
    loop_rate = args.loop_images / loop_seconds
    rows.append({"method": "greedy, per-image Python loop (eager)", "batch": 1, "captions/s": loop_rate, "x loop": 1.0})
    for batch in args.batch_sizes:
        images = tf.constant(grid[:batch])
        for method, fn in (
            ("greedy, batched tf.function", lambda: generator.greedy(images)[0].numpy()),
            (f"beam {args.beam_size}, batched tf.function", lambda: generator.beam(images, args.beam_size, 0.7)[0].numpy()),
        ):
            seconds = best_time(fn, repeats=args.repeats, warmup=1)
            rows.append({"method": method, "batch": batch, "captions/s": batch / seconds, "x loop": batch / seconds / loop_rate})
    best_beam = max(r["x loop"] for r in rows if r["method"].startswith("beam"))
    report(
        "decoding",
        rows,
        {
            "model": f"LSTM+Bahdanau units {args.units}, vocab {args.vocab}, grid {args.grid}, max length {args.max_length}",
            f"goal: batched beam {args.beam_size} >= 10x per-image greedy loop": f"{best_beam:.1f}x",
            "total seconds": round(time.perf_counter() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
