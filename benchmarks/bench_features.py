"""Feature extraction throughput (images/s) per backbone, random-init weights.

ImageNet weights cannot be downloaded on the benchmark machine, so every backbone is
built with `weights="none"`: the arithmetic, and so the speed, is the same. The images
are synthetic shapes scenes (decoded once, outside the timing); the timed call is the
cache's own traced extractor (`features.encoder.compiled_extractor`: preprocessing +
backbone + grid/pooled outputs) on one batch. Each backbone runs at its native input size
unless `--input-size` is given, in each `--precision` (`features.extract_precision`: bfloat16
is fast only on a CPU with native bf16 matmuls, AMX or AVX512-BF16).

    python benchmarks/bench_features.py [--images 32] [--backbones inception_v3 resnet50]
    python benchmarks/bench_features.py --backbones inception_v3 --precision float32 bfloat16 --repeats 5
"""

from __future__ import annotations

import argparse
import tempfile

from common import best_time, quiet_tensorflow, report

quiet_tensorflow()

import numpy as np  # noqa: E402

from caption_tf.config import DataConfig  # noqa: E402
from caption_tf.data.images import load_rgb  # noqa: E402
from caption_tf.data.shapes import load_shapes  # noqa: E402
from caption_tf.features.backbones import build_extractor, cpu_has_native_bfloat16  # noqa: E402
from caption_tf.features.encoder import compiled_extractor  # noqa: E402

DEFAULT_BACKBONES = ["inception_v3", "densenet121", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"]


def shapes_images(count: int, data_dir: str) -> list[str]:
    """Paths of `count` generated shapes scenes."""
    dataset = load_shapes(DataConfig(dataset="shapes", data_dir=data_dir, num_images=count))
    return [record.path for record in dataset.records]


def throughput(name: str, paths: list[str], input_size: int | None, repeats: int, precision: str = "float32") -> dict:
    extractor = build_extractor(name, weights="none", input_size=input_size, precision=precision)
    size = extractor.input_size
    images = np.stack([load_rgb(p, size=(size, size)) for p in paths])
    infer = compiled_extractor(extractor)
    grid, _ = infer(images)  # traces once
    seconds = best_time(lambda: infer(images)[0].numpy(), repeats=repeats, warmup=1)
    return {
        "backbone": name,
        "precision": precision,
        "input px": size,
        "grid": f"{grid.shape[1]}x{grid.shape[2]}",
        "batch": len(images),
        "ms/batch": seconds * 1000,
        "images/s": len(images) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    parser.add_argument("--images", type=int, default=32, help="images per timed batch")
    parser.add_argument("--input-size", type=int, default=None, help="default: each backbone's native size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", nargs="+", choices=("float32", "bfloat16"), default=["float32"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = shapes_images(args.images, tmp)
        rows = []
        for name in args.backbones:
            for precision in args.precision:
                rows.append(throughput(name, paths, args.input_size, args.repeats, precision))
                print(rows[-1], flush=True)
    report("features" + "".join(f"_{p}" for p in args.precision if p != "float32"), rows, {
        "method": f"median of {args.repeats} timed batches after 1 warm-up, traced extractor, weights none",
        "cpu has native bf16": cpu_has_native_bfloat16(),
        "images": "synthetic shapes scenes (128 px PNG, resized to the input size)",
    })


if __name__ == "__main__":
    main()
