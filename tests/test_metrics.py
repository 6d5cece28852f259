"""Caption metrics on hand-made examples with known answers."""

import pytest

from caption_tf.evaluation.metrics import BLEU_WEIGHTS, corpus_bleu_scores


def test_bleu_identical_captions_score_one():
    refs = [["a small red circle above a large blue square", "a red circle"], ["there is a green triangle"]]
    hyps = ["a small red circle above a large blue square", "there is a green triangle"]
    scores = corpus_bleu_scores(refs, hyps)
    assert set(scores) == set(BLEU_WEIGHTS)
    for name, value in scores.items():
        assert value == pytest.approx(1.0), name


def test_bleu_disjoint_captions_score_zero():
    scores = corpus_bleu_scores([["a red circle"], ["a blue square"]], ["two green triangles", "yellow shapes here"])
    assert all(v == 0.0 for v in scores.values())


def test_bleu_is_case_and_punctuation_insensitive_and_partial_match_is_between():
    scores = corpus_bleu_scores([["a red circle above a blue square"]], ["A red circle, above a GREEN square."])
    assert 0.0 < scores["bleu4"] < scores["bleu1"] < 1.0
    assert scores["bleu1"] == pytest.approx(6 / 7)


def test_bleu_empty_hypotheses_do_not_crash():
    assert corpus_bleu_scores([["a red circle"]], [""])["bleu4"] == 0.0
    mixed = corpus_bleu_scores([["a red circle"], ["a blue square"]], ["", "a blue square"])
    assert 0.0 < mixed["bleu1"] < 1.0  # the empty caption costs brevity penalty
    with pytest.raises(ValueError, match="2 reference lists but 1 hypotheses"):
        corpus_bleu_scores([["a"], ["b"]], ["a"])
