"""Where the public datasets' files are: the names the loaders look for and the download produces.

`data/public.py` (the loaders) and `data/download.py` (`--download`) both read
these, so a folder the download fills is one the loader accepts.
"""

from __future__ import annotations

from pathlib import Path

FLICKR8K_CAPTION_FILES = ("Flickr8k.token.txt", "captions.txt")
FLICKR8K_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
FLICKR30K_CAPTION_FILES = ("results_20130124.token", "results.csv", "captions.txt")
FLICKR30K_IMAGE_DIRS = ("flickr30k_images", "Images", "images")
COCO_YEARS = ("2014", "2017")
CUSTOM_CAPTION_FILES = ("captions.csv", "captions.jsonl", "captions.txt")

# Shown in "file not found" errors: what a dataset folder must contain.
FLICKR8K_LAYOUT = """  DATA_DIR/
    Flickr8k.token.txt   (or the Kaggle captions.txt: image,caption)
    Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt, Flickr_8k.testImages.txt  (optional)
    Flicker8k_Dataset/*.jpg   (or Images/*.jpg)"""
FLICKR30K_LAYOUT = """  DATA_DIR/
    results_20130124.token   (or results.csv 'image_name| comment_number| comment', or captions.txt)
    flickr30k_images/*.jpg   (or Images/*.jpg)"""
COCO_LAYOUT = """  DATA_DIR/
    annotations/captions_train2014.json, annotations/captions_val2014.json  (or *2017.json)
    train2014/*.jpg, val2014/*.jpg   (or train2017/, val2017/; also under DATA_DIR/images/)"""
CUSTOM_LAYOUT = """  DATA_DIR/
    captions.csv ('image,caption' header) or captions.jsonl ({"image": ..., "caption": ...})
    images referenced by path relative to DATA_DIR (any sub-folders)"""


def flickr8k_present(root: str | Path) -> bool:
    """True when `root` holds a Flickr8k captions file and an images folder."""
    root = Path(root)
    return any((root / f).is_file() for f in FLICKR8K_CAPTION_FILES) and any(
        (root / d).is_dir() for d in FLICKR8K_IMAGE_DIRS
    )
