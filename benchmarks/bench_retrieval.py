"""Retrieval scoring speed: (image, caption) pairs scored per second, before and after issue 14.

- before: the scorer up to commit 8e55294 (kept below, verbatim in substance): every pair is a
  full teacher-forced `model((grid, tokens))` call (the grid encoded again for each pair, every
  caption padded to max_length), in blocks of up to 2^25 floats per tensor.
- after: `caption_tf.evaluation.retrieval.PairScorer`: each image encoded once, the pool's captions
  merged into a prefix tree decoded depth by depth (`model.step`), 16 MB tensors.

The decoder has the minimal preset's size (LSTM + Bahdanau, 64 / 128 units) with a 3,000-word
softmax (the minimal preset's cap, which Flickr8k reaches) over a MobileNetV3Small grid (7x7x576),
random weights (speed does not depend on them). Captions are the real ones of the Flickr8k sample
(their shared prefixes are what the tree exploits). Both scorers run interleaved, `--repeats`
times; the median is reported, with the load average of the machine.

Example:

    python benchmarks/bench_retrieval.py --images 50 --captions 250 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from common import ROOT, report  # noqa: F401  (puts the repository on sys.path)

SAMPLE = ROOT.parent / "shared" / "data" / "flickr8k_sample" / "Flickr8k.token.txt"


def before_pair_scores(generator, grids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The retrieval scorer of commit 8e55294 (`retrieval.pair_scores`)."""
    floats_per_call, max_pairs_per_call = 2**25, 4096
    images, captions = len(grids), len(tokens)
    vocab = int(generator.model.vocab_size)
    per_pair = max(tokens.shape[1] * vocab, int(np.prod(grids.shape[1:])))
    pairs = max(1, min(max_pairs_per_call, floats_per_call // per_pair))
    caption_chunk = min(captions, pairs)
    image_chunk = max(1, pairs // caption_chunk)
    scores = np.zeros((images, captions), np.float32)
    for c0 in range(0, captions, caption_chunk):
        block = tokens[c0 : c0 + caption_chunk]
        for i0 in range(0, images, image_chunk):
            grid = grids[i0 : i0 + image_chunk]
            total, count = generator.log_likelihood(np.repeat(grid, len(block), axis=0), np.tile(block, (len(grid), 1)))
            scores[i0 : i0 + len(grid), c0 : c0 + len(block)] = (total.numpy() / np.maximum(count.numpy(), 1)).reshape(len(grid), len(block))
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50, help="images in the pool")
    parser.add_argument("--captions", type=int, default=250, help="captions in the pool (real Flickr8k sample captions)")
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import keras

    from caption_tf.config import ModelConfig, TextConfig
    from caption_tf.data.text import CaptionVocabulary
    from caption_tf.evaluation.retrieval import CaptionTrie, PairScorer
    from caption_tf.models.decoder import build_decoder
    from caption_tf.models.decoding import CaptionGenerator

    captions = [line.split("\t", 1)[1].strip() for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    vocab = CaptionVocabulary.build(captions, TextConfig(vocab_size=args.vocab, max_length=15))
    tokens = vocab.encode(captions[: args.captions])
    keras.utils.set_random_seed(0)
    model = build_decoder(ModelConfig(embedding_dim=64, units=128), args.vocab, (49, 576), 15)
    generator = CaptionGenerator(model, vocab.start_id, vocab.end_id, 15)
    grids = np.random.default_rng(0).standard_normal((args.images, 49, 576)).astype(np.float16)
    scorer = PairScorer(model)
    scorers = {"before (8e55294)": lambda: before_pair_scores(generator, grids, tokens), "after (PairScorer)": lambda: scorer.scores(grids, tokens)}
    # Warm-up (tracing) and a check that both compute the same scores.
    difference = float(np.abs(before_pair_scores(generator, grids[:2], tokens) - scorer.scores(grids[:2], tokens)).max())
    seconds = {name: [] for name in scorers}
    loads = []
    for _ in range(args.repeats):
        for name, fn in scorers.items():
            loads.append(os.getloadavg()[0])
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
    pairs = args.images * len(tokens)
    trie = CaptionTrie.build(tokens)
    rows = [
        {"scorer": name, "pairs": pairs, "median_s": round(float(np.median(s)), 2),
         "pairs_per_s": round(pairs / float(np.median(s))), "runs_s": [round(x, 2) for x in s]}
        for name, s in seconds.items()
    ]
    print(f"pool {args.images} images x {len(tokens)} captions, vocabulary {args.vocab}; prefix tree: {trie.nodes} decoder steps "
          f"per image instead of {len(tokens) * (tokens.shape[1] - 1)}; max score difference {difference:.1e}; "
          f"load average during the runs {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")
    report("retrieval", rows)


if __name__ == "__main__":
    main()
