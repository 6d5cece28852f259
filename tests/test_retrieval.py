"""Retrieval Recall@K on hand-made score matrices and on a tiny trained model."""

from __future__ import annotations

import numpy as np
import pytest

from caption_tf.evaluation.retrieval import CaptionTrie, chance_recall_at_k, pair_scores, recall_at_k, retrieval_pools, retrieval_scores


def test_recall_at_k_on_a_hand_made_matrix():
    # 3 images x 6 captions, captions 2i and 2i+1 belong to image i.
    positives = np.repeat(np.eye(3, dtype=bool), 2, axis=1)
    scores = np.array(
        [
            [0.9, 0.1, 0.8, 0.7, 0.2, 0.3],  # own caption ranked 1st -> hit at 1
            [0.9, 0.8, 0.1, 0.7, 0.2, 0.3],  # best own caption (0.7) behind 2 negatives -> hit at 3
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.4],  # best own (0.5) ties 4 negatives: behind them -> hit at 5
        ]
    )
    assert recall_at_k(scores, positives, ks=(1, 2, 3, 4, 5)) == {"R@1": 1 / 3, "R@2": 1 / 3, "R@3": 2 / 3, "R@4": 2 / 3, "R@5": 1.0}
    # Text -> image: each caption against the 3 images.
    t2i = recall_at_k(scores.T, positives.T, ks=(1, 2, 3))
    # Column-wise: caption 0 (image 0): 0.9 vs 0.9 tie -> rank 1; caption 1: 0.1 < 0.8, 0.5 -> rank 2;
    # caption 2 (image 1): 0.1 < 0.8, 0.5 -> rank 2; caption 3: 0.7 ties image 0 -> rank 1;
    # caption 4 (image 2): 0.5 > 0.2, 0.2 -> rank 0; caption 5: 0.4 > 0.3 -> rank 0.
    assert t2i == {"R@1": 2 / 6, "R@2": 4 / 6, "R@3": 1.0}
    with pytest.raises(ValueError, match="same 2-D shape"):
        recall_at_k(scores, positives[:, :5])
    with pytest.raises(ValueError, match="no positive"):
        recall_at_k(scores, np.zeros_like(positives))


def test_chance_baseline_matches_simulated_random_rankings():
    positives = np.repeat(np.eye(4, dtype=bool), 3, axis=1)  # 4 images, 3 captions each
    rng = np.random.default_rng(0)
    simulated = np.mean([recall_at_k(rng.random(positives.shape), positives, ks=(1, 5))["R@5"] for _ in range(3000)])
    exact = chance_recall_at_k(positives, ks=(1, 5))
    assert exact["R@1"] == pytest.approx(3 / 12)
    assert exact["R@5"] == pytest.approx(1 - (9 * 8 * 7 * 6 * 5) / (12 * 11 * 10 * 9 * 8))
    assert simulated == pytest.approx(exact["R@5"], abs=0.03)
    assert chance_recall_at_k(np.eye(3, dtype=bool), ks=(10,)) == {"R@10": 1.0}


def test_retrieval_on_a_tiny_trained_run(tiny_run):
    from caption_tf.evaluation.captioning import open_run_cache
    from caption_tf.run_folder import load_run

    _, run_dir = tiny_run
    run = load_run(run_dir)
    cache = open_run_cache(run)
    result = retrieval_scores(run, cache, "test", ks=(1, 5, 10))
    n_images = len(cache.image_ids("test"))
    assert result["images"] == n_images and result["captions"] >= n_images
    for direction in ("image_to_text", "text_to_image"):
        assert set(result[direction]) == {"R@1", "R@5", "R@10"}
        assert all(0.0 <= v <= 1.0 for v in result[direction].values())
        assert all(0.0 < v <= 1.0 for v in result["chance"][direction].values())
        values = list(result[direction].values())
        assert values == sorted(values)  # recall never drops as K grows

    # The batched score matrix equals per-pair teacher-forced log-likelihoods from the decoder itself.
    grids = cache.load_split("test")["grid"][:2]
    tokens = run.vocab.encode(["a red circle", "a blue square on the left"])
    matrix = pair_scores(run.model, grids, tokens)
    for i in range(2):
        for j in range(2):
            logits = run.model((grids[i : i + 1].astype("float32"), tokens[j : j + 1, :-1])).numpy()[0]
            targets = tokens[j, 1:]
            log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            real = targets != 0
            expected = log_probs[np.arange(len(targets)), targets][real].mean()
            assert matrix[i, j] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("decoder,attention", [("lstm", "bahdanau"), ("gru", "luong"), ("transformer", "bahdanau")])
def test_pair_scores_equal_teacher_forced_log_likelihoods_for_every_family(decoder, attention):
    """The prefix-tree scorer (one compiled function, open shapes) = `CaptionGenerator.log_likelihood` per pair."""
    import keras

    from caption_tf.config import ModelConfig
    from caption_tf.models.decoder import build_decoder
    from caption_tf.models.decoding import CaptionGenerator

    keras.utils.set_random_seed(3)
    cfg = ModelConfig(decoder=decoder, attention=attention, embedding_dim=16, units=24, num_layers=2, num_heads=2)
    model = build_decoder(cfg, vocab_size=20, grid_shape=(9, 8), max_length=6)
    grids = np.random.default_rng(0).normal(size=(3, 9, 8)).astype("float32")
    tokens = np.array([[2, 5, 6, 3, 0, 0], [2, 5, 7, 8, 9, 3], [2, 11, 3, 0, 0, 0]], "int32")  # shared prefix, full length
    matrix = pair_scores(model, grids, tokens)
    generator = CaptionGenerator(model, start_id=2, end_id=3, max_length=6)
    for i in range(len(grids)):
        total, count = generator.log_likelihood(np.repeat(grids[i : i + 1], len(tokens), 0), tokens)
        np.testing.assert_allclose(matrix[i], total.numpy() / count.numpy(), atol=1e-5)


def test_caption_trie_decodes_each_shared_prefix_once():
    # <start>=2, <end>=3: "a dog" / "a dog runs" / "a cat" / "a dog" again (a duplicate caption).
    tokens = np.array([[2, 5, 6, 3, 0], [2, 5, 6, 7, 3], [2, 5, 8, 3, 0], [2, 5, 6, 3, 0]])
    trie = CaptionTrie.build(tokens)
    # Depth d holds the distinct prefixes tokens[:d+1] of captions still going at step d.
    assert [t.tolist() for t in trie.node_tokens] == [[2], [5], [6, 8], [7]]
    assert [p.tolist() for p in trie.node_parents] == [[0], [0], [0, 0], [0]]
    assert trie.nodes == 5  # instead of 4 captions x 4 steps = 16 decoder steps (13 real tokens)
    assert trie.mask.sum(1).tolist() == [3, 4, 3, 3]
    # Each caption's path of (node, next token) edges spells the caption after <start>.
    edge_tokens = np.concatenate(trie.edge_tokens)
    for caption, path, mask in zip(tokens, trie.paths, trie.mask):
        assert edge_tokens[path[mask > 0]].tolist() == [t for t in caption[1:] if t]
    assert trie.paths[0].tolist()[:3] == trie.paths[3].tolist()[:3]  # identical captions share every edge
    with pytest.raises(ValueError, match="same <start>"):
        CaptionTrie.build(np.array([[2, 5, 3], [4, 5, 3]]))


def test_pools_split_the_images_evenly_and_all_means_one_pool():
    assert [len(p) for p in retrieval_pools(103, 50)] == [52, 51]
    assert [len(p) for p in retrieval_pools(1000, 50)] == [50] * 20
    assert [len(p) for p in retrieval_pools(30, 50)] == [30]  # a split smaller than a pool: the standard protocol
    assert [len(p) for p in retrieval_pools(103, None)] == [103]
    assert np.concatenate(retrieval_pools(103, 50)).tolist() == list(range(103))
    with pytest.raises(ValueError, match="at least 2"):
        retrieval_pools(10, 1)


def test_pooled_recall_is_the_query_weighted_mean_of_each_pools_recall(tiny_run):
    from caption_tf.data.datasets import load_dataset
    from caption_tf.evaluation.captioning import open_run_cache
    from caption_tf.run_folder import load_run

    _, run_dir = tiny_run
    run = load_run(run_dir)
    dataset = load_dataset(run.config.data)
    cache = open_run_cache(run, dataset)
    ids, records = cache.image_ids("test"), dataset.by_id()
    grids = cache.load_split("test")["grid"]
    assert len(ids) == 4

    def by_hand(pool):
        encoded = [run.vocab.encode(records[ids[i]].captions) for i in pool]
        owner = np.concatenate([np.full(len(e), j) for j, e in enumerate(encoded)])
        scores = pair_scores(run.model, grids[pool], np.concatenate(encoded))
        positives = np.arange(len(pool))[:, None] == owner[None, :]
        return recall_at_k(scores, positives, (1, 2)), recall_at_k(scores.T, positives.T, (1, 2)), len(owner)

    whole = retrieval_scores(run, cache, "test", ks=(1, 2), dataset=dataset, pool_images=None, progress=False)
    i2t, t2i, _ = by_hand(np.arange(4))
    assert whole["image_to_text"] == pytest.approx(i2t) and whole["text_to_image"] == pytest.approx(t2i)
    assert whole["pools"] == 1 and whole["protocol"].startswith("standard protocol")

    pooled = retrieval_scores(run, cache, "test", ks=(1, 2), dataset=dataset, pool_images=2, progress=False)
    (a_i2t, a_t2i, a_n), (b_i2t, b_t2i, b_n) = by_hand(np.arange(2)), by_hand(np.arange(2, 4))
    for k in ("R@1", "R@2"):
        assert pooled["image_to_text"][k] == pytest.approx((a_i2t[k] + b_i2t[k]) / 2)
        assert pooled["text_to_image"][k] == pytest.approx((a_t2i[k] * a_n + b_t2i[k] * b_n) / (a_n + b_n))
    assert pooled["pools"] == 2 and "2 pools of 2 consecutive images" in pooled["protocol"] and "--retrieval-pool all" in pooled["protocol"]
    assert pooled["pairs"] == 2 * a_n + 2 * b_n < whole["pairs"]
    assert pooled["chance"]["image_to_text"]["R@1"] > whole["chance"]["image_to_text"]["R@1"]  # smaller pools: easier
