"""The dataset contract every loader returns.

A `CaptionDataset` is a list of `ImageRecord`s (one per image, with all its
reference captions and its split) plus a `SkipReport` of what was left out and
why. Everything downstream (features, text, training, evaluation) reads only
this structure, so a new dataset format is one loader function.

Example:

>>> rec = ImageRecord("img1", "/data/img1.jpg", ["a red circle"], "train")
>>> ds = CaptionDataset("toy", [rec])
>>> [r.image_id for r in ds.split("train")]
['img1']
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from caption_tf.files import write_json

SPLITS = ("train", "val", "test")


def assign_splits(n: int, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Split names for `n` items from `seed`: round(n * test_fraction) test, round(n * val_fraction) val, the rest train.

    Used by every loader without split files of its own (shapes, Flickr without split files, custom).
    """
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    splits = ["train"] * n
    for rank, idx in enumerate(order):
        if rank < n_test:
            splits[idx] = "test"
        elif rank < n_test + n_val:
            splits[idx] = "val"
    return splits


@dataclass
class SceneObject:
    """A ground-truth object of a synthetic scene; box is (x0, y0, x1, y1) in [0, 1]."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]


@dataclass
class ImageRecord:
    image_id: str
    path: str
    captions: list[str]
    split: str
    objects: Optional[list[SceneObject]] = None  # only where ground truth is known


@dataclass
class SkipReport:
    """What a loader left out or repaired, with reasons; saved with the run."""

    skipped_images: list[dict] = field(default_factory=list)  # {"path", "reason"}
    missing_images: list[str] = field(default_factory=list)
    malformed_lines: list[dict] = field(default_factory=list)  # {"file", "line", "reason"}
    few_references: list[dict] = field(default_factory=list)  # {"image_id", "count"}
    converted_images: list[dict] = field(default_factory=list)  # {"path", "from_mode"}

    def skip_image(self, path: str, reason: str) -> None:
        self.skipped_images.append({"path": str(path), "reason": reason})

    def malformed(self, file: str, line: int, reason: str) -> None:
        self.malformed_lines.append({"file": str(file), "line": line, "reason": reason})

    def merge(self, other: "SkipReport") -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in self.__dataclass_fields__}

    def summary(self) -> str:
        """One line: the count of each kind of drop, and why images were skipped.

        Example:

        >>> report = SkipReport(missing_images=["a.jpg"])
        >>> report.skip_image("b.jpg", "not listed in any split file")
        >>> report.summary()
        'skipped images: 1 (1 not listed in any split file); missing images: 1'
        """
        parts = []
        for name, count in self.counts().items():
            if not count:
                continue
            part = f"{name.replace('_', ' ')}: {count:,}"
            if name == "skipped_images":
                # "corrupt or truncated (OSError: ...)" -> "corrupt or truncated": the kind, not the detail
                reasons = collections.Counter(s["reason"].split(" (")[0] for s in self.skipped_images)
                part += " (" + ", ".join(f"{n:,} {reason}" for reason, n in reasons.most_common()) + ")"
            parts.append(part)
        return "; ".join(parts) if parts else "nothing skipped"

    def save(self, path: str | Path) -> None:
        write_json(path, {"counts": self.counts(), **asdict(self)})


@dataclass
class CaptionDataset:
    name: str
    records: list[ImageRecord]
    skips: SkipReport = field(default_factory=SkipReport)

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split == name]

    def by_id(self) -> dict[str, ImageRecord]:
        return {r.image_id: r for r in self.records}

    def fingerprint(self) -> str:
        """Hash of image ids, paths and splits: changes when the image set changes.

        Captions are left out on purpose: the feature cache depends on images only.
        """
        h = hashlib.sha256(self.name.encode())
        for r in sorted(self.records, key=lambda r: r.image_id):
            h.update(f"{r.image_id}|{r.path}|{r.split}\n".encode())
        return h.hexdigest()[:16]

    def caption_fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in sorted(self.records, key=lambda r: r.image_id):
            h.update(("\n".join([r.image_id, r.split, *r.captions]) + "\n").encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        """The one line printed when a dataset is loaded: sizes per split, and what was left out and why.

        Example:

        >>> CaptionDataset("toy", [ImageRecord("a", "a.jpg", ["a dog"], "train")]).summary()
        'toy: 1 images (train 1, val 0, test 0), 1 captions; nothing skipped'
        """
        counts = ", ".join(f"{s} {len(self.split(s)):,}" for s in SPLITS)
        caps = sum(len(r.captions) for r in self.records)
        return f"{self.name}: {len(self.records):,} images ({counts}), {caps:,} captions; {self.skips.summary()}"
