"""Auto-configuration: settings left as `auto` are derived from the dataset.

`--batch-size auto`, `--learning-rate auto`, `--max-length auto` and
`--vocab-size auto` (config value `auto` or null) are resolved before the
vocabulary is built, from a `DatasetProfile` of the training captions and the
number of devices; `resolve_auto_settings` returns the resolved copy of the
config that training uses from then on. Each decision prints one line with
its reasoning. The rules are pure functions of the profile, so they are
testable without TensorFlow.

Example:

>>> profile = DatasetProfile.from_captions(["a red circle", "a blue square"] * 50, num_images=20)
>>> [d.value for d in auto_settings(profile, devices=1)]
[9, 5, 8, 0.00035]
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from caption_tf.config import Config
from caption_tf.data.text import clean_caption

# Caption length: the percentile of training caption lengths to cover (longer ones are truncated).
LENGTH_PERCENTILE = 95
SPECIAL_TOKENS_IN_CAPTION = 2  # <start>, <end>
MIN_MAX_LENGTH, MAX_MAX_LENGTH = 5, 50
# Vocabulary: words seen at least k times; k grows with the dataset (Karpathy's COCO/Flickr setup: 5).
SMALL_DATASET_IMAGES = 1000
MIN_WORD_COUNT_SMALL, MIN_WORD_COUNT_LARGE = 1, 5
RESERVED_TOKENS = 4  # padding, [UNK], <start>, <end>
# Batch size: enough optimizer steps per epoch, a power of two per device, within limits.
TARGET_STEPS_PER_EPOCH = 20
MIN_BATCH, MAX_BATCH = 8, 128
# Learning rate: Adam's 1e-3 at batch 64, square-root scaled with the per-device batch
# (the trainer scales it linearly with the devices, as the global batch grows with them).
BASE_LEARNING_RATE, BASE_BATCH = 1e-3, 64


@dataclass(frozen=True)
class DatasetProfile:
    """What the rules need to know about a dataset's training split."""

    num_images: int
    num_captions: int
    length_percentile: float  # words per caption at LENGTH_PERCENTILE
    word_counts: dict[str, int]

    @classmethod
    def from_captions(cls, captions: Iterable[str], num_images: int) -> "DatasetProfile":
        """Profile of raw training captions (cleaned as the vocabulary cleans them).

        Example:

        >>> DatasetProfile.from_captions(["A dog.", "a big dog"], num_images=1).length_percentile
        2.95
        """
        words = [clean_caption(c).split() for c in captions]
        lengths = np.array([len(w) for w in words] or [0])
        counts = collections.Counter(w for ws in words for w in ws)
        return cls(num_images, len(words), float(np.percentile(lengths, LENGTH_PERCENTILE)), dict(counts))

    def words_seen_at_least(self, k: int) -> int:
        return sum(1 for n in self.word_counts.values() if n >= k)


@dataclass(frozen=True)
class Decision:
    """One derived setting with the reason printed for the user."""

    name: str
    value: float
    reason: str

    def __str__(self) -> str:
        return f"auto {self.name} = {self.value}: {self.reason}"


def auto_max_length(profile: DatasetProfile) -> Decision:
    """The caption length covering LENGTH_PERCENTILE % of training captions, plus <start>/<end>."""
    covered = math.ceil(profile.length_percentile)
    value = int(np.clip(covered + SPECIAL_TOKENS_IN_CAPTION, MIN_MAX_LENGTH, MAX_MAX_LENGTH))
    return Decision(
        "max_length",
        value,
        f"{LENGTH_PERCENTILE}th percentile caption length {profile.length_percentile:g} words "
        f"+ <start>/<end>, clipped to [{MIN_MAX_LENGTH}, {MAX_MAX_LENGTH}]",
    )


def auto_vocab_size(profile: DatasetProfile) -> Decision:
    """Words seen at least k times (k = 1 for small datasets, 5 for large), plus reserved tokens."""
    small = profile.num_images < SMALL_DATASET_IMAGES
    k = MIN_WORD_COUNT_SMALL if small else MIN_WORD_COUNT_LARGE
    kept = profile.words_seen_at_least(k)
    return Decision(
        "vocab_size",
        kept + RESERVED_TOKENS,
        f"{kept} of {len(profile.word_counts)} distinct words seen >= {k} time(s) "
        f"({'<' if small else '>='} {SMALL_DATASET_IMAGES} images) + {RESERVED_TOKENS} reserved tokens",
    )


def auto_batch_size(profile: DatasetProfile, devices: int = 1) -> Decision:
    """Per-device batch: largest power of two giving >= TARGET_STEPS_PER_EPOCH steps, in [MIN_BATCH, MAX_BATCH]."""
    per_device_pairs = profile.num_captions / (TARGET_STEPS_PER_EPOCH * max(devices, 1))
    power = 2 ** int(math.floor(math.log2(max(per_device_pairs, 1.0))))
    value = int(np.clip(power, MIN_BATCH, MAX_BATCH))
    return Decision(
        "batch_size",
        value,
        f"{profile.num_captions} training pairs / ({TARGET_STEPS_PER_EPOCH} steps x {devices} device(s)) "
        f"= {per_device_pairs:.0f} per device -> power of two in [{MIN_BATCH}, {MAX_BATCH}] "
        f"(global batch {value * devices})",
    )


def auto_learning_rate(batch_size: int) -> Decision:
    """Adam: BASE_LEARNING_RATE at BASE_BATCH, square-root scaled with the per-device batch."""
    value = float(f"{BASE_LEARNING_RATE * math.sqrt(batch_size / BASE_BATCH):.2g}")
    return Decision(
        "learning_rate",
        value,
        f"Adam {BASE_LEARNING_RATE:g} at batch {BASE_BATCH}, x sqrt({batch_size}/{BASE_BATCH}) per device "
        "(the trainer multiplies by the device count)",
    )


def auto_settings(
    profile: DatasetProfile,
    devices: int = 1,
    batch_size: Optional[int] = None,
    learning_rate: Optional[float] = None,
    max_length: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> list[Decision]:
    """Decisions for the settings given as None (auto), in dependency order.

    Example:

    >>> profile = DatasetProfile(100_000, 500_000, 13.0, {"a": 10})
    >>> {d.name: d.value for d in auto_settings(profile, devices=1)}["batch_size"]
    128
    """
    decisions = []
    if vocab_size is None:
        decisions.append(auto_vocab_size(profile))
    if max_length is None:
        decisions.append(auto_max_length(profile))
    if batch_size is None:
        decisions.append(auto_batch_size(profile, devices))
        batch_size = int(decisions[-1].value)
    if learning_rate is None:
        decisions.append(auto_learning_rate(batch_size))
    return decisions


def resolve_auto_settings(cfg: Config, captions: list[str], num_images: int, devices: int = 1) -> Config:
    """A copy of `cfg` with its `auto` (None) fields derived from the training captions; prints why.

    The LSTM/GRU grid width (`ModelConfig.grid_width`) is written out as well.

    `cfg` itself is left as requested, so a reader knows the returned config is final.

    Example:

    ```python
    resolved = resolve_auto_settings(load_config("minimal", {"batch_size": "auto"}), captions, num_images=800)
    resolved.train.batch_size is None
    ```
    """
    decisions = auto_settings(
        DatasetProfile.from_captions(captions, num_images),
        devices,
        batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.learning_rate,
        max_length=cfg.text.max_length,
        vocab_size=cfg.text.vocab_size,
    )
    changes: dict[str, dict] = {"train": {}, "text": {}}
    section_of = {"batch_size": "train", "learning_rate": "train", "max_length": "text", "vocab_size": "text"}
    for decision in decisions:
        changes[section_of[decision.name]][decision.name] = decision.value
        print(decision, flush=True)
    # The grid width is written out too: a saved `feature_units: null` then always means the default
    # of the version that wrote it (`run_folder.load_run`), whatever today's default is.
    model = cfg.model if cfg.model.decoder == "transformer" else dataclasses.replace(cfg.model, feature_units=cfg.model.grid_width)
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, **changes["train"]),
        text=dataclasses.replace(cfg.text, **changes["text"]),
        model=model,
    )
