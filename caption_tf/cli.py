"""Command-line entry points behind `train.py` and `evaluate.py` (kept thin)."""

from __future__ import annotations

import argparse
import json
import sys

from caption_tf.config import add_config_arguments, load_config, overrides_from_args


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an attention captioner. Every flag below overrides one field of the preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="minimal", help="configs/<preset>.yaml, or a path to a YAML file")
    add_config_arguments(parser)
    return parser


def train_main(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    cfg = load_config(args.preset, overrides_from_args(args))
    from caption_tf.evaluation.captioning import evaluate_run
    from caption_tf.evaluation.metrics import corpus_bleu_scores
    from caption_tf.training.trainer import train

    run_dir = train(cfg, bleu=corpus_bleu_scores)  # enables the per-epoch val_bleu4
    metrics = evaluate_run(run_dir)
    print(f"\nRun folder: {run_dir}")
    print(f"Test metrics ({metrics['images']} images, greedy): " + _bleu_line(metrics["greedy"]))
    print(f"Blind baseline (one caption for every image, {metrics['blind_baseline']['caption']!r}): " + _bleu_line(metrics["blind_baseline"]))
    return 0


def _bleu_line(scores: dict) -> str:
    return " ".join(f"BLEU-{n}={scores[f'bleu{n}']:.3f}" for n in range(1, 5))


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description="Evaluate trained runs and write a report.")
    parser.add_argument("--run", action="append", required=True, help="a run folder (repeat to compare runs)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    return parser


def evaluate_main(argv: list[str] | None = None) -> int:
    args = evaluate_parser().parse_args(argv)
    from caption_tf.evaluation.captioning import evaluate_run

    for run_dir in args.run:
        metrics = evaluate_run(run_dir, args.split)
        print(f"{run_dir}: {args.split} ({metrics['images']} images, greedy) " + json.dumps(metrics["greedy"]))
    return 0


def main_guard(fn) -> None:
    """Run an entry point; known user errors print one clear line instead of a traceback."""
    from caption_tf.data.images import BadImageError
    from caption_tf.features.backbones import BackboneWeightsError

    try:
        sys.exit(fn())
    except (FileNotFoundError, ValueError, BackboneWeightsError, BadImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
