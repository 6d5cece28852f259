"""Caption metrics on hand-made examples with known answers."""

import sys

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


# ---- caption_metrics: BLEU, CIDEr-D, ROUGE-L, METEOR -------------------------------------------

from caption_tf.evaluation.metrics import caption_metrics, headline, java_available, tokenize_captions  # noqa: E402

REFS = {
    "img1": ["a small red circle above a large blue square", "a red circle is above a blue square"],
    "img2": ["a green triangle on the left", "there is a small green triangle"],
    "img3": ["two shapes a yellow square and a purple circle", "a yellow square and a purple circle"],
}


def test_caption_metrics_identical_captions_are_best():
    exact = {k: v[0] for k, v in REFS.items()}
    worse = {"img1": "a small red circle below a large green square", "img2": "a green square", "img3": "a purple circle"}
    m_exact = caption_metrics(REFS, exact, meteor=False, tokenizer="simple")
    m_worse = caption_metrics(REFS, worse, meteor=False, tokenizer="simple")
    assert m_exact["bleu4"] == pytest.approx(1.0)
    assert m_exact["rouge_l"] == pytest.approx(1.0)
    assert m_exact["cider"] > m_worse["cider"] > 0.0
    for k in REFS:
        assert m_exact["per_image"][k]["cider"] > m_worse["per_image"][k]["cider"]
        assert m_exact["per_image"][k]["bleu4"] == pytest.approx(1.0)
    # nltk and pycocoevalcap BLEU agree while every hypothesis has >= n tokens; nltk counts one
    # phantom n-gram for each shorter hypothesis (denominator max(1, 0)), so its BLEU-4 is lower here.
    for name in ("bleu1", "bleu2", "bleu3"):
        assert m_worse["bleu_coco"][name] == pytest.approx(m_worse[name], abs=1e-6)
    assert m_worse["bleu4"] < m_worse["bleu_coco"]["bleu4"]


def test_caption_metrics_disjoint_captions_score_zero():
    disjoint = {"img1": "dogs running fast", "img2": "people eating lunch outside", "img3": "snow"}
    m = caption_metrics(REFS, disjoint, meteor=False, tokenizer="simple")
    for name in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"):
        assert m[name] == 0.0, name


def test_rouge_l_matches_hand_computed_lcs():
    refs = {"x": ["a big red circle next to a square"], "y": ["something else entirely"]}
    hyps = {"x": "a red circle above a blue square", "y": "something else entirely"}
    # LCS("a red circle above a blue square", "a big red circle next to a square") = "a red circle a square".
    precision, recall, beta = 5 / 7, 5 / 8, 1.2
    expected = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    m = caption_metrics(refs, hyps, meteor=False, tokenizer="simple")
    assert m["per_image"]["x"]["rouge_l"] == pytest.approx(expected)
    assert m["rouge_l"] == pytest.approx((expected + 1.0) / 2)


def test_caption_metrics_reports_unavailable_metrics_and_bad_input():
    m = caption_metrics(REFS, {"img1": "", "img2": "a green triangle"}, meteor=False, tokenizer="simple")
    assert m["num_images"] == 2 and set(m["per_image"]) == {"img1", "img2"}
    assert m["per_image"]["img1"] == {"bleu4": 0.0, "cider": 0.0, "rouge_l": 0.0}
    assert m["spice"]["available"] is False and "CoreNLP" in m["spice"]["reason"]
    assert m["meteor"] == {"available": False, "reason": "not requested (meteor=False)"}
    assert headline(m)["meteor"] is None
    with pytest.raises(ValueError, match="no references"):
        caption_metrics(REFS, {"unknown": "a cat"}, meteor=False)
    with pytest.raises(ValueError, match="empty reference list"):
        caption_metrics({"a": []}, {"a": "a cat"}, meteor=False)


@pytest.mark.skipif(not java_available(), reason="java is not installed: PTB tokenizer and METEOR need it")
def test_ptb_tokenizer_and_meteor_with_java():
    tokenised, used = tokenize_captions({"a": ["A dog runs by the pool's edge, wearing a T-shirt."]}, "ptb")
    assert used == "ptb"
    assert tokenised["a"] == ["a dog runs by the pool 's edge wearing a t-shirt"]
    hyps = {"img1": REFS["img1"][0], "img2": "a purple square", "img3": REFS["img3"][1]}
    m = caption_metrics(REFS, hyps, meteor=True, tokenizer="ptb")
    assert m["tokenizer"] == "ptb"
    assert m["meteor"]["available"], m["meteor"]
    assert m["per_image"]["img1"]["meteor"] == pytest.approx(1.0)
    assert m["per_image"]["img2"]["meteor"] < 0.5
    assert 0.0 < m["meteor"]["score"] < 1.0
    assert headline(m)["meteor"] == m["meteor"]["score"]


# ---- semantic similarity (gensim) --------------------------------------------------------------

import numpy as np  # noqa: E402

from caption_tf.evaluation.semantic import (  # noqa: E402
    load_word_vectors,
    semantic_similarity,
    train_word_vectors,
    wmd_status,
    word_vectors_for,
)

# Hand-made 3-d vectors: colours along x, shapes along y, animals along z.
HAND_VECTORS = {
    "a": [0.1, 0.1, 0.1],
    "red": [1.0, 0.2, 0.0],
    "crimson": [0.9, 0.3, 0.0],
    "circle": [0.2, 1.0, 0.0],
    "ring": [0.3, 0.9, 0.1],
    "dog": [0.0, 0.0, 1.0],
    "barking": [0.0, 0.1, 0.9],
}


def _write_glove(path):
    path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in HAND_VECTORS.items()))
    return path


def test_word_vector_files_in_every_format_load_the_same_vectors(tmp_path):
    glove = load_word_vectors(_write_glove(tmp_path / "glove.txt"))
    np.testing.assert_allclose(glove["red"], HAND_VECTORS["red"], rtol=1e-6)
    glove.save_word2vec_format(str(tmp_path / "w2v.txt"), binary=False)
    glove.save_word2vec_format(str(tmp_path / "w2v.bin"), binary=True)
    glove.save(str(tmp_path / "vectors.kv"))
    for name in ("w2v.txt", "w2v.bin", "vectors.kv"):
        kv = load_word_vectors(tmp_path / name)
        assert kv.index_to_key == list(HAND_VECTORS), name
        np.testing.assert_allclose(kv["dog"], HAND_VECTORS["dog"], rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_word_vectors(tmp_path / "missing.txt")
    (tmp_path / "broken.txt").write_text("red 1.0 0.2\ncircle notanumber 1.0\n")
    with pytest.raises(ValueError, match="broken.txt"):
        load_word_vectors(tmp_path / "broken.txt")


def test_semantic_similarity_identical_similar_unrelated_and_oov(tmp_path):
    path = _write_glove(tmp_path / "glove.txt")
    kv, source = word_vectors_for(str(path), training_captions=[])
    assert str(path) in source and "7 words" in source
    refs = {"same": ["a red circle"], "similar": ["a red circle"], "unrelated": ["a red circle"]}
    hyps = {"same": "a red circle", "similar": "a crimson ring zzz", "unrelated": "a barking dog"}
    sim = semantic_similarity(refs, hyps, kv, source, wmd=True)
    per = sim["per_image"]
    assert per["same"]["cosine_max"] == pytest.approx(1.0)
    assert 1.0 > per["similar"]["cosine_max"] > per["unrelated"]["cosine_max"]
    assert sim["oov"]["oov_hypothesis"] == 1 and sim["oov"]["top"] == [("zzz", 1)]
    assert sim["oov"]["hypothesis_tokens"] == 10 and sim["oov"]["oov_reference"] == 0
    assert sim["cosine_max"] == pytest.approx(np.mean([p["cosine_max"] for p in per.values()]))
    # POT is a pinned requirement (requirements.txt): WMD must run.
    assert sim["wmd"]["available"], sim["wmd"].get("reason")
    assert per["same"]["wmd_min"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < per["similar"]["wmd_min"] < per["unrelated"]["wmd_min"]


def test_wmd_without_pot_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # `import ot` raises ImportError, as on a machine without POT
    status = wmd_status()
    assert status["available"] is False and "pip install POT" in status["reason"]
    kv, source = word_vectors_for(str(_write_glove(tmp_path / "glove.txt")), training_captions=[])
    sim = semantic_similarity({"a": ["a red circle"]}, {"a": "a red circle"}, kv, source, wmd=True)
    assert sim["wmd"]["available"] is False and "POT" in sim["wmd"]["reason"]
    assert sim["per_image"]["a"]["cosine_max"] == pytest.approx(1.0)  # the rest is still scored


def test_semantic_similarity_with_word2vec_trained_on_captions():
    captions = ["a small red circle above a large blue square", "there is a green triangle on the left"] * 15
    kv, source = word_vectors_for(None, captions)
    assert source == "word2vec trained on 30 training captions"
    np.testing.assert_array_equal(kv["circle"], train_word_vectors(captions)["circle"])  # deterministic
    refs = {"a": [captions[0], captions[1]], "b": [captions[1]]}
    sim = semantic_similarity(refs, {"a": captions[0], "b": "unicorn"}, kv, source, wmd=False)
    assert sim["per_image"]["a"]["cosine_max"] == pytest.approx(1.0, abs=1e-6)
    assert sim["per_image"]["a"]["cosine_mean"] < sim["per_image"]["a"]["cosine_max"]
    assert sim["per_image"]["b"]["cosine_max"] == 0.0 and sim["unscorable_images"] == 1
    assert sim["wmd"]["available"] is False


def test_default_tokenizer_splits_words_like_the_model_vocabulary():
    from caption_tf.data.text import clean_caption

    refs = {"a": ["A boy in a T-shirt plays by the pool's edge ."], "b": ["two dogs run on the grass"]}
    hyps = {k: clean_caption(v[0]) for k, v in refs.items()}  # what a perfect model would write
    m = caption_metrics(refs, hyps, meteor=False)
    assert m["tokenizer"] == "simple" and m["bleu4"] == pytest.approx(1.0)
    if java_available():
        assert caption_metrics(refs, hyps, meteor=False, tokenizer="ptb")["bleu4"] < 1.0
