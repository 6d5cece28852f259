"""Loaders for real caption datasets: Flickr8k, Flickr30k, COCO, Karpathy splits, custom folders.

Each loader reads the caption files as users have them on disk, drops what it
cannot use and records every drop in the dataset's `SkipReport` (missing or
unreadable images, malformed caption lines, images with few references), so a
long run never crashes on one bad file and never hides one either.

Example:

```python
ds = load_dataset(DataConfig(dataset="flickr8k", data_dir="data/flickr8k"))
sorted({r.split for r in ds.records})
print(ds.skips.summary())
```
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Optional

from PIL import Image

from caption_tf.config import DataConfig
from caption_tf.data import images as _images  # noqa: F401  (sets PIL's pixel limits)
from caption_tf.data.download import ensure_flickr8k
from caption_tf.data.layouts import (
    COCO_LAYOUT,
    COCO_YEARS,
    CUSTOM_CAPTION_FILES,
    CUSTOM_LAYOUT,
    FLICKR8K_CAPTION_FILES,
    FLICKR8K_IMAGE_DIRS,
    FLICKR8K_LAYOUT,
    FLICKR8K_SPLIT_FILES,
    FLICKR30K_CAPTION_FILES,
    FLICKR30K_IMAGE_DIRS,
    FLICKR30K_LAYOUT,
)
from caption_tf.data.records import SPLITS, CaptionDataset, ImageRecord, SkipReport, assign_splits

# Flickr8k/30k and COCO give every image 5 reference captions (a few COCO images have 6-7).
EXPECTED_REFERENCES = 5
# Threads for `check_images`: PIL releases the GIL while reading and decoding.
IMAGE_CHECK_WORKERS = 8
# A JPEG is test-decoded at 1/JPEG_CHECK_SCALE resolution (DCT scaling): it catches
# truncated files that `verify()` cannot see, at a small fraction of a full decode.
JPEG_CHECK_SCALE = 8
# Split names used by the files users have; everything else maps to itself.
SPLIT_ALIASES = {"dev": "val", "restval": "train", "validation": "val"}


# Column names accepted in CSV headers for the image file and its caption.
IMAGE_COLUMNS = ("image", "image_name", "filename", "file", "file_name", "path")
CAPTION_COLUMNS = ("caption", "comment", "sentence", "text", "raw")


# ---------------------------------------------------------------------------
# Reading caption files line by line, reporting bad lines instead of failing.


def read_lines(path: str | Path, report: SkipReport) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) of the non-empty lines of a UTF-8 file.

    The file is read as bytes and decoded per line, so one invalid byte
    sequence costs one reported line, not the file.

    Example:

    ```python
    for n, line in read_lines("Flickr8k.token.txt", report): ...
    ```
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark (Excel exports)
        data = data[3:]
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.malformed(str(path), number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if text.strip():
            yield number, text


def _add_caption(captions: dict[str, list[str]], image: str, caption: str) -> None:
    captions.setdefault(image, []).append(" ".join(caption.split()))


def parse_token_file(path: str | Path, report: SkipReport) -> dict[str, list[str]]:
    """Parse the official Flickr token format `<image>.jpg#<n>\\t<caption>`.

    Returns {image file name: [captions]} in file order; bad lines are reported.

    Example:

    ```python
    parse_token_file("Flickr8k.token.txt", SkipReport())["1000268201_693b08cb0e.jpg"][0]
    ```
    """
    captions: dict[str, list[str]] = {}
    for number, line in read_lines(path, report):
        key, sep, caption = line.partition("\t")
        if not sep:
            report.malformed(str(path), number, "no tab between image#n and caption")
            continue
        image = key.strip().split("#", 1)[0].strip()
        if not image:
            report.malformed(str(path), number, "empty image name")
        elif not caption.strip():
            report.malformed(str(path), number, f"empty caption for {image}")
        else:
            _add_caption(captions, image, caption)
    return captions


def _header_columns(header: list[str], path: Path) -> tuple[int, int]:
    names = [h.strip().lower() for h in header]
    image_col = next((names.index(c) for c in IMAGE_COLUMNS if c in names), None)
    caption_col = next((names.index(c) for c in CAPTION_COLUMNS if c in names), None)
    if image_col is None or caption_col is None:
        raise ValueError(
            f"{path}: header {header!r} lacks an image column ({'/'.join(IMAGE_COLUMNS)}) "
            f"or a caption column ({'/'.join(CAPTION_COLUMNS)})"
        )
    return image_col, caption_col


def _sniff_delimiter(header_line: str) -> str:
    # Kaggle's Flickr30k results.csv is pipe-separated despite its name.
    return "|" if header_line.count("|") > header_line.count(",") else ","


def parse_csv_captions(path: str | Path, report: SkipReport, with_split: bool = False) -> dict:
    """Parse a CSV of captions with a header naming the image and caption columns.

    Accepts `image,caption` (Kaggle Flickr8k/30k) and `image_name| comment_number| comment`
    (Kaggle Flickr30k `results.csv`). Quoted captions may contain commas. An unquoted
    caption in the LAST column that contains the delimiter is re-joined; a line with
    too few columns is reported. With `with_split`, an optional `split` column is read
    and the result maps image -> {"captions": [...], "split": str|None}.

    Example:

    ```python
    parse_csv_captions("captions.txt", SkipReport())["1000268201_693b08cb0e.jpg"][:1]
    ```
    """
    path = Path(path)
    captions: dict[str, list[str]] = {}
    splits: dict[str, str] = {}
    lines = read_lines(path, report)
    first = next(lines, None)
    if first is None:
        return {}
    delimiter = _sniff_delimiter(first[1])
    header = next(csv.reader([first[1]], delimiter=delimiter))
    image_col, caption_col = _header_columns(header, path)
    names = [h.strip().lower() for h in header]
    split_col = names.index("split") if with_split and "split" in names else None
    caption_is_last = caption_col == len(header) - 1
    for number, line in lines:
        try:
            row = next(csv.reader([line], delimiter=delimiter, skipinitialspace=True))
        except csv.Error as exc:
            report.malformed(str(path), number, f"unparsable CSV ({exc})")
            continue
        if len(row) > len(header) and caption_is_last:
            # An unquoted caption holding the delimiter: the rest of the raw line is the caption.
            row = line.split(delimiter, caption_col)
        if len(row) != len(header):
            report.malformed(str(path), number, f"{len(row)} columns, expected {len(header)}")
            continue
        image, caption = row[image_col].strip(), row[caption_col].strip()
        if not image:
            report.malformed(str(path), number, "empty image name")
        elif not caption:
            report.malformed(str(path), number, f"empty caption for {image}")
        else:
            _add_caption(captions, image, caption)
            if split_col is not None and row[split_col].strip():
                splits[image] = row[split_col].strip()
    if with_split:
        return {k: {"captions": v, "split": splits.get(k)} for k, v in captions.items()}
    return captions


def parse_jsonl_captions(path: str | Path, report: SkipReport) -> dict[str, dict]:
    """Parse JSON lines `{"image": ..., "caption": ...[, "split": ...]}`.

    Returns image -> {"captions": [...], "split": str|None}; bad lines are reported.

    Example:

    ```python
    parse_jsonl_captions("captions.jsonl", SkipReport())["cat.jpg"]["captions"]
    ```
    """
    out: dict[str, dict] = {}
    for number, line in read_lines(path, report):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            report.malformed(str(path), number, f"invalid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            report.malformed(str(path), number, "not a JSON object")
            continue
        image = str(row.get("image") or "").strip()
        caption = row.get("caption")
        if not image:
            report.malformed(str(path), number, "missing 'image'")
        elif not isinstance(caption, str) or not caption.strip():
            report.malformed(str(path), number, f"missing or empty 'caption' for {image}")
        else:
            entry = out.setdefault(image, {"captions": [], "split": None})
            entry["captions"].append(" ".join(caption.split()))
            if row.get("split"):
                entry["split"] = str(row["split"])
    return out


def read_split_file(path: str | Path, report: SkipReport) -> list[str]:
    """Image names listed one per line (the official Flickr8k split files)."""
    return [line.strip() for _, line in read_lines(path, report)]


def read_karpathy(path: str | Path) -> list[dict]:
    """The `images` of a Karpathy `dataset_*.json`; raise naming the file when unusable.

    Example:

    ```python
    read_karpathy("dataset_flickr8k.json")[0]["split"]
    ```
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Karpathy split file not found: {path} (expected dataset_flickr8k.json, "
            "dataset_flickr30k.json or dataset_coco.json with images[*].filename/split/sentences)"
        )
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8", errors="replace"))
        entries = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a Karpathy split file ({type(exc).__name__}: {exc})") from None
    return entries


def normalise_split(name: Optional[str]) -> Optional[str]:
    """'dev' -> 'val', 'restval' -> 'train'; None or unknown names -> None."""
    if name is None:
        return None
    name = SPLIT_ALIASES.get(name.strip().lower(), name.strip().lower())
    return name if name in SPLITS else None


# ---------------------------------------------------------------------------
# Image checks.


def _image_problem(path: str) -> tuple[Optional[str], Optional[str]]:
    """(reason the image is unusable or None, its PIL mode)."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file", None
        with Image.open(path) as img:
            mode, fmt, size = img.mode, img.format, img.size
            img.verify()
        if fmt == "JPEG":
            # verify() does not decode JPEG data: a reduced-scale decode finds truncation.
            with Image.open(path) as img:
                img.draft(img.mode, (max(1, size[0] // JPEG_CHECK_SCALE), max(1, size[1] // JPEG_CHECK_SCALE)))
                img.load()
        return None, mode
    except Image.DecompressionBombError as exc:
        return f"too large ({exc})", None
    except FileNotFoundError:
        return "file not found", None
    except Exception as exc:  # PIL raises many types for bad data; all mean "unusable"
        kind = "not an image" if type(exc).__name__ == "UnidentifiedImageError" else "corrupt or truncated"
        return f"{kind} ({type(exc).__name__}: {exc})", None


def check_images(
    records: list[ImageRecord], report: SkipReport, workers: int = IMAGE_CHECK_WORKERS
) -> list[ImageRecord]:
    """Keep the records whose image opens; report the others in `report.skipped_images`.

    Cheap enough for large datasets: header parse plus `verify()` per file, and a
    1/8-scale decode for JPEGs, in a thread pool. Images in a mode other than RGB
    (grayscale, RGBA, CMYK, 16-bit) are kept and listed in `report.converted_images`:
    `images.open_rgb` converts them when features are extracted, and the extractor
    still skips any image whose full decode fails.

    Example:

    ```python
    report = SkipReport()
    kept = check_images(records, report)
    report.skipped_images[:1]
    ```
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda r: _image_problem(r.path), records))
    kept = []
    for record, (problem, mode) in zip(records, results):
        if problem:
            report.skip_image(record.path, problem)
            continue
        if mode not in ("RGB", None):
            report.converted_images.append({"path": record.path, "from_mode": mode})
        kept.append(record)
    return kept


# ---------------------------------------------------------------------------
# Turning {image: captions} into records with splits.


def split_by_seed(names: Iterable[str], cfg: DataConfig) -> dict[str, str]:
    """Deterministic train/val/test assignment of image names from `cfg.data_seed`.

    Example:

    >>> split_by_seed(["a.jpg", "b.jpg"], DataConfig(val_fraction=0.5, test_fraction=0))
    {'a.jpg': 'train', 'b.jpg': 'val'}
    """
    ordered = sorted(set(names))
    return dict(zip(ordered, assign_splits(len(ordered), cfg.val_fraction, cfg.test_fraction, cfg.data_seed)))


def karpathy_splits(path: str | Path) -> dict[str, str]:
    """{image file name: train|val|test} from a Karpathy json (restval -> train)."""
    out = {}
    for entry in read_karpathy(path):
        split = normalise_split(entry.get("split"))
        if entry.get("filename") and split:
            out[entry["filename"]] = split
    return out


def build_records(
    captions: dict[str, list[str]],
    paths: dict[str, Path],
    splits: dict[str, str],
    report: SkipReport,
    expected_refs: Optional[int] = EXPECTED_REFERENCES,
    workers: int = IMAGE_CHECK_WORKERS,
) -> list[ImageRecord]:
    """Records for every captioned image that exists, has a split and opens.

    `paths` maps each caption key to its image path; `splits` maps it to a split.
    Drops are reported: missing file (`missing_images`), no split (`skipped_images`),
    unreadable (`skipped_images`); few references are kept and counted.
    """
    records = []
    seen_ids: set[str] = set()
    for key, caps in captions.items():
        path = paths[key]
        if not path.is_file():
            report.missing_images.append(str(path))
            continue
        split = splits.get(key)
        if split is None:
            report.skip_image(str(path), "not listed in any split file")
            continue
        image_id = _unique_id(Path(key).stem, seen_ids)
        if expected_refs and len(caps) < expected_refs:
            report.few_references.append({"image_id": image_id, "count": len(caps)})
        records.append(ImageRecord(image_id, str(path.resolve()), list(caps), split))
    return check_images(records, report, workers=workers)


def _unique_id(stem: str, seen: set[str]) -> str:
    image_id, n = stem, 1
    while image_id in seen:  # the same stem in two folders (custom datasets)
        n += 1
        image_id = f"{stem}_{n}"
    seen.add(image_id)
    return image_id


def _finish(name: str, records: list[ImageRecord], report: SkipReport, folder: Path) -> CaptionDataset:
    if not records:
        raise ValueError(f"Dataset {name!r} in {folder} has no usable image ({report.summary()})")
    return CaptionDataset(name, records, report)  # its summary() is printed once, by whoever loads it


# ---------------------------------------------------------------------------
# Locating files.


def _require_dir(cfg: DataConfig, name: str) -> Path:
    if not cfg.data_dir:
        raise ValueError(f"--dataset {name} needs --data-dir PATH (the folder holding the dataset)")
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder not found: {root} (--data-dir for --dataset {name})")
    return root


def _first_existing(root: Path, names: Iterable[str]) -> Optional[Path]:
    return next((root / n for n in names if (root / n).exists()), None)


def _resolve_in(root: Path, given: Optional[str]) -> Optional[Path]:
    if not given:
        return None
    path = Path(given).expanduser()
    if not path.is_absolute() and not path.exists():
        path = root / path
    if not path.is_file():
        raise FileNotFoundError(f"Captions file not found: {given} (also looked in {root})")
    return path


def _caption_file(root: Path, cfg: DataConfig, candidates: tuple[str, ...], layout: str) -> Path:
    path = _resolve_in(root, cfg.captions_file) or _first_existing(root, candidates)
    if path is None:
        raise FileNotFoundError(
            f"No captions file in {root}: expected one of {', '.join(candidates)} "
            f"(or --captions-file PATH). Expected layout:\n{layout}"
        )
    return path


def _image_dir(root: Path, candidates: tuple[str, ...], layout: str) -> Path:
    path = _first_existing(root, candidates)
    if path is None or not path.is_dir():
        raise FileNotFoundError(
            f"No images folder in {root}: expected {' or '.join(str(root / c) for c in candidates)}. "
            f"Expected layout:\n{layout}"
        )
    return path


def parse_caption_file(path: Path, report: SkipReport) -> dict[str, list[str]]:
    """Token format (`name#n<TAB>caption`) or CSV with a header, chosen from the first line."""
    first = next(read_lines(path, SkipReport()), (0, ""))[1]
    if "\t" in first and "#" in first.split("\t", 1)[0]:
        return parse_token_file(path, report)
    return parse_csv_captions(path, report)


def _flickr(name: str, cfg: DataConfig, caption_files, image_dirs, layout, split_files=None) -> CaptionDataset:
    """Shared Flickr8k/Flickr30k loading: captions, images folder, then splits."""
    root = _require_dir(cfg, name)
    report = SkipReport()
    caption_path = _caption_file(root, cfg, caption_files, layout)
    image_dir = _image_dir(root, image_dirs, layout)
    captions = parse_caption_file(caption_path, report)
    if not captions:
        raise ValueError(f"{caption_path}: no caption could be parsed ({report.summary()})")
    paths = {k: image_dir / k for k in captions}
    splits = _splits_for(root, captions, cfg, report, split_files)
    records = build_records(captions, paths, splits, report)
    return _finish(name, records, report, image_dir)


def _splits_for(root: Path, captions, cfg: DataConfig, report: SkipReport, split_files) -> dict[str, str]:
    # Priority: --split-file (Karpathy) > the dataset's own split files > a seeded split.
    if cfg.split_file:
        return karpathy_splits(cfg.split_file)
    if split_files and all((root / f).is_file() for f in split_files.values()):
        splits = {}
        for split, fname in split_files.items():
            splits.update({image: split for image in read_split_file(root / fname, report)})
        return splits
    return split_by_seed(captions, cfg)


def load_flickr8k(cfg: DataConfig) -> CaptionDataset:
    """Flickr8k: official token file or Kaggle captions.txt; official split files if present.

    Example:

    ```python
    ds = load_flickr8k(DataConfig(dataset="flickr8k", data_dir="data/flickr8k"))
    len(ds.split("train")), len(ds.split("val")), len(ds.split("test"))
    ```
    """
    if cfg.download:
        cfg = ensure_flickr8k(cfg)
    return _flickr("flickr8k", cfg, FLICKR8K_CAPTION_FILES, FLICKR8K_IMAGE_DIRS, FLICKR8K_LAYOUT, FLICKR8K_SPLIT_FILES)


def load_flickr30k(cfg: DataConfig) -> CaptionDataset:
    """Flickr30k: `results_20130124.token`, Kaggle `results.csv` (pipe) or `captions.txt`.

    Example:

    ```python
    ds = load_flickr30k(DataConfig(dataset="flickr30k", data_dir="data/flickr30k"))
    ```
    """
    return _flickr("flickr30k", cfg, FLICKR30K_CAPTION_FILES, FLICKR30K_IMAGE_DIRS, FLICKR30K_LAYOUT)


def _coco_annotation_files(root: Path) -> tuple[Path, Path]:
    for year in COCO_YEARS:
        train = root / "annotations" / f"captions_train{year}.json"
        val = root / "annotations" / f"captions_val{year}.json"
        if train.is_file() or val.is_file():
            return train, val
    raise FileNotFoundError(f"No COCO caption annotations in {root / 'annotations'}. Expected layout:\n{COCO_LAYOUT}")


def parse_coco_captions(path: Path, root: Path, report: SkipReport) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """COCO `captions_*.json` -> ({file_name: captions}, {file_name: image path}).

    Bad annotations are reported with their index in `annotations` as the line.
    """
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8", errors="replace"))
        images, annotations = data["images"], data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a COCO captions file ({type(exc).__name__}: {exc})") from None
    folder = path.stem.replace("captions_", "")  # captions_val2014 -> val2014
    image_dir = _first_existing(root, (folder, f"images/{folder}"))
    if image_dir is None:
        raise FileNotFoundError(f"No COCO images folder {root / folder} for {path}. Expected layout:\n{COCO_LAYOUT}")
    names = {img["id"]: img["file_name"] for img in images if "id" in img and "file_name" in img}
    captions: dict[str, list[str]] = {}
    for index, ann in enumerate(annotations):
        name = names.get(ann.get("image_id")) if isinstance(ann, dict) else None
        caption = ann.get("caption") if isinstance(ann, dict) else None
        if name is None:
            report.malformed(str(path), index, f"annotations[{index}] has no known image_id")
        elif not isinstance(caption, str) or not caption.strip():
            report.malformed(str(path), index, f"annotations[{index}]: empty caption for {name}")
        else:
            _add_caption(captions, name, caption)
    return captions, {name: image_dir / name for name in captions}


def load_coco(cfg: DataConfig) -> CaptionDataset:
    """COCO captions 2014/2017; without --split-file: train json -> train, val json -> val/test halves.

    Example:

    ```python
    ds = load_coco(DataConfig(dataset="coco", data_dir="data/coco", split_file="dataset_coco.json"))
    ```
    """
    root = _require_dir(cfg, "coco")
    report = SkipReport()
    captions: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    default_splits: dict[str, str] = {}
    for ann_file, role in zip(_coco_annotation_files(root), ("train", "val")):
        if not ann_file.is_file():
            continue
        caps, where = parse_coco_captions(ann_file, root, report)
        captions.update(caps)
        paths.update(where)
        if role == "train":
            default_splits.update({name: "train" for name in caps})
        else:
            halves = DataConfig(val_fraction=0.5, test_fraction=0.5, data_seed=cfg.data_seed)
            default_splits.update(split_by_seed(caps, halves))
    splits = karpathy_splits(cfg.split_file) if cfg.split_file else default_splits
    records = build_records(captions, paths, splits, report)
    return _finish("coco", records, report, root)


def _karpathy_image_path(root: Path, entry: dict) -> Path:
    filename, filepath = entry["filename"], entry.get("filepath") or ""
    candidates = [root / filepath / filename, root / filename]
    candidates += [root / d / filename for d in FLICKR8K_IMAGE_DIRS + FLICKR30K_IMAGE_DIRS]
    return next((c for c in candidates if c.is_file()), candidates[0])


def load_karpathy(cfg: DataConfig) -> CaptionDataset:
    """Captions and splits from a Karpathy `dataset_*.json`; images under --data-dir.

    Example:

    ```python
    ds = load_karpathy(DataConfig(dataset="karpathy", split_file="dataset_flickr8k.json",
                                  data_dir="data/flickr8k/Flicker8k_Dataset"))
    ```
    """
    if not cfg.split_file:
        raise ValueError("--dataset karpathy needs --split-file PATH (dataset_flickr8k/30k/coco.json)")
    root = _require_dir(cfg, "karpathy")
    report = SkipReport()
    captions, paths, splits = {}, {}, {}
    for index, entry in enumerate(read_karpathy(cfg.split_file)):
        filename = entry.get("filename") if isinstance(entry, dict) else None
        if not filename:
            report.malformed(cfg.split_file, index, "image entry without a filename")
            continue
        sentences = [s.get("raw", "") for s in entry.get("sentences", []) if isinstance(s, dict)]
        sentences = [s for s in sentences if isinstance(s, str) and s.strip()]
        if not sentences:
            report.malformed(cfg.split_file, index, f"no caption for {filename}")
            continue
        key = f"{entry.get('filepath') or ''}/{filename}".lstrip("/")
        captions[key] = [" ".join(s.split()) for s in sentences]
        paths[key] = _karpathy_image_path(root, entry)
        split = normalise_split(entry.get("split"))
        if split:
            splits[key] = split
    records = build_records(captions, paths, splits, report)
    return _finish("karpathy", records, report, root)


def _custom_caption_file(root: Path, cfg: DataConfig) -> Path:
    return _caption_file(root, cfg, CUSTOM_CAPTION_FILES, CUSTOM_LAYOUT)


def load_custom(cfg: DataConfig) -> CaptionDataset:
    """A folder of images plus a CSV (`image,caption[,split]`) or JSONL of rows.

    Several rows per image give several references; without a split column the
    split is drawn from `data_seed`. Image paths are relative to --data-dir.

    Example:

    ```python
    ds = load_custom(DataConfig(dataset="custom", data_dir="my_photos"))
    ```
    """
    root = _require_dir(cfg, "custom")
    report = SkipReport()
    path = _custom_caption_file(root, cfg)
    if path.suffix.lower() == ".jsonl":
        rows = parse_jsonl_captions(path, report)
    else:
        rows = parse_csv_captions(path, report, with_split=True)
    if not rows:
        raise ValueError(f"{path}: no caption could be parsed ({report.summary()})")
    captions = {k: v["captions"] for k, v in rows.items()}
    paths = {k: (Path(k) if Path(k).is_absolute() else root / k) for k in rows}
    seeded = split_by_seed(rows, cfg)
    given = {k: normalise_split(v["split"]) for k, v in rows.items()}
    splits = {k: given[k] or seeded[k] for k in rows}
    if cfg.split_file:
        by_name = karpathy_splits(cfg.split_file)
        splits = {k: by_name.get(Path(k).name) for k in rows}
    records = build_records(captions, paths, splits, report, expected_refs=None)
    return _finish("custom", records, report, root)
