import os

import numpy as np
from PIL import Image

from caption_tf.config import DataConfig
from caption_tf.data.datasets import load_dataset
from caption_tf.data.shapes import COLOURS, SHAPES, SIZES, load_shapes, relation


def _cfg(tmp_path, **kw):
    return DataConfig(**{"data_root": str(tmp_path), "num_images": 30, "scene_size": 64, **kw})


def test_generation_is_deterministic(tmp_path):
    a = load_shapes(_cfg(tmp_path / "a"))
    b = load_shapes(_cfg(tmp_path / "b"))
    assert [r.captions for r in a.records] == [r.captions for r in b.records]
    assert [r.split for r in a.records] == [r.split for r in b.records]
    for ra, rb in zip(a.records[:5], b.records[:5]):
        assert np.array_equal(np.asarray(Image.open(ra.path)), np.asarray(Image.open(rb.path)))
    c = load_shapes(_cfg(tmp_path / "c", data_seed=99))
    assert [r.captions for r in a.records] != [r.captions for r in c.records]


def test_second_load_reuses_the_files(tmp_path):
    cfg = _cfg(tmp_path)
    first = load_shapes(cfg)
    stamp = {r.path: os.stat(r.path).st_mtime_ns for r in first.records}
    second = load_shapes(cfg)
    assert {r.path: os.stat(r.path).st_mtime_ns for r in second.records} == stamp


def test_captions_name_every_object_and_the_relation(tmp_path):
    ds = load_dataset(_cfg(tmp_path, num_images=60))
    assert {r.split for r in ds.records} == {"train", "val", "test"}
    counts = {len(r.objects) for r in ds.records}
    assert counts == {1, 2, 3}
    for r in ds.records:
        assert len(r.captions) == 5 and len(set(r.captions)) >= 4  # varied references
        for obj in r.objects:
            assert obj.colour in COLOURS and obj.shape in SHAPES and obj.size in SIZES
            assert 0 <= obj.box[0] < obj.box[2] <= 1 and 0 <= obj.box[1] < obj.box[3] <= 1
            phrase = f"{obj.colour} {obj.shape}"
            assert sum(phrase in c for c in r.captions) == 5, (phrase, r.captions)
        if len(r.objects) == 2:
            a, b = r.objects
            assert any(f"{a.colour} {a.shape} {relation(a, b)} a" in c or f"{relation(a, b)} a {b.size} {b.colour}" in c
                       for c in r.captions)


def test_scenes_show_the_objects_in_their_colours(tmp_path):
    ds = load_shapes(_cfg(tmp_path))
    for r in ds.records[:10]:
        pixels = np.asarray(Image.open(r.path).convert("RGB"), dtype=float)
        h, w, _ = pixels.shape
        for obj in r.objects:
            x0, y0, x1, y1 = obj.box
            cx, cy = int((x0 + x1) / 2 * w), int((y0 + y1) / 2 * h) + (2 if obj.shape == "triangle" else 0)
            centre = pixels[cy, cx]
            nearest = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - centre).sum())
            assert nearest == obj.colour


def test_relation_is_geometric():
    from caption_tf.data.records import SceneObject

    left = SceneObject("circle", "red", "small", (0.0, 0.4, 0.2, 0.6))
    right = SceneObject("square", "blue", "small", (0.7, 0.4, 0.9, 0.6))
    top = SceneObject("square", "blue", "small", (0.05, 0.0, 0.15, 0.1))
    assert relation(left, right) == "to the left of" and relation(right, left) == "to the right of"
    assert relation(top, left) == "above" and relation(left, top) == "below"
