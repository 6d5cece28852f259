"""Command-line entry points behind `train.py` and `evaluate.py` (kept thin)."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from pathlib import Path

from caption_tf.config import add_config_arguments, load_config, overrides_from_args
from caption_tf.console import import_tensorflow


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
    from caption_tf.training.supervisor import EXIT_CHECKPOINT_FAILED, TrainingStopped, is_disk_full, supervise, supervising

    if supervising(cfg.checkpoint.max_restarts):  # rerun training in a child process after a crash
        return supervise(sys.argv[1:] if argv is None else argv, cfg.checkpoint.max_restarts)
    import_tensorflow(cfg.train.verbose)  # first: its start-up notices only with --verbose
    from caption_tf.training.runtime import configure_cpu_replicas, process_is_chief

    # Before anything runs a TensorFlow op: devices are fixed when TensorFlow first uses them.
    configure_cpu_replicas(cfg.train.cpu_replicas)
    from caption_tf.evaluation.captioning import evaluate_run
    from caption_tf.evaluation.metrics import corpus_bleu_scores
    from caption_tf.run_folder import LOG_DIR
    from caption_tf.training.finetune import train_in_phases
    from caption_tf.training.summaries import write_test_metrics

    if cfg.train.tune:
        from caption_tf.training.tuning import tune

        result = tune(cfg, bleu=corpus_bleu_scores)
        print(f"\nBest preset: {result.best_preset} (train with: python train.py --preset {result.best_preset})")
        return 0
    # Phase 1 (decoder on cached features), then phase 2 when --fine-tune-layers > 0.
    try:
        run_dir = train_in_phases(cfg, bleu=corpus_bleu_scores)  # bleu enables the per-epoch val_bleu4
        if not process_is_chief():  # multi-worker: the chief writes and evaluates the run
            print(f"\nThis worker's part is done; the chief writes and evaluates the run folder {run_dir}")
            return 0
        metrics = evaluate_run(run_dir)
        write_test_metrics(run_dir / LOG_DIR, metrics["greedy"])  # TensorBoard: beside val BLEU-4, and in HParams
    except TrainingStopped as stop:  # NaN loss, disk full: clean stop, last good checkpoint kept
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code
    except Exception as err:  # a full disk anywhere else (dataset, cache, metrics): the same clean stop
        if not is_disk_full(err):
            raise
        print(f"error: the disk is full ({err}). Free disk space and rerun the same command: it resumes from the last checkpoint", file=sys.stderr)
        return EXIT_CHECKPOINT_FAILED
    print(f"\nRun folder: {run_dir}")
    print(f"Test metrics ({metrics['images']} images, greedy): " + _bleu_line(metrics["greedy"]))
    print(f"Blind baseline (one caption for every image, {metrics['blind_baseline']['caption']!r}): " + _bleu_line(metrics["blind_baseline"]))
    warning = below_baseline_warning(metrics)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def below_baseline_warning(metrics: dict) -> str:
    """A warning when the model scores below the blind baseline: it did not learn from the images.

    Example:

    >>> below_baseline_warning({"greedy": {"bleu4": 0.1}, "blind_baseline": {"bleu4": 0.2}})[:8]
    'WARNING:'
    """
    model, blind = metrics["greedy"]["bleu4"], metrics["blind_baseline"]["bleu4"]
    if model >= blind:
        return ""
    return (
        f"WARNING: the model's test BLEU-4 ({model:.3f}) is below the blind baseline's ({blind:.3f}): it has not learnt to "
        "use the images. Check the training loss in history.csv; a diverging loss calls for a lower --learning-rate, "
        "a too small --vocab-size or too few --epochs for the other settings."
    )


def _bleu_line(scores: dict) -> str:
    return " ".join(f"BLEU-{n}={scores[f'bleu{n}']:.3f}" for n in range(1, 5))


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it tells something: not for on/off switches, not for
    None (the help says what happens then), not where the help already names the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS, (), []) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def _images_or_all(value: str):
    """--retrieval-pool / --retrieval-images: a number of images (at least 2), or "all"."""
    if value.lower() == "all":
        return None
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'all', got {value!r}") from None
    if size < 2:
        raise argparse.ArgumentTypeError(f"needs at least 2 images, got {size} (or 'all')")
    return size


def evaluate_parser() -> argparse.ArgumentParser:
    from caption_tf.evaluation.retrieval import DEFAULT_POOL_IMAGES, DEFAULT_RETRIEVAL_IMAGES

    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate trained runs (greedy and beam search) and write an HTML report comparing them.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--run", action="append", required=True, help="a run folder (repeat to compare runs side by side)")
    parser.add_argument("--out", default=None, help="report folder (default: reports/<run>[_vs_<run>...])")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="the split to evaluate")
    parser.add_argument("--beam-size", type=int, default=None, help="beam width (default: the run's eval.beam_size)")
    parser.add_argument("--length-penalty", type=float, default=None, help="GNMT length penalty alpha (default: the run's eval.length_penalty)")
    parser.add_argument("--no-repeat-ngram", type=int, default=None, metavar="N",
                        help="greedy and beam search never repeat a word N-gram; 0: off (default: the run's eval.no_repeat_ngram)")
    parser.add_argument("--block-repeated-mentions", action=argparse.BooleanOptionalAction, default=None,
                        help="greedy and beam search never repeat a mention, the words after 'a'/'the' up to the next "
                             "function word (default: the run's eval.block_repeated_mentions)")
    parser.add_argument("--max-eval-images", type=int, default=None, help="evaluate only the first N images (default: the run's eval.max_eval_images)")
    parser.add_argument("--word-vectors", default=None, help="GloVe/word2vec/.kv file (default: word2vec trained on the training captions)")
    parser.add_argument("--meteor", action=argparse.BooleanOptionalAction, default=None, help="compute METEOR (needs Java; default: the run's eval.meteor)")
    parser.add_argument("--llm", default=None, help="a transformers image-to-text model (hub id or folder) for an LLM column")
    parser.add_argument("--images", nargs="+", default=(), help="caption these image files (greedy and beam, attention maps in the report)")
    parser.add_argument("--full", action="store_true", help="with --images: also evaluate the split (without it: a small report of the images only)")
    parser.add_argument("--retrieval-pool", type=_images_or_all, default=DEFAULT_POOL_IMAGES, metavar="N|all",
                        help="images per image-text retrieval pool: each query is ranked against its pool; 'all': one pool, "
                             "the standard protocol (images x captions decoder passes: 5 million for a Flickr8k test split)")
    parser.add_argument("--retrieval-images", type=_images_or_all, default=DEFAULT_RETRIEVAL_IMAGES, metavar="N|all",
                        help="rank the first N evaluated images (and their captions); 'all': every evaluated image")
    parser.add_argument("--no-retrieval", dest="retrieval", action="store_false", help="skip image-text retrieval")
    parser.add_argument("--no-resources", dest="resources", action="store_false", help="skip the latency/memory benchmark")
    parser.add_argument("--no-embeddings", dest="embeddings", action="store_false", help="skip the PCA/t-SNE plots")
    parser.add_argument("--resource-batch-sizes", type=int, nargs="+", default=None, help="batch sizes timed (default: 1 8 32)")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's C++ start-up messages (CUDA probing, oneDNN, CPU features)")
    return parser


def evaluate_main(argv: list[str] | None = None) -> int:
    # First (the parser's defaults import TensorFlow): its start-up notices only with --verbose.
    import_tensorflow("--verbose" in (sys.argv[1:] if argv is None else argv))
    args = evaluate_parser().parse_args(argv)
    from caption_tf.evaluation.report import REPORT_FILE, ReportOptions, build_report, default_out_dir
    from caption_tf.evaluation.resources import RESOURCE_BATCH_SIZES

    options = ReportOptions(
        out_dir=str(args.out or default_out_dir(args.run, images_only=bool(args.images) and not args.full)),
        split=args.split,
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        no_repeat_ngram=args.no_repeat_ngram,
        block_repeated_mentions=args.block_repeated_mentions,
        max_eval_images=args.max_eval_images,
        word_vectors=args.word_vectors,
        meteor=args.meteor,
        llm=args.llm,
        images=tuple(args.images),
        evaluate_split=args.full or not args.images,
        resources=args.resources,
        embeddings=args.embeddings,
        retrieval=args.retrieval,
        retrieval_pool=args.retrieval_pool,
        retrieval_images=args.retrieval_images,
        resource_batch_sizes=tuple(args.resource_batch_sizes or RESOURCE_BATCH_SIZES),
    )
    summary = build_report(args.run, options)
    for decoding, columns in summary.get("comparison", {}).items():
        for column, row in columns.items():
            print(f"{column} [{decoding}]: " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)))
    for column, items in summary.get("user_images", {}).items():
        for item in items:
            print(f"{column}: {item['path']}")
            if "error" in item:
                print(f"  error: {item['error']}")
            else:
                print(f"  greedy: {item['greedy']}")
                print(f"  beam (beam size {item['beam_size']}): {item['beam']}")
    print(f"Report: {Path(options.out_dir) / REPORT_FILE}")
    return 0


def main_guard(fn, skip_teardown: bool = False) -> None:
    """Run an entry point and exit with its code; known user errors print one clear line instead of a traceback.

    The error classes are imported after the failure: importing them imports TensorFlow,
    which the entry point imports itself once it knows whether to be --verbose.

    Args:
        fn: the entry point, returning an exit code.
        skip_teardown: the scripts' exit (`exit_without_teardown`); False raises `SystemExit`,
            as a caller in the same process (a test) needs.
    """
    try:
        code = fn()
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    if skip_teardown:
        exit_without_teardown(code)
    sys.exit(code)


def exit_without_teardown(code) -> None:
    """`sys.exit(code)` less the interpreter's teardown of every module, 1.2-1.4 s with TensorFlow
    loaded (`import tensorflow; print()`: 1.2-1.4 s from the print to the exit; 0.1 s this way),
    which a user waits for after the last line of output and the test suite pays per process.

    What an exit does for files still happens, in the same order: non-daemon threads are joined,
    atexit handlers run (logging's among them), the streams are flushed. The entry points close
    their own writers (checkpoints, TensorBoard, reports) before returning.
    """
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def _user_errors() -> tuple[type[BaseException], ...]:
    from caption_tf.data.images import BadImageError
    from caption_tf.features.backbones import BackboneWeightsError
    from caption_tf.features.cache import FeatureCacheError

    return FileNotFoundError, ValueError, BackboneWeightsError, BadImageError, FeatureCacheError
