"""Auto-configuration rules on dataset descriptions (no TensorFlow needed)."""

from __future__ import annotations

import random

from caption_tf.config import load_config
from caption_tf.training.autoconfig import (
    MAX_BATCH,
    MIN_BATCH,
    DatasetProfile,
    auto_settings,
    resolve_auto_settings,
)

WORDS = [f"w{i}" for i in range(3000)]


def synthetic_profile(num_images: int, captions_per_image: int = 5, seed: int = 0) -> DatasetProfile:
    """Zipf-like word use, caption lengths 5..20 words with a long tail."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    lengths = [min(int(rng.gauss(10, 3)) + 1, 30) for _ in range(num_images * captions_per_image)]
    # Profile words from a bounded sample (fast), captions from all lengths.
    sample = rng.choices(WORDS, weights, k=min(sum(lengths), 200_000))
    counts: dict[str, int] = {}
    for w in sample:
        counts[w] = counts.get(w, 0) + 1
    import numpy as np

    return DatasetProfile(num_images, len(lengths), float(np.percentile(lengths, 95)), counts)


def decisions_by_name(profile, devices=1):
    return {d.name: d for d in auto_settings(profile, devices)}


def test_small_dataset_gets_small_batch_full_vocabulary_and_covering_length():
    profile = synthetic_profile(100)
    d = decisions_by_name(profile)
    # 500 pairs: at least 20 steps per epoch needs a batch <= 25 -> 16.
    assert d["batch_size"].value == 16
    assert 500 / d["batch_size"].value >= 20
    # Small dataset: every word seen once is kept.
    assert d["vocab_size"].value == len(profile.word_counts) + 4
    assert d["max_length"].value >= profile.length_percentile + 2
    assert 1e-4 < d["learning_rate"].value < 1e-3  # smaller batch, smaller Adam step than 1e-3 at 64
    for decision in d.values():
        assert str(decision).startswith(f"auto {decision.name} = ") and len(decision.reason) > 20


def test_large_dataset_gets_large_batch_and_frequency_cut_vocabulary():
    small, large = decisions_by_name(synthetic_profile(100)), decisions_by_name(synthetic_profile(100_000))
    assert large["batch_size"].value == MAX_BATCH
    assert large["learning_rate"].value > small["learning_rate"].value
    profile = synthetic_profile(100_000)
    # Words seen fewer than 5 times are cut: fewer than all distinct words.
    assert large["vocab_size"].value == profile.words_seen_at_least(5) + 4 < len(profile.word_counts) + 4
    assert 5 <= large["max_length"].value <= 50


def test_more_devices_smaller_per_device_batch_and_explicit_values_are_kept():
    profile = DatasetProfile(1000, 5000, 12.0, {"a": 3})
    one, four = decisions_by_name(profile, 1), decisions_by_name(profile, 4)
    assert one["batch_size"].value == 128 and four["batch_size"].value == 32
    assert decisions_by_name(DatasetProfile(1, 1, 1.0, {}))["batch_size"].value == MIN_BATCH
    names = [d.name for d in auto_settings(profile, 1, batch_size=32, learning_rate=1e-3, max_length=None, vocab_size=50)]
    assert names == ["max_length"]


def test_resolve_fills_only_auto_fields_of_a_config(capsys):
    requested = load_config("minimal", {"batch_size": "auto", "max_length": "auto"})
    assert requested.train.batch_size is None and requested.text.max_length is None
    captions = ["a red circle above a blue square"] * 400
    cfg = resolve_auto_settings(requested, captions, num_images=80)
    assert requested.train.batch_size is None and requested.text.max_length is None  # a resolved copy; the request is unchanged
    assert cfg.train.batch_size == 16  # 400 pairs / 20 steps = 20 -> 16
    assert cfg.text.max_length == 7 + 2
    assert cfg.train.learning_rate == 0.002 and cfg.text.vocab_size == 3000  # the preset's, untouched
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" = ")[0] for line in out] == ["auto max_length", "auto batch_size"]
