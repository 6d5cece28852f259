"""Attention localisation on hand-made attention maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from caption_tf.data.records import SceneObject
from caption_tf.evaluation.attention import (
    box_area,
    cell_coverage,
    grid_side,
    localisation,
    mass_in_box,
    mentions,
    named_object,
    upsample,
)

RED_CIRCLE = SceneObject("circle", "red", "small", (0.0, 0.0, 0.5, 0.5))  # top-left quarter
BLUE_SQUARE = SceneObject("square", "blue", "large", (0.5, 0.5, 1.0, 1.0))  # bottom-right quarter


def test_all_mass_inside_the_box_scores_one():
    weights = np.zeros(16)
    weights[[0, 1, 4, 5]] = 0.25  # 4x4 grid: the four top-left cells = box (0, 0, .5, .5)
    assert mass_in_box(weights, RED_CIRCLE.box) == pytest.approx(1.0)
    assert mass_in_box(weights, BLUE_SQUARE.box) == pytest.approx(0.0)


@pytest.mark.parametrize("box", [(0.0, 0.0, 0.5, 0.5), (0.1, 0.2, 0.7, 0.45), (0.33, 0.0, 1.0, 1.0), (0.2, 0.2, 0.21, 0.9)])
@pytest.mark.parametrize("cells", [1, 4, 25, 64])
def test_uniform_attention_scores_the_box_area(box, cells):
    assert mass_in_box(np.full(cells, 1.0 / cells), box) == pytest.approx(box_area(box))


def test_partial_cells_count_by_their_area_inside_the_box():
    # 2x2 grid, box covers the whole top-left cell and half of the top-right one.
    assert cell_coverage(2, 2, (0.0, 0.0, 0.75, 0.5)).tolist() == [1.0, 0.5, 0.0, 0.0]
    assert mass_in_box(np.array([0.0, 1.0, 0.0, 0.0]), (0.0, 0.0, 0.75, 0.5)) == pytest.approx(0.5)
    # Boxes reaching outside the image are clipped to it.
    assert box_area((-0.5, -0.5, 0.5, 0.5)) == pytest.approx(0.25)


def test_non_square_grids_and_empty_attention_are_rejected():
    with pytest.raises(ValueError, match="square"):
        grid_side(12)
    with pytest.raises(ValueError, match="zero"):
        mass_in_box(np.zeros(4), RED_CIRCLE.box)


def test_mentions_and_named_objects():
    words = "a small red circle to the left of a blue square".split()
    assert mentions(words) == [[1, 2, 3], [9, 10]]
    assert named_object(words, [9, 10], 9, [RED_CIRCLE, BLUE_SQUARE]) is BLUE_SQUARE
    # A wrong shape still resolves through the word's own attribute when unique ...
    wrong = "a red square".split()
    assert named_object(wrong, [1, 2], 1, [RED_CIRCLE, BLUE_SQUARE]) is RED_CIRCLE
    # ... and a word naming no object in the scene resolves to nothing.
    assert named_object("a green triangle".split(), [1, 2], 2, [RED_CIRCLE, BLUE_SQUARE]) is None


def test_localisation_per_word_type_with_baseline():
    words = [["a", "red", "circle", "above", "a", "large", "blue", "square"]]
    attention = np.zeros((1, len(words[0]), 4))  # 2x2 grid
    attention[0, :, :] = 0.25  # uniform for the non-object words
    attention[0, 1, 0] = attention[0, 2, 0] = 1.0  # red, circle: all on the top-left cell (the red circle)
    attention[0, 1, 1:] = attention[0, 2, 1:] = 0.0
    attention[0, 6] = [0.5, 0.0, 0.0, 0.5]  # blue: half on the blue square
    attention[0, 7] = [0.0, 0.0, 0.0, 1.0]  # square: all on it
    # "large": uniform -> the box area
    result = localisation(words, attention, [[RED_CIRCLE, BLUE_SQUARE]])
    assert result["by_type"]["colour"]["mass_in_box"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["by_type"]["shape"]["mass_in_box"] == pytest.approx(1.0)
    assert result["by_type"]["size"]["mass_in_box"] == pytest.approx(0.25)
    assert result["by_type"]["colour"]["uniform_baseline"] == pytest.approx(0.25)
    assert result["by_word"]["blue"] == {"count": 1, "mass_in_box": 0.5, "uniform_baseline": 0.25, "ratio": 2.0}
    assert result["words_scored"] == 5 and result["unresolved"] == 0


def test_upsample_keeps_the_layout():
    heat = upsample(np.array([1.0, 0.0, 0.0, 0.0]), (20, 20))
    assert heat.shape == (20, 20)
    assert heat[:5, :5].mean() > heat[15:, 15:].mean()
