"""Error analysis: score distributions, word errors, lengths, shapes object-level accuracy."""

import json

import numpy as np
import pytest

from caption_tf.config import DataConfig
from caption_tf.data.shapes import COLOURS, load_shapes, relation
from caption_tf.evaluation.errors import (
    NONE_LABEL,
    best_and_worst,
    confusion_matrix,
    error_analysis,
    length_stats,
    object_accuracy,
    objects_by_id,
    parse_shapes_caption,
    save_error_report,
    score_distribution,
    word_errors,
)
from caption_tf.evaluation.metrics import caption_metrics


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return load_shapes(DataConfig(num_images=30, data_root=str(tmp_path_factory.mktemp("shapes"))))


def _other_colour(colour):
    return next(c for c in COLOURS if c != colour)


def test_references_scored_as_hypotheses_are_fully_correct(shapes):
    objects = objects_by_id(shapes.records)
    assert len(objects) == 30
    for j in range(5):  # every caption template of the grammar parses back to the scene
        acc = object_accuracy(objects, {r.image_id: r.captions[j] for r in shapes.records})
        for name in ("object_accuracy", "colour_accuracy", "shape_accuracy", "size_accuracy", "object_precision",
                     "object_recall", "count_accuracy"):
            assert acc[name] == 1.0, (j, name)
        assert acc["relation_accuracy"] in (1.0, None)
        assert all(set(row) == {truth} for truth, row in acc["colour_confusion"].items())
    total_objects = sum(len(o) for o in objects.values())
    assert acc["matched_objects"] == total_objects
    assert sum(sum(row.values()) for row in acc["shape_confusion"].values()) == total_objects


def test_wrong_colour_lands_in_the_confusion_table(shapes):
    rec = next(r for r in shapes.records if len(r.objects) == 1)
    obj = rec.objects[0]
    wrong = _other_colour(obj.colour)
    acc = object_accuracy({rec.image_id: rec.objects}, {rec.image_id: f"a {obj.size} {wrong} {obj.shape}"})
    assert acc["colour_confusion"] == {obj.colour: {wrong: 1}}
    assert acc["shape_confusion"] == {obj.shape: {obj.shape: 1}}
    assert acc["colour_accuracy"] == 0.0 and acc["shape_accuracy"] == 1.0
    assert acc["object_precision"] == 0.0 and acc["object_recall"] == 0.0
    assert acc["count_accuracy"] == 1.0 and acc["object_accuracy"] == 0.0


def test_relation_and_count_are_checked_against_the_scene(shapes):
    rec = next(r for r in shapes.records if len(r.objects) == 2)
    a, b = rec.objects
    phrase = lambda o: f"a {o.colour} {o.shape}"  # noqa: E731
    true_rel = relation(a, b)
    flipped = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
    hyps = {
        "right": f"{phrase(a)} {true_rel} {phrase(b)}",
        "flipped": f"{phrase(a)} {flipped[true_rel]} {phrase(b)}",
        "one_missing": f"{phrase(a)}",
        "extra": f"three shapes {phrase(a)} , {phrase(b)} and a {_other_colour(a.colour)} {a.shape}",
    }
    acc = object_accuracy({k: rec.objects for k in hyps}, hyps)
    per = acc["per_image"]
    assert per["right"]["relation_ok"] is True and per["right"]["all_correct"]
    assert per["flipped"]["relation_ok"] is False and per["flipped"]["relation"] == flipped[true_rel]
    assert acc["relation_accuracy"] == 0.5 and acc["relations_stated"] == 2
    assert per["one_missing"]["count_ok"] is False and per["one_missing"]["found_objects"] == 1
    assert per["extra"]["count_ok"] is False and per["extra"]["correct_mentions"] == 2
    assert acc["count_accuracy"] == 0.5
    assert acc["object_recall"] == pytest.approx(7 / 8)  # 2 + 2 + 1 + 2 of 8 objects named
    assert acc["object_precision"] == pytest.approx(7 / 8)  # 2 + 2 + 1 + 2 of 8 mentions real


def test_parse_malformed_captions():
    p = parse_shapes_caption("a red to the left of circle circle")
    assert [(m.colour, m.shape) for m in p.mentions] == [("red", None), (None, "circle"), (None, "circle")]
    assert p.relation == "to the left of" and p.implied_count == 2  # repeated mention counts once
    assert parse_shapes_caption("one small green triangle on the left").stated_count == 1
    assert parse_shapes_caption("a red circle on the left").relation is None  # "on the left" is a place
    assert parse_shapes_caption("").mentions == []
    acc = object_accuracy({"x": []}, {"x": ""})
    assert acc["count_accuracy"] == 1.0 and acc["colour_accuracy"] is None
    with pytest.raises(ValueError, match="no ground-truth objects"):
        object_accuracy({}, {"x": "a red circle"})


def test_confusion_matrix_for_heatmaps():
    table = {"red": {"red": 3, "blue": 1}, "green": {NONE_LABEL: 2}}
    matrix, rows, cols = confusion_matrix(table, ["red", "green", "blue"])
    assert rows == ["red", "green", "blue"] and cols == ["red", "green", "blue", NONE_LABEL]
    assert matrix.tolist() == [[3, 0, 1, 0], [0, 0, 0, 2], [0, 0, 0, 0]]


def test_word_errors_on_a_hand_made_case():
    refs = {
        "a": ["a red circle above a blue square", "a red circle and a blue square", "a red circle over a square"],
        "b": ["a green triangle", "a small green triangle"],
    }
    hyps = {"a": "a red circle above a purple dog", "b": "a green purple triangle"}
    out = word_errors(refs, hyps)
    # purple: hallucinated in both images; dog: in a. "a" is a function word, never listed.
    assert out["hallucinated"] == [("purple", 2), ("dog", 1)]
    # square: in 3/3 refs of a; blue: 2/3 >= 0.6; "small" in 1/2 < 0.6 of b's refs.
    assert dict(out["missed"]) == {"square": 1, "blue": 1}
    assert out["images_with_hallucination"] == 2 and out["images_with_miss"] == 1
    assert dict(word_errors(refs, hyps, min_reference_fraction=0.5)["missed"]) == {"square": 1, "blue": 1, "small": 1}


def test_lengths_distribution_and_best_worst():
    refs = {"a": ["one two three", "one two three four five"], "b": ["x y"], "c": ["p q r s"]}
    hyps = {"a": "one two", "b": "x y z w", "c": "p q r s"}
    lengths = length_stats(refs, hyps)
    assert lengths["generated"]["mean"] == pytest.approx(10 / 3)
    assert lengths["reference"]["mean"] == pytest.approx(14 / 4)
    assert lengths["reference"]["percentiles"]["50"] == pytest.approx(3.5)
    assert lengths["generated_lengths"] == [2, 4, 4]
    per = {"a": {"cider": 0.5}, "b": {"cider": 0.1}, "c": {"cider": 2.0}}
    dist = score_distribution(per, "cider", bins=4)
    assert dist["mean"] == pytest.approx(2.6 / 3) and dist["max"] == 2.0
    assert sum(dist["histogram"]["counts"]) == 3 and len(dist["histogram"]["edges"]) == 5
    bw = best_and_worst(per, refs, hyps, "cider", k=2)
    assert [e["image_id"] for e in bw["worst"]] == ["b", "a"]
    assert [e["image_id"] for e in bw["best"]] == ["c", "a"]
    assert bw["worst"][0]["references"] == ["x y"] and bw["worst"][0]["generated"] == "x y z w"
    with pytest.raises(ValueError, match="bleu4"):
        score_distribution(per, "bleu4")


def test_error_analysis_end_to_end_on_shapes(shapes, tmp_path):
    test = shapes.records
    refs = {r.image_id: r.captions[1:] for r in test}
    hyps = {r.image_id: r.captions[0] for r in test}
    # Break one caption's colours to make sure the errors show up in every section.
    victim = next(r for r in test if len(r.objects) == 1)
    wrong = _other_colour(victim.objects[0].colour)
    hyps[victim.image_id] = f"a {wrong} {victim.objects[0].shape}"
    metrics = caption_metrics(refs, hyps, meteor=False, tokenizer="simple")
    report = error_analysis(refs, hyps, metrics["per_image"], objects_by_id(test), metric="cider", k=3)
    assert report["best_and_worst"]["worst"][0]["image_id"] == victim.image_id
    assert (wrong, 1) in report["words"]["hallucinated"]
    assert report["objects"]["colour_confusion"][victim.objects[0].colour][wrong] == 1
    assert report["objects"]["object_accuracy"] == pytest.approx(29 / 30)
    save_error_report(report, tmp_path / "errors.json")
    loaded = json.loads((tmp_path / "errors.json").read_text())
    assert loaded["objects"]["num_images"] == 30
    assert np.isclose(loaded["score_distribution"]["mean"], report["score_distribution"]["mean"])
