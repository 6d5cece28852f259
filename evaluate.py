"""Evaluate trained runs: `python evaluate.py --run runs/<name> [--run runs/<other> ...]`."""

from caption_tf.cli import evaluate_main, main_guard

if __name__ == "__main__":
    main_guard(evaluate_main, skip_teardown=True)
