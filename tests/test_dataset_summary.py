"""What train.py says about the data it loaded: one summary line with the reasons images were left out,
and a warning when max_length cuts many training captions (issue 14)."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from caption_tf.config import load_config
from caption_tf.data.datasets import load_dataset
from tests.conftest import tiny_overrides

LONG = "a man in a yellow shirt and a helmet is standing on a rock near the water"  # 17 words


def _custom_dataset(root):
    """12 images (8 train, 2 val, 2 test), most with a long caption, plus a row for a missing image."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
        split = "train" if k < 8 else ("val" if k < 10 else "test")
        caption = "a red square" if k == 0 else LONG
        rows += [(f"images/{k}.png", caption, split), (f"images/{k}.png", "a photo", split)]
    rows.append(("images/missing.png", "a dog", "train"))
    with open(root / "captions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "caption", "split"), *rows])


def test_one_summary_line_with_the_reasons_and_a_max_length_warning(tmp_path, capsys):
    from caption_tf.training.trainer import prepare_data

    _custom_dataset(tmp_path / "photos")
    cfg = load_config("minimal", tiny_overrides(tmp_path, dataset="custom", data_dir=str(tmp_path / "photos"), input_size=32, max_length=12))
    load_dataset(cfg.data)
    assert capsys.readouterr().out == ""  # loading prints nothing: the caller prints the summary, once
    prepare_data(cfg)
    out, err = capsys.readouterr()
    summaries = [line for line in out.splitlines() if "custom: " in line and " images (" in line]
    assert summaries == [
        "Dataset custom: 12 images (train 8, val 2, test 2), 24 captions; missing images: 1 "
        "(details: skips.json in the run folder)"
    ]
    # 7 of the 16 training captions have 17 words: more than max_length 12 (10 words) keeps.
    assert "warning: 44% of training captions (7 of 16) are longer than --max-length 12 allows (10 words + <start>/<end>) " \
           "and are cut; --max-length 19 keeps 95% of them whole (or --max-length auto)" in err


def test_skip_reasons_are_counted_by_kind():
    from caption_tf.data.records import SkipReport

    report = SkipReport(missing_images=["x.jpg"])
    for n in range(91):
        report.skip_image(f"{n}.jpg", "not listed in any split file")
    report.skip_image("bad.jpg", "corrupt or truncated (OSError: image file is truncated)")
    assert report.summary() == "skipped images: 92 (91 not listed in any split file, 1 corrupt or truncated); missing images: 1"
