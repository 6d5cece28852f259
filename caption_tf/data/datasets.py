"""Dataset registry: `--dataset NAME` -> a loader returning a `CaptionDataset`.

Example:

>>> ds = load_dataset(DataConfig(dataset="shapes", num_images=20))
>>> ds.name
'shapes'
"""

from __future__ import annotations

import importlib
from typing import Callable

from caption_tf.config import DataConfig
from caption_tf.data.records import CaptionDataset

DatasetLoader = Callable[[DataConfig], CaptionDataset]
_LOADERS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    def wrap(fn: DatasetLoader) -> DatasetLoader:
        _LOADERS[name] = fn
        return fn

    return wrap


def available_datasets() -> list[str]:
    _import_loaders()
    return sorted(_LOADERS)


# Modules whose import registers their loaders (see `register_dataset`).
LOADER_MODULES = ("caption_tf.data.shapes", "caption_tf.data.public")


def _import_loaders() -> None:
    for module in LOADER_MODULES:
        importlib.import_module(module)


def load_dataset(cfg: DataConfig) -> CaptionDataset:
    """Load (or generate) the dataset named by `cfg.dataset`; raise with the known names."""
    _import_loaders()
    if cfg.dataset not in _LOADERS:
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; available: {sorted(_LOADERS)}")
    ds = _LOADERS[cfg.dataset](cfg)
    if not ds.records:
        raise ValueError(f"Dataset {cfg.dataset!r} has no usable image ({ds.skips.summary()})")
    if cfg.max_train_images is not None:
        train = [r for r in ds.records if r.split == "train"][: cfg.max_train_images]
        keep = {id(r) for r in train}
        ds.records = [r for r in ds.records if r.split != "train" or id(r) in keep]
    return ds
