"""The one encoding path: image files -> standardised feature grids, exactly as the cache stores them.

Every place that turns an image into what the decoder reads goes through
`ImageEncoder`: extracting the feature cache, repairing a damaged cache shard,
fine-tuning (its backbone and statistics), captioning new images
(`caption_tf.evaluation.captioner.Captioner`) and the resource benchmark. Same
backbone weights, same reading and resizing (`data.images.load_rgb`), same
preprocessing, same per-channel standardisation, same float16 rounding, so a
test image passed as a file gets the very grid its cache record holds.

What identifies the backbone is an `EncoderSpec`: backbone name, weights
("imagenet", "none" or a `.weights.h5` file, identified by its SHA-256), input
size and, for `weights="none"`, the initialisation seed. It is stored in the
cache manifest and in the run's `run.json`, so a random backbone is rebuilt
bit for bit from the run alone.

Example:

```python
spec = EncoderSpec.from_config(FeatureConfig(backbone="mobilenet_v3_small", weights="none", input_size=64))
encoder = ImageEncoder(spec, normalizer)
grids, ok = encoder.encode(["a.jpg", "b.png"])     # float16 [2, cells, channels], [True, True]
```
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from caption_tf.config import FeatureConfig
from caption_tf.data.images import BadImageError, load_rgb
from caption_tf.features.backbones import (
    RANDOM_INIT_SEED,
    BackboneWeightsError,
    FeatureExtractor,
    build_extractor,
    resolve_extract_precision,
    resolve_input_size,
    weights_tag,
)
from caption_tf.features.tfrecords import STORED_DTYPE


@dataclass(frozen=True)
class EncoderSpec:
    """Which backbone, with which weights, at which size: enough to rebuild it exactly.

    Args:
        backbone: a `features.backbones.BACKBONES` name.
        weights: "imagenet", "none", or the absolute path of a `.weights.h5` file.
        weights_tag: "imagenet", "none" or "file-<first 12 hex digits of its SHA-256>".
        input_size: the square input size in pixels.
        seed: initialisation seed of a random (`weights="none"`) backbone.
        precision: the backbone's compute precision, "float32" or "bfloat16"
            (`features.extract_precision`, resolved on the machine that extracted the cache).
    """

    backbone: str
    weights: str
    weights_tag: str
    input_size: int
    seed: int = RANDOM_INIT_SEED
    precision: str = "float32"

    @classmethod
    def from_config(cls, cfg: FeatureConfig) -> "EncoderSpec":
        weights = cfg.weights if cfg.weights in ("imagenet", "none") else str(Path(cfg.weights).expanduser().resolve())
        return cls(cfg.backbone, weights, weights_tag(cfg.weights), resolve_input_size(cfg.backbone, cfg.input_size),
                   precision=resolve_extract_precision(cfg.extract_precision))

    @classmethod
    def from_dict(cls, raw: dict) -> "EncoderSpec":
        # Caches and runs from before `extract_precision` were extracted in float32.
        return cls(raw["backbone"], raw["weights"], raw["weights_tag"], int(raw["input_size"]), int(raw["seed"]),
                   raw.get("precision", "float32"))

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """What the features depend on (the file path does not, its content does)."""
        out = {"backbone": self.backbone, "weights": self.weights_tag, "input_size": self.input_size}
        if self.weights == "none":
            out["seed"] = self.seed
        if self.precision != "float32":  # so float32 caches keep their key
            out["precision"] = self.precision
        return out

    def build_extractor(self) -> FeatureExtractor:
        """The backbone with these weights; a weights file must still be there, unchanged."""
        if self.weights not in ("imagenet", "none"):
            path = Path(self.weights)
            if not path.is_file():
                raise BackboneWeightsError(
                    f"{path}: backbone weights file missing; the features were extracted with it "
                    f"({self.weights_tag}). Put the file back at that path, or retrain with --weights"
                )
            if weights_tag(str(path)) != self.weights_tag:
                raise BackboneWeightsError(
                    f"{path}: backbone weights changed since the features were extracted "
                    f"(expected {self.weights_tag}, found {weights_tag(str(path))}); restore the original file or retrain"
                )
        return build_extractor(self.backbone, self.weights, self.input_size, self.seed, self.precision)


@dataclass
class FeatureNormalizer:
    """Per-channel standardisation of grid features, fitted on training images.

    Backbone activations can be tiny (random-init MobileNetV3: std ~1e-10), which
    float16 storage and the decoder's first layer both handle badly; stored
    features are standardised, and the same statistics apply to new images.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, grids: np.ndarray) -> "FeatureNormalizer":
        flat = grids.reshape(-1, grids.shape[-1]).astype(np.float64)
        std = flat.std(0)
        # Dead channels (constant everywhere) stay zero instead of dividing by zero.
        std = np.where(std > 1e-12, std, 1.0)
        return cls(flat.mean(0).astype(np.float32), std.astype(np.float32))

    def __call__(self, grid: np.ndarray) -> np.ndarray:
        return (grid - self.mean) / self.std

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, std=self.std)

    @classmethod
    def load(cls, path: Path) -> "FeatureNormalizer":
        with np.load(path) as f:
            return cls(f["mean"], f["std"])


def _decode_for_backbone(size: int):
    def load(path: bytes):
        try:
            return load_rgb(path.decode(), size=(size, size)), True
        except BadImageError:
            return np.zeros((size, size, 3), np.uint8), False

    def tf_load(index, path):
        image, ok = tf.numpy_function(load, [path], [tf.uint8, tf.bool], stateful=False)
        image.set_shape((size, size, 3))
        ok.set_shape(())
        return index, image, ok

    return tf_load


def decoded_image_batches(paths: Sequence[str], size: int, batch_size: int) -> tf.data.Dataset:
    """(index, image uint8 [B, size, size, 3], ok) batches; decoding runs in parallel, order kept."""
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), [str(p) for p in paths]))
    ds = ds.map(_decode_for_backbone(size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def compiled_extractor(extractor: FeatureExtractor):
    """One traced graph per extractor; batch size may vary."""
    if not hasattr(extractor, "_compiled"):
        extractor._compiled = tf.function(
            lambda images: extractor(images, training=False),
            input_signature=[tf.TensorSpec((None, extractor.input_size, extractor.input_size, 3), tf.uint8)],
        )
    return extractor._compiled


class ImageEncoder:
    """Image files -> the standardised float16 grids the decoder was trained on.

    Args:
        spec: the backbone (`EncoderSpec`), rebuilt on first use.
        normalizer: the training images' statistics; may be set later (the
            cache extraction fits it on the first training batches).
        extractor: an already built backbone for `spec` (fine-tuning passes
            its trained one); built from `spec` when None.

    Example:

    ```python
    encoder = ImageEncoder(cache.encoder_spec, cache.normalizer())
    grids, ok = encoder.encode(["a.jpg"])
    ```
    """

    def __init__(self, spec: EncoderSpec, normalizer: Optional[FeatureNormalizer] = None, extractor: Optional[FeatureExtractor] = None):
        self.spec, self.normalizer, self._extractor = spec, normalizer, extractor

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = self.spec.build_extractor()
        return self._extractor

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def raw_batches(self, paths: Sequence[str], batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """(indices, images uint8, raw grids float32 [B, cells, C], ok) per batch, in order.

        An unreadable file has ok=False (and a zero image); nothing is raised.
        """
        infer = compiled_extractor(self.extractor)
        for index, images, ok in decoded_image_batches(paths, self.input_size, batch_size):
            grid, _ = infer(images)
            yield index.numpy(), images.numpy(), grid.numpy(), ok.numpy()

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        """Raw backbone grids -> what the cache stores: standardised, rounded to float16."""
        if self.normalizer is None:
            raise ValueError("ImageEncoder.standardise: no normalizer (fit one on training grids, or load the cache's)")
        return self.normalizer(raw).astype(STORED_DTYPE)

    def encode(self, paths: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(grids float16 [N, cells, C], ok bool [N]) for image files; unreadable files give ok=False."""
        grids, oks = [], []
        for _, _, raw, ok in self.raw_batches(paths, batch_size):
            grids.append(self.standardise(raw))
            oks.append(ok)
        if not grids:
            return np.zeros((0, 0, 0), STORED_DTYPE), np.zeros(0, bool)
        return np.concatenate(grids), np.concatenate(oks)
