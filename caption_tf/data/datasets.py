"""Dataset registry: `--dataset NAME` -> a loader returning a `CaptionDataset`.

Example:

```python
ds = load_dataset(DataConfig(dataset="shapes", num_images=20))  # generated into data/ on first use
ds.name  # 'shapes'
```
"""

from __future__ import annotations

from typing import Callable

from caption_tf.config import DataConfig
from caption_tf.data.public import load_coco, load_custom, load_flickr8k, load_flickr30k, load_karpathy
from caption_tf.data.records import CaptionDataset
from caption_tf.data.shapes import load_shapes

DatasetLoader = Callable[[DataConfig], CaptionDataset]
# A new dataset format is one loader function and one line here.
LOADERS: dict[str, DatasetLoader] = {
    "shapes": load_shapes,
    "flickr8k": load_flickr8k,
    "flickr30k": load_flickr30k,
    "coco": load_coco,
    "karpathy": load_karpathy,
    "custom": load_custom,
}


def available_datasets() -> list[str]:
    return sorted(LOADERS)


def load_dataset(cfg: DataConfig) -> CaptionDataset:
    """Load (or generate) the dataset named by `cfg.dataset`; raise with the known names."""
    if cfg.dataset not in LOADERS:
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; available: {available_datasets()}")
    ds = LOADERS[cfg.dataset](cfg)
    if not ds.records:
        raise ValueError(f"Dataset {cfg.dataset!r} has no usable image ({ds.skips.summary()})")
    if cfg.max_train_images is not None:
        train = [r for r in ds.records if r.split == "train"][: cfg.max_train_images]
        keep = {id(r) for r in train}
        ds.records = [r for r in ds.records if r.split != "train" or id(r) in keep]
    return ds
