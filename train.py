"""Train an image captioner: `python train.py --preset minimal|fast|optimized [--flag value ...]`."""

from caption_tf.cli import main_guard, train_main

if __name__ == "__main__":
    main_guard(train_main, skip_teardown=True)
