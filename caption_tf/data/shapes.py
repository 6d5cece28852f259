"""The embedded default dataset: synthetic scenes of coloured shapes with captions.

Each scene holds 1..max_objects shapes (circle, square, triangle) in one of
five colours and two sizes, placed without overlap on a tinted background.
Five varied reference captions name every object and, for scenes with more
than one object, a spatial relation ("a small red circle to the left of a
large blue square"). Ground-truth boxes are kept so attention can be scored
against them. Everything derives from a seed, so the dataset is identical on
every machine; it is generated once and cached on disk.

It is a real learning task: captions depend on colour, shape, size, count
and relative position of the objects, none of which a language model alone
can guess.

Example:

```python
ds = load_shapes(DataConfig(num_images=20, data_root="/tmp/shapes"))
ds.records[0].captions[0]
```
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from caption_tf.config import DataConfig
from caption_tf.data.records import CaptionDataset, ImageRecord, SceneObject, assign_splits
from caption_tf.files import build_lock, write_json

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
}
SIZES = {"small": (0.16, 0.22), "large": (0.30, 0.38)}  # side as a fraction of the scene
RELATIONS = ("to the left of", "to the right of", "above", "below")
FORMAT_VERSION = 1
_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b`, along the axis of larger separation."""
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


def _phrase(obj: SceneObject, with_size: bool = True) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}" if with_size else f"a {obj.colour} {obj.shape}"


def _listing(objs: list[SceneObject], with_size: bool) -> str:
    phrases = [_phrase(o, with_size) for o in objs]
    return phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]


def _where(obj: SceneObject) -> str:
    cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
    if abs(cx - 0.5) >= abs(cy - 0.5):
        return "on the left" if cx < 0.5 else "on the right"
    return "at the top" if cy < 0.5 else "at the bottom"


def make_captions(objs: list[SceneObject], rng: np.random.Generator) -> list[str]:
    """Five varied captions naming every object (objects sorted left to right)."""
    a = objs[0]
    if len(objs) == 1:
        caps = [
            _phrase(a),
            f"{_phrase(a)} {_where(a)}",
            f"there is {_phrase(a)}",
            f"{_phrase(a, False)} on a plain background",
            f"one {a.size} {a.colour} {a.shape}",
        ]
    elif len(objs) == 2:
        b = objs[1]
        ab, ba = relation(a, b), relation(b, a)
        caps = [
            f"{_phrase(a)} {ab} {_phrase(b)}",
            f"{_phrase(b)} {ba} {_phrase(a)}",
            f"there is {_phrase(a)} and {_phrase(b)}",
            f"{_phrase(a, False)} is {ab} {_phrase(b, False)}",
            f"two shapes {_phrase(a, False)} and {_phrase(b, False)}",
        ]
    else:
        b, c = objs[1], objs[2]
        caps = [
            f"{_phrase(a, False)} {relation(a, b)} {_phrase(b, False)} and {_phrase(c, False)}",
            f"{_listing(objs, False)}",
            f"three shapes {_listing(objs, False)}",
            f"{_phrase(c, False)} {relation(c, b)} {_phrase(b, False)} and {_phrase(a, False)}",
            f"there is {_listing(objs, False)}",
        ]
    order = rng.permutation(len(caps))  # vary which template comes first
    return [caps[i] for i in order]


def _sample_objects(rng: np.random.Generator, max_objects: int) -> list[SceneObject]:
    count = int(rng.integers(1, max_objects + 1))
    objs: list[SceneObject] = []
    attempts = 0
    while len(objs) < count and attempts < 200:
        attempts += 1
        size = str(rng.choice(list(SIZES)))
        side = float(rng.uniform(*SIZES[size]))
        x0, y0 = rng.uniform(0.02, 0.98 - side, size=2)
        box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
        margin = 0.03
        if any(
            box[0] < o.box[2] + margin and o.box[0] < box[2] + margin and box[1] < o.box[3] + margin and o.box[1] < box[3] + margin
            for o in objs
        ):
            continue
        # Distinct (colour, shape) pairs keep every caption unambiguous.
        taken = {(o.colour, o.shape) for o in objs}
        while True:
            colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
            if (colour, shape) not in taken:
                break
        objs.append(SceneObject(shape=shape, colour=colour, size=size, box=box))
    return sorted(objs, key=lambda o: (o.box[0] + o.box[2]) / 2)


def render_scene(objs: list[SceneObject], size: int, rng: np.random.Generator) -> Image.Image:
    big = size * _SUPERSAMPLE
    tint = tuple(int(v) for v in rng.integers(200, 250, size=3))
    img = Image.new("RGB", (big, big), tint)
    draw = ImageDraw.Draw(img)
    for o in objs:
        x0, y0, x1, y1 = (v * big for v in o.box)
        jitter = rng.integers(-15, 16, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[o.colour], jitter))
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    # Mild pixel noise so the task is not a lookup on exact colours.
    arr = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.int16)
    arr = arr + rng.integers(-8, 9, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def shapes_dir(cfg: DataConfig) -> Path:
    root = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.data_root)
    name = f"shapes-v{FORMAT_VERSION}-seed{cfg.data_seed}-n{cfg.num_images}-px{cfg.scene_size}-obj{cfg.max_objects}"
    return root / name


def generate_shapes(cfg: DataConfig, out_dir: Path) -> None:
    """Render all scenes and write annotations.json last (its presence marks completion)."""
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(cfg.num_images, cfg.val_fraction, cfg.test_fraction, cfg.data_seed)
    entries = []
    for i in range(cfg.num_images):
        rng = np.random.default_rng([cfg.data_seed, i])
        objs = _sample_objects(rng, cfg.max_objects)
        image_id = f"shapes_{i:06d}"
        render_scene(objs, cfg.scene_size, rng).save(images / f"{image_id}.png")
        entries.append(
            {
                "image_id": image_id,
                "file": f"images/{image_id}.png",
                "split": splits[i],
                "captions": make_captions(objs, rng),
                "objects": [o.__dict__ for o in objs],
            }
        )
    write_json(out_dir / "annotations.json", {"format_version": FORMAT_VERSION, "images": entries}, indent=None)


def load_shapes(cfg: DataConfig) -> CaptionDataset:
    out_dir = shapes_dir(cfg)
    ann = out_dir / "annotations.json"
    if not ann.exists():
        with build_lock(out_dir):  # several workers on one filesystem: one generates, the others wait
            if not ann.exists():
                print(f"Generating the shapes dataset ({cfg.num_images} scenes) in {out_dir} ...", flush=True)
                generate_shapes(cfg, out_dir)
    with open(ann) as fh:
        entries = json.load(fh)["images"]
    records = [
        ImageRecord(
            image_id=e["image_id"],
            path=str((out_dir / e["file"]).resolve()),
            captions=e["captions"],
            split=e["split"],
            objects=[SceneObject(**{**o, "box": tuple(o["box"])}) for o in e["objects"]],
        )
        for e in entries
    ]
    return CaptionDataset("shapes", records)
