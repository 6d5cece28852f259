"""Shared fixtures: tiny configs that really train, on data the tests make themselves."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread per TensorFlow process (the test processes and the runs they start):
# two xdist workers, each with a pool as wide as the machine and often a child training
# beside it, oversubscribed the 2 cores (whole suite on a clean clone: 14 min 42 s, user
# 1,440 s; with 1 thread: 13 min 30 s, user 1,341 s). Users' runs keep TensorFlow's default.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
FLICKR8K_SAMPLE = SHARED_DIR / "data" / "flickr8k_sample"


# The slowest files first (seconds per file, summed from `python -m pytest tests --durations=0`,
# 2026-11-26). Two workers take one file at a time (`--dist loadfile`); a long file started last
# runs alone while the other worker idles. xdist's own order (most tests first,
# `--no-loadscope-reorder` turns it off) started exactly these last: 130 s of a 16.5-minute run.
SLOWEST_FIRST = [
    "test_distribute.py", "test_models.py", "test_distribute_precision.py", "test_failures.py", "test_resume.py",
    "test_captioner.py", "test_report.py", "test_kill_resume.py", "test_tensorboard.py", "test_transformer_cli.py",
    "test_run_folder.py", "test_decoding.py", "test_finetune.py", "test_feature_cache.py",
    "test_cli.py", "test_retrieval.py", "test_runtime.py", "test_schedules.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def repeated_mentions(words, function_words, determiners) -> list[tuple]:
    """Mentions of 2+ words (after a determiner, up to the next function word) made twice: a
    reference of `decoding.repeated_mention_ban` written the plain way, for words or word ids."""
    mentions = []
    for i, word in enumerate(words):
        if word in determiners:
            end = next((j for j in range(i + 1, len(words)) if words[j] in function_words), len(words))
            if end - i - 1 >= 2:
                mentions.append(tuple(words[i + 1 : end]))
    return sorted({m for m in mentions if mentions.count(m) > 1})


def tiny_overrides(tmp: Path, **extra) -> dict:
    """A config small enough to extract, train and decode in seconds on 2 cores."""
    return {
        "data_root": str(tmp / "data"),
        "cache_dir": str(tmp / "cache"),
        "runs_dir": str(tmp / "runs"),
        "num_images": 40,
        "scene_size": 64,
        "backbone": "mobilenet_v3_small",
        "weights": "none",
        "input_size": 64,
        # The recurrent decoder most tests are about (the `minimal` preset's is the transformer);
        # tests of other families pass `decoder=` / `attention=`.
        "decoder": "lstm",
        "attention": "bahdanau",
        "embedding_dim": 16,
        "units": 32,
        "vocab_size": 100,
        # 6 words: shorter unrolled teacher forcing traces faster (1.3 s less per run than 12).
        "max_length": 8,
        "epochs": 1,
        "batch_size": 16,
        "checkpoint_every": 0,
        # No attention images in TensorBoard (a third of a tiny run's time): test_tensorboard.py asks for them.
        "tensorboard_images": 0,
        **extra,
    }


def preset_sizes(tmp: Path, **extra) -> dict:
    """`tiny_overrides` without the decoder family: a preset runs with its own decoder at tiny sizes."""
    return {key: value for key, value in tiny_overrides(tmp, **extra).items() if key not in ("decoder", "attention")}


def cli_flags(overrides: dict) -> list[str]:
    """The `train.py` flags that set these config fields: `--name=value`, booleans as `--name` / `--no-name`."""
    flags = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        flags.append((flag if value else "--no-" + flag[2:]) if isinstance(value, bool) else f"{flag}={value}")
    return flags


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny trained run shared by tests that only read it: (config, run_dir)."""
    from caption_tf.config import load_config
    from caption_tf.training.trainer import train

    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config("minimal", tiny_overrides(tmp, epochs=2))
    return cfg, train(cfg)


def read_scalars(log_dir) -> dict[str, list[float]]:
    """{tag: [values]} of the scalars in the TensorBoard event files directly in `log_dir` (text, images, HParams left out)."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.util import event_pb2

    scalars: dict[str, list[float]] = {}
    for path in tf.io.gfile.glob(f"{log_dir}/events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("tensor") and value.tensor.dtype == types_pb2.DT_STRING:
                    continue
                tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                if np.size(tensor) != 1:  # the HParams records: empty tensors
                    continue
                scalars.setdefault(value.tag, []).append(float(tensor))
    return scalars


def h5_arrays(path) -> dict:
    """Every array of a Keras `.weights.h5` file, by its path in the file: what the resume tests compare bit for bit."""
    arrays = {}
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays
