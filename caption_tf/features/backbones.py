"""Pre-trained CNN backbones from `keras.applications` as feature extractors.

Each backbone maps a batch of RGB images to a spatial feature grid
`[B, H*W, C]` (what attention looks at) and a pooled vector `[B, C]`
(for embeddings plots), with its own preprocessing and native input size.

Example:

>>> extractor = build_extractor("mobilenet_v3_small", weights="none", input_size=96)
>>> grid, pooled = extractor(keras.ops.zeros((2, 96, 96, 3)))
>>> tuple(grid.shape), tuple(pooled.shape)  # a 3x3 grid of 576 channels
((2, 9, 576), (2, 576))
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import tensorflow as tf
from keras import applications as apps

from caption_tf.files import file_sha256


# `--weights none` backbones are initialised from this seed, never from the global random
# state: the same random backbone is rebuilt for the feature cache, for fine-tuning, for
# repairing a damaged cache shard and for captioning new images. Recorded in each cache
# manifest (`encoder.seed`), so changing it here never silently changes an existing run.
RANDOM_INIT_SEED = 20240


class BackboneWeightsError(RuntimeError):
    """Weights could not be loaded; the message says what to do instead."""


@contextlib.contextmanager
def _seeded_python_random(seed: int):
    """Keras draws every unseeded initializer's seed from Python's `random`: seed it, then restore it.

    Restoring matters as much as seeding: building a backbone must not change what the
    caller draws next (the decoder's initial weights, issue 12).
    """
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., keras.Model]
    preprocess: Callable  # raw RGB in [0, 255] -> the backbone's expected input
    input_size: int  # native (and default) square input size
    min_size: int  # smallest input keras.applications accepts


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("inception_v3", apps.InceptionV3, apps.inception_v3.preprocess_input, 299, 75),
        BackboneSpec("densenet121", apps.DenseNet121, apps.densenet.preprocess_input, 224, 32),
        BackboneSpec("resnet50", apps.ResNet50, apps.resnet50.preprocess_input, 224, 32),
        BackboneSpec("vgg16", apps.VGG16, apps.vgg16.preprocess_input, 224, 32),
        BackboneSpec("vgg19", apps.VGG19, apps.vgg19.preprocess_input, 224, 32),
        BackboneSpec("mobilenet_v2", apps.MobileNetV2, apps.mobilenet_v2.preprocess_input, 224, 32),
        # MobileNetV3 and EfficientNet rescale inside the model: their preprocess_input is the identity.
        BackboneSpec("mobilenet_v3_small", apps.MobileNetV3Small, apps.mobilenet_v3.preprocess_input, 224, 32),
        BackboneSpec("mobilenet_v3_large", apps.MobileNetV3Large, apps.mobilenet_v3.preprocess_input, 224, 32),
        BackboneSpec("efficientnet_b0", apps.EfficientNetB0, apps.efficientnet.preprocess_input, 224, 32),
    )
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; available: {sorted(BACKBONES)}")
    return BACKBONES[name]


def resolve_input_size(name: str, input_size: int | None) -> int:
    spec = get_spec(name)
    size = input_size or spec.input_size
    if size < spec.min_size:
        raise ValueError(f"--input-size {size} is below the minimum {spec.min_size} for {name}")
    return size


def weights_tag(weights: str) -> str:
    """A short, cache-safe identity of a weights setting (a file is identified by content)."""
    if weights in ("imagenet", "none"):
        return weights
    if not Path(weights).is_file():
        raise BackboneWeightsError(f"--weights {weights}: no such file (expected 'imagenet', 'none' or a .weights.h5 path)")
    return f"file-{file_sha256(weights)[:12]}"


def cpu_has_native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX or AVX512-BF16; oneDNN uses either)."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:  # not Linux
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_extract_precision(setting: str) -> str:
    """`features.extract_precision` -> "float32" or "bfloat16".

    "auto" picks bfloat16 only where it is fast: a CPU with native bf16 matmuls and no GPU.
    Elsewhere bf16 convolutions are emulated (several times slower than float32 on an older
    CPU), and a GPU has not been measured.
    """
    if setting not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"extract_precision must be 'auto', 'float32' or 'bfloat16', got {setting!r}")
    if setting != "auto":
        return setting
    return "bfloat16" if cpu_has_native_bfloat16() and not tf.config.list_physical_devices("GPU") else "float32"


@contextlib.contextmanager
def _dtype_policy(name: str):
    """Build layers under a Keras dtype policy, then restore the caller's."""
    saved = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(saved)


def build_backbone(name: str, weights: str = "imagenet", input_size: int | None = None, seed: int = RANDOM_INIT_SEED) -> keras.Model:
    """The convolutional base (no classifier head) with the requested weights.

    Args:
        name: a key of `BACKBONES`.
        weights: "imagenet" (downloaded by Keras or found in ~/.keras/models),
            "none" (random initialisation from `seed`), or a path to a
            `.weights.h5` file saved from the same architecture without its top.
        input_size: square input size; None for the backbone's native size.
        seed: the initialisation seed for `weights="none"`; the same seed always
            gives the same weights, whatever the process did before.
    """
    spec = get_spec(name)
    size = resolve_input_size(name, input_size)
    kwargs = {"include_top": False, "input_shape": (size, size, 3)}
    if weights == "none":
        with _seeded_python_random(seed):
            return spec.builder(weights=None, **kwargs)
    if weights == "imagenet":
        try:
            return spec.builder(weights="imagenet", **kwargs)
        except Exception as exc:  # Keras raises a plain Exception on "URL fetch failure"
            raise BackboneWeightsError(
                f"Could not load ImageNet weights for {name}: {exc}\n"
                "This machine cannot download them. Either pass --weights none (random initialisation; "
                "fine for the shapes dataset), or download the weights on a machine with internet "
                f"(keras.applications.{spec.builder.__name__}(weights='imagenet', include_top=False)"
                ".save_weights('backbone.weights.h5')) and pass --weights /path/to/backbone.weights.h5, "
                "or copy ~/.keras/models/ from such a machine."
            ) from None
    path = Path(weights)
    if not path.exists():
        raise BackboneWeightsError(f"--weights {weights}: no such file (expected 'imagenet', 'none' or a .weights.h5 path)")
    try:
        return spec.builder(weights=str(path), **kwargs)
    except Exception as exc:
        raise BackboneWeightsError(f"--weights {path}: could not load into {name} without top: {exc}") from None


class FeatureExtractor(keras.Model):
    """Preprocess + backbone + (grid, pooled) outputs, for raw RGB batches in [0, 255].

    Args:
        name, weights, input_size, seed: see `build_backbone`.
        precision: "float32", or "bfloat16": the backbone computes under Keras's
            `mixed_bfloat16` policy (float32 weights, bf16 activations); the outputs are float32.
    """

    def __init__(self, name: str, weights: str = "imagenet", input_size: int | None = None, seed: int = RANDOM_INIT_SEED,
                 precision: str = "float32", **kwargs):
        super().__init__(**kwargs)
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"FeatureExtractor precision must be 'float32' or 'bfloat16', got {precision!r}")
        self.spec, self.precision = get_spec(name), precision
        self.input_size = resolve_input_size(name, input_size)
        with _dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32"):
            self.backbone = build_backbone(name, weights, self.input_size, seed)

    def call(self, images, training=False):
        x = self.spec.preprocess(keras.ops.cast(images, "float32"))
        fmap = keras.ops.cast(self.backbone(x, training=training), "float32")
        shape = keras.ops.shape(fmap)
        grid = keras.ops.reshape(fmap, (shape[0], -1, fmap.shape[-1]))
        return grid, keras.ops.mean(grid, axis=1)


def build_extractor(name: str, weights: str = "imagenet", input_size: int | None = None, seed: int = RANDOM_INIT_SEED,
                    precision: str = "float32") -> FeatureExtractor:
    return FeatureExtractor(name, weights, input_size, seed, precision)
