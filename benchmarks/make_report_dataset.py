"""A Flickr8k-sized test split for timing `evaluate.py`: 1,000 test images with 5 captions each.

The machines here have only the 300-photo Flickr8k sample (`../shared/data/flickr8k_sample`).
This script writes a `--dataset custom` folder (`captions.csv` with an `image,caption,split`
header, and JPEGs) whose splits have the sizes of the official Flickr8k protocol: every image
is an augmented copy (random crop, flip, small rotation, colour jitter) of a sample photo and
keeps that photo's 5 real captions.

- Test image k is a copy of photo k mod 300, so any 300 consecutive test images show 300
  different photos: the retrieval pools of `evaluate.py` (consecutive images) hold distinct
  captions, as real data would.
- `--filler-words N` adds N invented words, in extra training captions of a few images, so
  that the vocabulary reaches the size the minimal preset reaches on Flickr8k (3,000): the
  decoder's softmax, the main cost of decoding and retrieval, then costs what it costs there.

Not a quality benchmark: train and test copies share photos, so scores are inflated.

Example:

    python benchmarks/make_report_dataset.py --out data/flickr_like_1k --test 1000 --train 1000 --val 100
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT.parent / "shared" / "data" / "flickr8k_sample"


def read_sample(folder: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for line in (folder / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, caption = line.split("\t", 1)
        captions.setdefault(key.split("#")[0], []).append(caption.strip())
    return captions


def augment(image: Image.Image, rng: random.Random) -> Image.Image:
    width, height = image.size
    scale = rng.uniform(0.75, 1.0)
    w, h = int(width * scale), int(height * scale)
    x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
    out = image.crop((x0, y0, x0 + w, y0 + h))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = out.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, expand=False)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(out).enhance(rng.uniform(0.8, 1.2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", default=str(SAMPLE), help="the Flickr8k sample folder")
    parser.add_argument("--out", required=True, help="dataset folder to write (pass it to train.py --data-dir)")
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--filler-words", type=int, default=1400, help="invented words added to training captions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sample = Path(args.sample)
    if not (sample / "Flickr8k.token.txt").is_file():
        print(f"error: {sample}/Flickr8k.token.txt not found (the Flickr8k sample folder)", file=sys.stderr)
        return 2
    captions = read_sample(sample)
    photos = sorted(captions)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    rows = []
    for split, count in (("train", args.train), ("val", args.val), ("test", args.test)):
        for k in range(count):
            photo = photos[k % len(photos)]
            name = f"images/{split}_{k:05d}.jpg"
            with Image.open(sample / "Images" / photo) as image:
                augment(image.convert("RGB"), rng).save(out / name, quality=90)
            rows += [(name, caption, split) for caption in captions[photo]]
    # Filler vocabulary: 10 invented words per extra caption, on the first training images.
    fillers = [f"zq{n:04d}" for n in range(args.filler_words)]
    for n in range(0, len(fillers), 10):
        rows.append((f"images/train_{(n // 10) % max(args.train, 1):05d}.jpg", "a " + " ".join(fillers[n : n + 10]), "train"))
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "split"])
        writer.writerows(rows)
    images = args.train + args.val + args.test
    print(f"{out}: {images} images ({args.train}/{args.val}/{args.test}), {len(rows)} captions, {len(fillers)} filler words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
