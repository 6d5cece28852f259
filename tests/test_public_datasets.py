"""Real-format caption datasets: parsing, splits, and the skip report for bad input.

Every test builds a tiny dataset in `tmp_path` (generated images + caption files
in the on-disk formats users have), except the two that read the real
Flickr8k sample in `../shared/data/flickr8k_sample`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_tf.config import DataConfig
from caption_tf.data.datasets import load_dataset
from caption_tf.data.images import load_rgb, open_rgb
from caption_tf.data.public import check_images
from caption_tf.data.records import ImageRecord, SkipReport

SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "flickr8k_sample"


def save_jpeg(path: Path, seed: int = 0, size=(48, 32), mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format="JPEG", quality=90)
    return path


def caps(name: str, n: int = 5) -> list[str]:
    return [f"caption {i} of {name}" for i in range(n)]


def pairs(ds) -> dict[str, tuple[list[str], str]]:
    return {Path(r.path).name: (r.captions, r.split) for r in ds.records}


def make_bad_images(folder: Path) -> dict[str, str]:
    """Zero-byte, non-image and truncated files; returns name -> expected reason prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a picture")
    whole = save_jpeg(folder / "whole.tmp", seed=99, size=(128, 128)).read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "whole.tmp").unlink()
    return {"empty.jpg": "zero-byte", "notes.jpg": "not an image", "truncated.jpg": "corrupt or truncated"}


# ---------------------------------------------------------------------------
# Flickr8k


def build_flickr8k(root: Path, kaggle: bool = False, split_files: bool = True) -> dict:
    """Good images (incl. grayscale/CMYK), bad images, a missing image, bad lines."""
    images = root / ("Images" if kaggle else "Flicker8k_Dataset")
    good = [f"img{i}.jpg" for i in range(6)]
    for i, name in enumerate(good):
        save_jpeg(images / name, seed=i)
    save_jpeg(images / "gray.jpg", seed=7, mode="L")
    save_jpeg(images / "cmyk.jpg", seed=8, mode="CMYK")
    bad = make_bad_images(images)
    expected = {name: caps(name) for name in good + ["gray.jpg", "cmyk.jpg"]}
    expected["few.jpg"] = caps("few.jpg", 2)
    save_jpeg(images / "few.jpg", seed=9)
    listed = {**expected, "missing.jpg": caps("missing.jpg"), **{b: caps(b) for b in bad}}
    lines: list[bytes] = []
    if kaggle:
        lines.append(b"image,caption")
        for name, cs in listed.items():
            lines += [f'{name},"{c}"'.encode() for c in cs]
        lines.append(b"img0.jpg")  # one column only
        lines.append(b'img1.jpg,""')  # empty caption
        lines.append("img2.jpg,caf\u00e9 bad ".encode("latin-1"))  # not UTF-8
        lines.append(b"img3.jpg,a dog , running")  # unquoted comma: re-joined, kept
        expected["img3.jpg"] = expected["img3.jpg"] + ["a dog , running"]
        (root / "captions.txt").write_bytes(b"\r\n".join(lines) + b"\r\n")
    else:
        for name, cs in listed.items():
            lines += [f"{name}#{i}\t{c}".encode() for i, c in enumerate(cs)]
        lines.append(b"img0.jpg#5 no tab here")
        lines.append(b"img1.jpg#5\t   ")
        lines.append("img2.jpg#5\tcaf\u00e9".encode("latin-1"))
        (root / "Flickr8k.token.txt").write_bytes(b"\n".join(lines) + b"\n")
        # The lemma file has the same format and must not be read as captions.
        (root / "Flickr8k.lemma.token.txt").write_text("img0.jpg#0\tlemma caption\n")
    split_of = {"img0.jpg": "train", "img1.jpg": "train", "img2.jpg": "train", "gray.jpg": "train",
                "cmyk.jpg": "train", "few.jpg": "train", "img3.jpg": "val", "img4.jpg": "test", "img5.jpg": "test"}
    if split_files:
        everything = list(listed)  # split files also list the missing and bad images
        for split, fname in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
            names = [n for n in everything if split_of.get(n, "train") == split]
            (root / f"Flickr_8k.{fname}.txt").write_text("\n".join(names) + "\n")
    n_lines = len(lines)
    return {"expected": expected, "bad": bad, "images": images, "split_of": split_of, "n_lines": n_lines}


def check_bad_input_report(ds, info: dict, caption_file: Path, bad_line_numbers: list[int]) -> None:
    skips = ds.skips
    assert skips.missing_images == [str(info["images"] / "missing.jpg")]
    reasons = {Path(s["path"]).name: s["reason"] for s in skips.skipped_images}
    assert set(reasons) == set(info["bad"])
    for name, prefix in info["bad"].items():
        assert reasons[name].startswith(prefix), (name, reasons[name])
    assert [(m["file"], m["line"]) for m in skips.malformed_lines] == [
        (str(caption_file), n) for n in bad_line_numbers
    ]
    assert skips.few_references == [{"image_id": "few", "count": 2}]
    assert {Path(c["path"]).name: c["from_mode"] for c in skips.converted_images} == {"gray.jpg": "L", "cmyk.jpg": "CMYK"}
    summary = skips.summary()
    assert "missing images: 1" in summary and "skipped images: 3" in summary and "malformed lines: 3" in summary


def test_flickr8k_token_format_with_split_files_and_bad_input(tmp_path):
    info = build_flickr8k(tmp_path)
    ds = load_dataset(DataConfig(dataset="flickr8k", data_dir=str(tmp_path)))
    got = pairs(ds)
    assert {k: v[0] for k, v in got.items()} == info["expected"]
    assert {k: v[1] for k, v in got.items()} == info["split_of"]
    n = info["n_lines"]
    check_bad_input_report(ds, info, tmp_path / "Flickr8k.token.txt", [n - 2, n - 1, n])
    assert all(np.asarray(Image.open(r.path)).size for r in ds.records)


def test_flickr8k_kaggle_csv_without_split_files_splits_by_seed(tmp_path):
    info = build_flickr8k(tmp_path, kaggle=True, split_files=False)
    cfg = DataConfig(dataset="flickr8k", data_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.25, data_seed=3)
    ds = load_dataset(cfg)
    assert {k: v[0] for k, v in pairs(ds).items()} == info["expected"]
    n = info["n_lines"]
    check_bad_input_report(ds, info, tmp_path / "captions.txt", [n - 3, n - 2, n - 1])
    # Seeded split over all captioned images (12 incl. bad/missing): 3 val, 3 test, 6 train before drops.
    splits = {k: v[1] for k, v in pairs(ds).items()}
    again = {k: v[1] for k, v in pairs(load_dataset(cfg)).items()}
    assert splits == again
    assert set(splits.values()) <= {"train", "val", "test"} and "train" in splits.values()
    others = [pairs(load_dataset(DataConfig(**{**cfg.__dict__, "data_seed": s}))) for s in range(4, 9)]
    assert any({k: v[1] for k, v in o.items()} != splits for o in others)


def test_flickr8k_errors_name_the_missing_paths(tmp_path):
    (tmp_path / "Flickr8k.lemma.token.txt").write_text("img0.jpg#0\tlemma caption\n")
    (tmp_path / "Images").mkdir()
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset(DataConfig(dataset="flickr8k", data_dir=str(tmp_path)))
    assert "Flickr8k.token.txt" in str(exc.value) and "captions.txt" in str(exc.value) and str(tmp_path) in str(exc.value)
    (tmp_path / "Images").rmdir()
    (tmp_path / "Flickr8k.token.txt").write_text("img0.jpg#0\ta caption\n")
    with pytest.raises(FileNotFoundError, match="Flicker8k_Dataset"):
        load_dataset(DataConfig(dataset="flickr8k", data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="Data folder not found"):
        load_dataset(DataConfig(dataset="flickr8k", data_dir=str(tmp_path / "nowhere")))


def test_dataset_without_usable_image_stops_naming_the_folder(tmp_path):
    images = tmp_path / "Images"
    bad = make_bad_images(images)
    (tmp_path / "captions.txt").write_text("image,caption\n" + "".join(f"{b},a caption\n" for b in bad))
    with pytest.raises(ValueError) as exc:
        load_dataset(DataConfig(dataset="flickr8k", data_dir=str(tmp_path)))
    assert str(images) in str(exc.value) and "no usable image" in str(exc.value)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real Flickr8k sample not present at {SAMPLE}")
@pytest.mark.parametrize("caption_file", ["Flickr8k.token.txt", "captions.txt"])
def test_real_flickr8k_sample_in_both_caption_formats(tmp_path, caption_file):
    # Link the sample's files into a folder holding only one caption format.
    for name in ["Images", caption_file, "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt"]:
        (tmp_path / name).symlink_to((SAMPLE / name).resolve())
    ds = load_dataset(DataConfig(dataset="flickr8k", data_dir=str(tmp_path)))
    assert [len(ds.split(s)) for s in ("train", "val", "test")] == [200, 50, 50]
    assert all(len(r.captions) == 5 for r in ds.records)
    assert ds.skips.counts() == {k: 0 for k in ds.skips.counts()}
    dev = (SAMPLE / "Flickr_8k.devImages.txt").read_text().split()
    assert sorted(Path(r.path).name for r in ds.split("val")) == sorted(dev)
    token_lines = (SAMPLE / "Flickr8k.token.txt").read_text().splitlines()
    name, caption = token_lines[0].split("#", 1)[0], token_lines[0].split("\t", 1)[1]
    assert ds.by_id()[Path(name).stem].captions[0] == " ".join(caption.split())


# ---------------------------------------------------------------------------
# Flickr30k


@pytest.mark.parametrize("fmt", ["token", "results_csv", "captions_txt"])
def test_flickr30k_formats(tmp_path, fmt):
    images = tmp_path / ("flickr30k_images" if fmt != "captions_txt" else "Images")
    names = [f"{1000 + i}.jpg" for i in range(4)]
    for i, name in enumerate(names):
        save_jpeg(images / name, seed=i)
    expected = {name: caps(name) for name in names}
    if fmt == "token":
        text = "".join(f"{n}#{i}\t{c}\n" for n, cs in expected.items() for i, c in enumerate(cs))
        (tmp_path / "results_20130124.token").write_text(text)
    elif fmt == "results_csv":
        rows = [f"{n}| {i}| {c}" for n, cs in expected.items() for i, c in enumerate(cs)]
        rows.insert(3, "1001.jpg| 4 A dog runs across the grass .")  # real Kaggle defect: a missing '|'
        (tmp_path / "results.csv").write_text("image_name| comment_number| comment\n" + "\n".join(rows) + "\n")
    else:
        rows = [f"{n},{c}" for n, cs in expected.items() for c in cs]
        (tmp_path / "captions.txt").write_text("image,caption\n" + "\n".join(rows) + "\n")
    ds = load_dataset(DataConfig(dataset="flickr30k", data_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.25))
    assert {k: v[0] for k, v in pairs(ds).items()} == expected
    assert sorted(v[1] for v in pairs(ds).values()) == ["test", "train", "train", "val"]
    if fmt == "results_csv":
        assert ds.skips.malformed_lines == [
            {"file": str(tmp_path / "results.csv"), "line": 5, "reason": "2 columns, expected 3"}
        ]
    else:
        assert ds.skips.counts() == {k: 0 for k in ds.skips.counts()}


# ---------------------------------------------------------------------------
# COCO and Karpathy


def build_coco(root: Path) -> dict:
    expected = {}
    for folder, ids in (("train2014", range(1, 4)), ("val2014", range(10, 18))):
        images, annotations = [], []
        for image_id in ids:
            name = f"COCO_{folder}_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name})
            n_caps = 6 if image_id == 1 else 5
            for k in range(n_caps):
                annotations.append({"id": image_id * 10 + k, "image_id": image_id, "caption": f"photo {image_id} #{k} "})
            if image_id != 17:  # referenced but absent on disk
                save_jpeg(root / folder / name, seed=image_id)
                expected[name] = [f"photo {image_id} #{k}" for k in range(n_caps)]
        annotations.append({"id": 999, "image_id": 12345, "caption": "orphan"})
        annotations.append({"id": 998, "image_id": ids[0], "caption": ""})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return expected


def test_coco_train_val_jsons_split_val_into_halves(tmp_path):
    expected = build_coco(tmp_path)
    ds = load_dataset(DataConfig(dataset="coco", data_dir=str(tmp_path)))
    got = pairs(ds)
    assert {k: v[0] for k, v in got.items()} == expected
    assert {k for k, v in got.items() if v[1] == "train"} == {n for n in expected if "train2014" in n}
    val_test = [v[1] for k, v in got.items() if "val2014" in k]
    assert val_test.count("val") + val_test.count("test") == 7 and min(val_test.count("val"), val_test.count("test")) >= 3
    assert ds.skips.missing_images == [str(tmp_path / "val2014" / "COCO_val2014_000000000017.jpg")]
    # "line" of a JSON annotation is its index in the file's "annotations" list.
    ann = tmp_path / "annotations"
    assert [(Path(m["file"]).name, m["line"]) for m in ds.skips.malformed_lines] == [
        ("captions_train2014.json", 16), ("captions_train2014.json", 17),
        ("captions_val2014.json", 40), ("captions_val2014.json", 41)]
    assert ds.skips.malformed_lines[0]["file"] == str(ann / "captions_train2014.json")
    assert "image_id" in ds.skips.malformed_lines[0]["reason"] and "empty caption" in ds.skips.malformed_lines[1]["reason"]
    assert ds.skips.few_references == []


def karpathy_json(path: Path, entries: list[tuple[str, str, str, list[str]]]) -> Path:
    images = [
        {"filepath": fp, "filename": fn, "split": sp, "sentences": [{"raw": s, "tokens": s.split()} for s in ss]}
        for fp, fn, sp, ss in entries
    ]
    path.write_text(json.dumps({"images": images, "dataset": "x"}))
    return path


def test_karpathy_split_file_overrides_flickr8k_and_coco_splits(tmp_path):
    info = build_flickr8k(tmp_path / "f8k")
    split_file = karpathy_json(tmp_path / "dataset_flickr8k.json", [
        ("", "img0.jpg", "test", ["x"]), ("", "img1.jpg", "restval", ["x"]), ("", "img2.jpg", "val", ["x"]),
        ("", "img3.jpg", "train", ["x"]),
    ])
    ds = load_dataset(DataConfig(dataset="flickr8k", data_dir=str(tmp_path / "f8k"), split_file=str(split_file)))
    got = pairs(ds)
    assert {k: v[1] for k, v in got.items()} == {"img0.jpg": "test", "img1.jpg": "train", "img2.jpg": "val", "img3.jpg": "train"}
    assert got["img0.jpg"][0] == info["expected"]["img0.jpg"]  # captions still from the token file
    not_listed = [s for s in ds.skips.skipped_images if s["reason"] == "not listed in any split file"]
    assert {Path(s["path"]).name for s in not_listed} == {"img4.jpg", "img5.jpg", "gray.jpg", "cmyk.jpg", "few.jpg", *info["bad"]}

    build_coco(tmp_path / "coco")
    coco_split = karpathy_json(tmp_path / "dataset_coco.json", [
        ("val2014", "COCO_val2014_000000000010.jpg", "restval", ["x"]),
        ("train2014", "COCO_train2014_000000000002.jpg", "test", ["x"]),
    ])
    ds = load_dataset(DataConfig(dataset="coco", data_dir=str(tmp_path / "coco"), split_file=str(coco_split)))
    assert {k: v[1] for k, v in pairs(ds).items()} == {
        "COCO_val2014_000000000010.jpg": "train", "COCO_train2014_000000000002.jpg": "test"}


def test_karpathy_dataset_reads_captions_and_splits_from_json(tmp_path):
    for i, sub in enumerate(["train2014", "val2014", "val2014"]):
        save_jpeg(tmp_path / "imgs" / sub / f"p{i}.jpg", seed=i)
    split_file = karpathy_json(tmp_path / "dataset_coco.json", [
        ("train2014", "p0.jpg", "train", caps("p0")), ("val2014", "p1.jpg", "val", caps("p1", 3)),
        ("val2014", "p2.jpg", "restval", caps("p2")), ("val2014", "gone.jpg", "test", caps("gone")),
        ("val2014", "nocaps.jpg", "test", []),
    ])
    ds = load_dataset(DataConfig(dataset="karpathy", data_dir=str(tmp_path / "imgs"), split_file=str(split_file)))
    assert pairs(ds) == {"p0.jpg": (caps("p0"), "train"), "p1.jpg": (caps("p1", 3), "val"), "p2.jpg": (caps("p2"), "train")}
    assert ds.skips.missing_images == [str(tmp_path / "imgs" / "val2014" / "gone.jpg")]
    assert ds.skips.few_references == [{"image_id": "p1", "count": 3}]
    assert ds.skips.malformed_lines[0]["reason"] == "no caption for nocaps.jpg"
    with pytest.raises(ValueError, match="--split-file"):
        load_dataset(DataConfig(dataset="karpathy", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------
# Custom folders


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_custom_folder_csv_and_jsonl(tmp_path, fmt):
    names = ["a.jpg", "sub/b.jpg", "c.png", "d.jpg", "e.jpg", "f.jpg"]
    for i, name in enumerate(names):
        save_jpeg(tmp_path / name, seed=i)
    expected = {n: [f"first of {n}", f"second of {n}"] if i % 2 == 0 else [f"only {n}"] for i, n in enumerate(names)}
    rows = [(n, c) for n, cs in expected.items() for c in cs] + [("ghost.jpg", "not on disk")]
    if fmt == "csv":
        text = "image,caption\n" + "".join(f'{n},"{c}"\n' for n, c in rows) + "broken-row\n"
        captions = tmp_path / "my_captions.csv"
    else:
        text = "".join(json.dumps({"image": n, "caption": c}) + "\n" for n, c in rows) + "{not json\n"
        captions = tmp_path / "my_captions.jsonl"
    captions.write_text(text)
    cfg = DataConfig(dataset="custom", data_dir=str(tmp_path), captions_file=captions.name, val_fraction=0.2, test_fraction=0.2)
    ds = load_dataset(cfg)
    got = {str(Path(r.path).relative_to(tmp_path.resolve())): (r.captions, r.split) for r in ds.records}
    assert {k: v[0] for k, v in got.items()} == expected
    # 7 names (ghost included) at 0.2/0.2 -> 1 val, 1 test, 5 train before the ghost is dropped.
    split_list = [v[1] for v in got.values()]
    assert split_list.count("val") <= 1 and split_list.count("test") <= 1 and split_list.count("train") >= 4
    assert ds.skips.missing_images == [str(tmp_path / "ghost.jpg")]
    assert [m["line"] for m in ds.skips.malformed_lines] == [len(rows) + (2 if fmt == "csv" else 1)]
    assert ds.skips.few_references == []  # custom data has no expected reference count


def test_custom_folder_default_captions_file_and_missing_one(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_dataset(DataConfig(dataset="custom", data_dir=str(tmp_path)))
    assert "captions.csv" in str(exc.value) and "captions.jsonl" in str(exc.value)
    save_jpeg(tmp_path / "x.jpg")
    (tmp_path / "captions.csv").write_text("image,caption,split\nx.jpg,a thing,test\n")
    ds = load_dataset(DataConfig(dataset="custom", data_dir=str(tmp_path)))
    assert pairs(ds) == {"x.jpg": (["a thing"], "test")}


# ---------------------------------------------------------------------------
# Image checks and conversion


def odd_images(folder: Path) -> dict[str, Path]:
    """Grayscale, RGBA, CMYK, 16-bit PNG, palette with transparency, large JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    out["gray"] = folder / "gray.png"
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), mode="L").save(out["gray"])
    out["rgba"] = folder / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), mode="RGBA").save(out["rgba"])
    out["cmyk"] = folder / "cmyk.jpg"
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(out["cmyk"])
    out["png16"] = folder / "sixteen.png"
    Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16)).save(out["png16"])
    out["palette"] = folder / "palette.png"
    palette = Image.new("P", (30, 20), 0)
    palette.putpalette([200, 0, 0, 0, 0, 255])
    palette.putpixel((1, 1), 1)
    palette.save(out["palette"], transparency=0)  # palette entry 0 is transparent
    out["large"] = folder / "large.jpg"
    Image.new("RGB", (9000, 6000), (10, 200, 30)).save(out["large"], quality=50)
    return out


def test_open_rgb_converts_every_mode_to_rgb_uint8(tmp_path):
    files = odd_images(tmp_path)
    for kind, path in files.items():
        img, mode = open_rgb(path, max_side=2048)
        assert img.mode == "RGB", kind
        arr = load_rgb(path, size=(16, 12))
        assert arr.dtype == np.uint8 and arr.shape == (12, 16, 3), kind
    assert max(open_rgb(files["large"], max_side=2048)[0].size) <= 2048
    assert open_rgb(files["png16"])[1].startswith("I")
    assert load_rgb(files["png16"]).max() > 200  # 16-bit range scaled, not clipped to black/white
    assert tuple(load_rgb(files["palette"])[0, 0]) == (255, 255, 255)  # transparent -> white
    assert tuple(load_rgb(files["palette"])[1, 1]) == (0, 0, 255)
    assert tuple(load_rgb(files["cmyk"])[0, 0])[0] > 200  # C=0,M=255,Y=255 is red


def test_check_images_keeps_odd_modes_and_lists_bad_files(tmp_path):
    files = odd_images(tmp_path)
    bad = make_bad_images(tmp_path)
    records = [ImageRecord(p.stem, str(p), ["c"], "train") for p in files.values()]
    records += [ImageRecord(n, str(tmp_path / n), ["c"], "train") for n in bad]
    report = SkipReport()
    kept = check_images(records, report, workers=2)
    assert [r.image_id for r in kept] == [p.stem for p in files.values()]
    assert sorted(Path(s["path"]).name for s in report.skipped_images) == sorted(bad)
    modes = {Path(c["path"]).stem: c["from_mode"] for c in report.converted_images}
    assert modes["gray"] == "L" and modes["rgba"] == "RGBA" and modes["cmyk"] == "CMYK" and modes["palette"] == "P"
    assert modes["sixteen"].startswith("I") and "large" not in modes
