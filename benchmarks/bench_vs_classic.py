"""Train-step throughput of every decoder family against the classic hand-written tutorial loop.

The reference (`classic_loop.py`, written here from the algorithm) is the classic TensorFlow
captioning tutorial's loop: GRU + Bahdanau attention over cached InceptionV3 grids, a
`@tf.function` train step with `GradientTape` and a Python loop over the time steps,
masked loss. Each project decoder runs its own compiled Keras train step
(`model.train_function`, what `fit` runs). All sides get the same sizes (embedding,
units, vocabulary, caption length, batch, grid) and the same batch: random words, with the
caption lengths of the shapes dataset (`--captions shapes`, the default: 6-16 tokens with
<start>/<end>, padded to the max length, so about half of the target positions are padding
at max length 20) or no padding (`--captions full`); tokens/s counts real target tokens.
Each side is warmed up (tracing, XLA compilation), then the
sides are timed in interleaved rounds (each round: `--steps` steps of every side in turn),
so a busy moment on the shared cores hits every side alike. Per side and round the median
step gives tokens/s; ratios to the classic loop are taken within a round (same XLA setting
on both sides), and the table shows the median ratio over the rounds with its min-max; so
is each side's XLA speed-up (its step without XLA / with XLA, within a round).

    python benchmarks/bench_vs_classic.py --sizes minimal            # emb 64, units 128, vocab 3000, length 15, batch 32, grid 25x2048
    python benchmarks/bench_vs_classic.py --sizes fast               # emb 128, units 256, vocab 5000, length 20, batch 64
    python benchmarks/bench_vs_classic.py --sizes fast --grid 64 2048 --rounds 5 --sides classic lstm-luong transformer
    python benchmarks/bench_vs_classic.py --sizes fast --captions full   # every target position a real word
    python benchmarks/bench_vs_classic.py --sizes fast --captions-per-image 5   # batches of whole images (--group-by-image)
    python benchmarks/bench_vs_classic.py --sizes fast --sides classic lstm-bahdanau lstm-bahdanau:deep_output=true  # per-side ModelConfig overrides
    python benchmarks/bench_vs_classic.py --sizes fast --sides classic gru-bahdanau gru-bahdanau@mixed_bfloat16  # a side's dtype policy (--precision)
    python benchmarks/bench_vs_classic.py --sides classic transformer transformer~keras-adam  # Keras's own Adam instead of the product's FusedAdam
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import quiet_tensorflow, report, train_step

quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from classic_loop import ClassicCaptioner, classic_train_step  # noqa: E402

from caption_tf.config import DataConfig, ModelConfig, coerce, field_index  # noqa: E402
from caption_tf.data.shapes import load_shapes  # noqa: E402
from caption_tf.data.text import clean_caption  # noqa: E402
from caption_tf.models.decoder import build_decoder  # noqa: E402
from caption_tf.training.optimizers import FusedAdam  # noqa: E402

SIZES = {  # (embedding, units, vocab, max length, batch): the minimal and fast sizes
    "minimal": (64, 128, 3000, 15, 32),
    "fast": (128, 256, 5000, 20, 64),
}
PROJECT_SIDES = ("lstm-bahdanau", "gru-bahdanau", "lstm-luong", "gru-luong", "transformer")
START_ID = 2


def shapes_caption_lengths(scenes: int = 200) -> np.ndarray:
    """Token counts (words + <start> + <end>) of the captions of `scenes` generated shapes scenes."""
    with tempfile.TemporaryDirectory() as folder:
        dataset = load_shapes(DataConfig(dataset="shapes", num_images=scenes, data_dir=folder))
    return np.array([len(clean_caption(c).split()) + 2 for r in dataset.records for c in r.captions])


def classic_side(vocab, embedding, units, grid, tokens, jit):
    model = ClassicCaptioner(vocab, embedding, units)
    step = classic_train_step(model, keras.optimizers.Adam(1e-3), START_ID, jit_compile=jit)
    run = lambda: float(step(grid, tokens))  # noqa: E731  (float(): waits for the step)
    run()
    return run, sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def parse_overrides(text: str) -> dict:
    """'key=value,...' -> ModelConfig overrides, each value of its field's type (`config.coerce`, as the CLI)."""
    index = field_index()
    pairs = [item.split("=") for item in filter(None, text.split(","))]
    return {key: coerce(key, value, index[key][2]) for key, value in pairs}


def project_side(name, vocab, embedding, units, grid, tokens, jit, model_overrides):
    name, _, optimizer = name.partition("~")  # e.g. "transformer~keras-adam"
    if optimizer not in ("", "keras-adam"):  # before minutes of building and tracing
        raise SystemExit(f"unknown optimizer suffix ~{optimizer} in side {name!r}: expected ~keras-adam or none")
    name, _, precision = name.partition("@")  # e.g. "gru-bahdanau@mixed_bfloat16"
    name, _, side_overrides = name.partition(":")  # e.g. "lstm-bahdanau:deep_output=true"
    keras.mixed_precision.set_global_policy(precision or "float32")  # each layer takes the policy as it is made
    model_overrides = {**model_overrides, **parse_overrides(side_overrides)}
    decoder, _, attention = name.partition("-")
    cfg = ModelConfig(decoder=decoder, attention=attention or "bahdanau", embedding_dim=embedding, units=units, **model_overrides)
    model = build_decoder(cfg, vocab, tuple(grid.shape[1:]), tokens.shape[-1])
    # The product's optimizer (training/optimizers.py); "~keras-adam": Keras's own Adam, as before 2026-11-29.
    model.compile(optimizer=keras.optimizers.Adam(1e-3) if optimizer else FusedAdam(1e-3), jit_compile=jit)
    x, y = (grid, tokens[..., :-1]), tokens[..., 1:]
    run = lambda: train_step(model, x, y)  # noqa: E731
    run()
    keras.mixed_precision.set_global_policy("float32")
    return run, model.count_params()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="minimal")
    parser.add_argument("--grid", type=int, nargs=2, default=[25, 2048], help="cells, channels")
    parser.add_argument("--sides", nargs="+", default=["classic", *PROJECT_SIDES])
    parser.add_argument("--xla", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--captions", choices=("shapes", "full"), default="shapes",
                        help="caption lengths: the shapes dataset's (padded to the max length) or all max length")
    parser.add_argument("--model", default="", help="ModelConfig overrides, e.g. 'grid_adapter=conv,dropout=0.1'")
    parser.add_argument("--captions-per-image", type=int, default=1,
                        help="N > 1: the batch is batch/N images with N captions each (`--group-by-image`); the project "
                             "sides get each grid once, the classic loop a copy per caption, as its pipeline gives it")
    args = parser.parse_args()

    embedding, units, vocab, max_length, batch = SIZES[args.sizes]
    overrides = parse_overrides(args.model)
    rng = np.random.default_rng(0)
    per_image = args.captions_per_image
    images = max(1, round(batch / per_image))
    batch = images * per_image  # captions per step (64 -> 65 at 5 per image: whole images, as the pipeline rounds)
    image_grids = rng.random((images, *args.grid), dtype=np.float32)
    grid = tf.constant(np.repeat(image_grids, per_image, axis=0))  # one copy per caption
    tokens = rng.integers(4, vocab, (batch, max_length)).astype("int32")
    if args.captions == "shapes":
        lengths = np.minimum(rng.choice(shapes_caption_lengths(), batch), max_length)
        tokens[np.arange(max_length)[None, :] >= lengths[:, None]] = 0  # padding after each caption's end
    tokens = tf.constant(tokens)
    tokens_per_step = int(np.count_nonzero(tokens[:, 1:]))  # real target tokens

    sides, params = {}, {}
    for jit in args.xla:
        for name in args.sides:
            keras.utils.set_random_seed(0)
            started = time.perf_counter()
            if name == "classic":
                run, count = classic_side(vocab, embedding, units, grid, tokens, jit == "on")
            else:
                project_grid, project_tokens = (grid, tokens) if per_image == 1 else (
                    tf.constant(image_grids), tf.reshape(tokens, (images, per_image, max_length)))
                run, count = project_side(name, vocab, embedding, units, project_grid, project_tokens, jit == "on", overrides)
            for _ in range(args.warmup - 1):
                run()
            sides[(name, jit)], params[name] = run, count
            print(f"built {name} xla={jit}: {count:,} parameters, first calls {time.perf_counter() - started:.1f} s", flush=True)

    times = {key: [] for key in sides}
    for round_ in range(args.rounds):
        for key, run in sides.items():
            step_times = []
            for _ in range(args.steps):
                started = time.perf_counter()
                run()
                step_times.append(time.perf_counter() - started)
            times[key].append(float(np.median(step_times)))
        print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{n}/{j} {times[(n, j)][-1] * 1000:.1f} ms" for n, j in sides), flush=True)

    rows = []
    for (name, jit), per_round in times.items():
        per_round = np.array(per_round)
        row = {"side": name, "xla": jit, "parameters": params[name], "median step ms": float(np.median(per_round)) * 1000,
               "tokens/s": tokens_per_step / float(np.median(per_round))}
        if ("classic", jit) in times:
            ratios = np.array(times[("classic", jit)]) / per_round
            row.update({"x classic": float(np.median(ratios)), "min": float(ratios.min()), "max": float(ratios.max())})
        if jit == "on" and (name, "off") in times:  # XLA's own effect: the side's step without / with XLA, per round
            speedups = np.array(times[(name, "off")]) / per_round
            row.update({"XLA speed-up": float(np.median(speedups)), "XLA min": float(speedups.min()), "XLA max": float(speedups.max())})
        rows.append(row)
    name = f"vs_classic_{args.sizes}_{args.grid[0]}_{args.captions}" + "".join(f"_{k}-{v}" for k, v in overrides.items())
    name += f"_{per_image}-per-image" if per_image > 1 else ""
    report(name, rows, {
        "sizes": f"embedding {embedding}, units {units}, vocab {vocab}, max length {max_length} ({max_length - 1} steps), "
                 f"captions {args.captions} ({tokens_per_step} real target tokens of {batch * (max_length - 1)}), batch {batch} captions"
                 f"{f' of {images} images (project sides: each grid once)' if per_image > 1 else ''}, grid {args.grid[0]}x{args.grid[1]}, Adam (classic: Keras's; project sides: FusedAdam unless ~keras-adam); model overrides: {overrides or 'none'}",
        "method": f"{args.rounds} interleaved rounds of {args.steps} steps per side after {args.warmup} warm-up calls; "
                  f"tokens/s = {tokens_per_step} target tokens / median step; 'x classic' = classic step / side step "
                  "within each round, same XLA setting (median over rounds, min, max); 'XLA speed-up' = the side's step "
                  "without XLA / with XLA within each round",
    })


if __name__ == "__main__":
    main()
