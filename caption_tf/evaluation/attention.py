"""Attention localisation: does the decoder look at the object it is naming?

The attention of one decoding step is a distribution over the `h x w` cells of
the backbone's feature grid (square, row-major, cell (0, 0) at the top left).
For a box (x0, y0, x1, y1) in [0, 1] image coordinates, a cell's attention mass
counts by the fraction of the cell's area that lies inside the box, so the
score of a step is the share of its attention mass inside the box. Uniform
attention scores exactly the box area, the baseline a model must beat.

On the shapes dataset (ground-truth boxes), every generated colour, shape or
size word is tied to the object it names: the words of one mention
("a small red circle") name the scene object with those attributes.

Example:

>>> weights = np.zeros(4); weights[0] = 1.0              # 2x2 grid, all on the top-left cell
>>> mass_in_box(weights, (0.0, 0.0, 0.5, 0.5))
1.0
>>> mass_in_box(np.full(4, 0.25), (0.0, 0.0, 0.5, 0.5))  # uniform: the box area
0.25
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np

from caption_tf.data.records import SceneObject
from caption_tf.data.shapes import COLOURS, SHAPES, SIZES
from caption_tf.figures import upsample  # noqa: F401 - re-exported, overlays are drawn in figures
from caption_tf.models.grid import grid_side

WORD_TYPES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}
_TYPE_OF_WORD = {word: kind for kind, words in WORD_TYPES.items() for word in words}


def cell_coverage(h: int, w: int, box: Sequence[float]) -> np.ndarray:
    """Fraction of each cell's area inside `box`, as a flat row-major [h*w] array.

    Example:

    >>> cell_coverage(2, 2, (0.0, 0.0, 0.75, 0.5)).tolist()
    [1.0, 0.5, 0.0, 0.0]
    """
    x0, y0, x1, y1 = (float(np.clip(v, 0.0, 1.0)) for v in box)
    edges_x, edges_y = np.linspace(0.0, 1.0, w + 1), np.linspace(0.0, 1.0, h + 1)
    # Overlap of each cell interval with the box interval, relative to the cell size.
    cover_x = np.clip(np.minimum(edges_x[1:], x1) - np.maximum(edges_x[:-1], x0), 0.0, None) * w
    cover_y = np.clip(np.minimum(edges_y[1:], y1) - np.maximum(edges_y[:-1], y0), 0.0, None) * h
    return np.outer(cover_y, cover_x).reshape(-1)


def box_area(box: Sequence[float]) -> float:
    """Area of a box clipped to the unit square: the score of uniform attention.

    Example:

    >>> box_area((0.0, 0.0, 0.5, 0.5))
    0.25
    """
    x0, y0, x1, y1 = (float(np.clip(v, 0.0, 1.0)) for v in box)
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def mass_in_box(weights: np.ndarray, box: Sequence[float]) -> float:
    """Share of one step's attention mass [cells] inside `box` (see module docstring).

    Example:

    >>> mass_in_box(np.array([0.5, 0.5, 0.0, 0.0]), (0.0, 0.0, 1.0, 0.5))
    1.0
    """
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    h, w = grid_side(weights.size)
    total = weights.sum()
    if total <= 0:
        raise ValueError("attention weights sum to zero")
    return float(np.dot(weights, cell_coverage(h, w, box)) / total)


def word_type(word: str) -> Optional[str]:
    """"colour", "shape", "size" or None for other words.

    Example:

    >>> word_type("red"), word_type("above")
    ('colour', None)
    """
    return _TYPE_OF_WORD.get(word)


def mentions(words: Sequence[str]) -> list[list[int]]:
    """Positions of the words of each object mention: maximal runs of [size] [colour] [shape].

    Example:

    >>> mentions("a small red circle above a blue square".split())
    [[1, 2, 3], [6, 7]]
    """
    order = {"size": 0, "colour": 1, "shape": 2}
    groups: list[list[int]] = []
    last_rank = None
    for i, word in enumerate(words):
        kind = word_type(word)
        if kind is None:
            last_rank = None
            continue
        rank = order[kind]
        if last_rank is None or rank <= last_rank:  # a new mention starts
            groups.append([])
        groups[-1].append(i)
        last_rank = rank
    return groups


def named_object(words: Sequence[str], group: list[int], position: int, objects: Sequence[SceneObject]) -> Optional[SceneObject]:
    """The scene object a mention names, judged from its words; None when ambiguous or absent.

    All attributes of the mention must match; failing that, the attribute of the
    word at `position` alone must pick out a single object.

    Example:

    >>> objs = [SceneObject("circle", "red", "small", (0, 0, .2, .2)), SceneObject("square", "blue", "large", (.5, .5, 1, 1))]
    >>> named_object(["a", "blue", "square"], [1, 2], 1, objs).shape
    'square'
    """
    said = {word_type(words[i]): words[i] for i in group}
    full = [o for o in objects if all(getattr(o, kind) == word for kind, word in said.items())]
    if len(full) == 1:
        return full[0]
    kind = word_type(words[position])
    alone = [o for o in objects if getattr(o, kind) == words[position]]
    return alone[0] if len(alone) == 1 else None


def localisation(
    captions: Sequence[Sequence[str]], attention: np.ndarray, objects: Sequence[Sequence[SceneObject]]
) -> dict:
    """Attention mass inside the named object's box, per word type and per word.

    `captions[i]` are the generated words of image i in step order (word t was
    produced at step t), `attention[i][t]` the weights of that step (an array
    [images, steps, cells], or one [steps, cells] array per image), `objects[i]`
    the scene's ground truth. Returns {"by_type": {type: {"count", "mass_in_box",
    "uniform_baseline", "ratio"}}, "by_word": {...same...}, "unresolved": n words
    naming no (unique) object, "words_scored": n}.

    Example:

    >>> objs = [[SceneObject("circle", "red", "small", (0.0, 0.0, 0.5, 0.5))]]
    >>> att = np.zeros((1, 2, 4)); att[0, :, 0] = 1.0
    >>> localisation([["red", "circle"]], att, objs)["by_type"]["colour"]["mass_in_box"]
    1.0
    """
    scored: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    by_word: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    unresolved = 0
    for i, words in enumerate(captions):
        for group in mentions(words):
            for t in group:
                target = named_object(words, group, t, objects[i])
                if target is None:
                    unresolved += 1
                    continue
                pair = (mass_in_box(attention[i][t], target.box), box_area(target.box))
                scored[word_type(words[t])].append(pair)
                by_word[words[t]].append(pair)
    return {
        "by_type": {kind: _summary(scored[kind]) for kind in WORD_TYPES if scored[kind]},
        "by_word": {word: _summary(pairs) for word, pairs in sorted(by_word.items())},
        "unresolved": unresolved,
        "words_scored": sum(len(v) for v in scored.values()),
    }


def localisation_by_head(captions: Sequence[Sequence[str]], maps: Sequence[np.ndarray], objects: Sequence[Sequence[SceneObject]]) -> list[dict]:
    """`localisation` of each attention head: [{"layer", "head", "colour", "shape", "size"}], mass in box per word type.

    `maps[i]` is image i's [layers, heads, steps, cells] (a Transformer's cross-attention,
    `TransformerCaptionDecoder.cross_attention_by_head`). Mass in box is linear in the map,
    so the mean of a layer's heads is the score of the layer's head-averaged map.

    Example:

    >>> objs = [[SceneObject("circle", "red", "small", (0.0, 0.0, 0.5, 0.5))]]
    >>> maps = np.zeros((1, 1, 2, 1, 4)); maps[0, 0, 0, 0, 0] = 1.0; maps[0, 0, 1, 0, 3] = 1.0
    >>> localisation_by_head([["red"]], maps, objs)
    [{'layer': 0, 'head': 0, 'colour': 1.0}, {'layer': 0, 'head': 1, 'colour': 0.0}]
    """
    layers, heads = np.shape(maps[0])[:2]
    rows = []
    for layer in range(layers):
        for head in range(heads):
            by_type = localisation(captions, [m[layer, head] for m in maps], objects)["by_type"]
            rows.append({"layer": layer, "head": head, **{kind: v["mass_in_box"] for kind, v in by_type.items()}})
    return rows


def _summary(pairs: list[tuple[float, float]]) -> dict:
    mass, base = (float(np.mean(v)) for v in zip(*pairs))
    return {"count": len(pairs), "mass_in_box": mass, "uniform_baseline": base, "ratio": mass / base if base > 0 else None}
