"""Caption any image file with a trained run: its backbone, then its decoder.

Images of any size and mode (grayscale, RGBA, palette, 16-bit) are read with
`load_rgb`, resized to the run's backbone input size, and captioned with
greedy and beam search. Unreadable files are reported with the reason, not
fatal, so one bad file does not lose the others' captions.

Example:

>>> results = caption_images(load_run("runs/minimal-shapes"), ["a.jpg", "b.png"])
>>> results[0]["greedy"]
'a red circle above a blue square'
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from caption_tf.data.images import BadImageError, load_rgb


def step_words(vocab, tokens: np.ndarray) -> list[str]:
    """The generated words of one caption in step order, up to (not including) <end>.

    Unlike `vocab.decode`, keeps word t aligned with decoding step t.

    Example:

    >>> step_words(vocab, np.array([5, 9, 3, 0]))
    ['red', 'circle']
    """
    words = []
    for token in tokens:
        token = int(token)
        if token in (vocab.end_id, vocab.pad_id):
            break
        words.append(vocab.tokens[token] if token < len(vocab.tokens) else "[UNK]")
    return words


def caption_images(run, paths: Sequence[str | Path], beam_size: int | None = None, length_penalty: float | None = None, extractor=None) -> list[dict]:
    """Caption each file: [{"path", "greedy", "beam", "greedy_words", "attention", "image"} | {"path", "error"}].

    `attention` is the greedy decoder's [steps, cells] weights and `image` the
    RGB array the backbone saw (for attention overlays).
    """
    from caption_tf.features.backbones import build_extractor

    feat, cfg_eval = run.config.features, run.config.eval
    beam_size = beam_size or cfg_eval.beam_size
    length_penalty = cfg_eval.length_penalty if length_penalty is None else length_penalty
    extractor = extractor or build_extractor(feat.backbone, feat.weights, feat.input_size)
    size = extractor.input_size
    results, images, order = [], [], []
    for path in paths:
        try:
            images.append(load_rgb(path, size=(size, size)))
            order.append(len(results))
            results.append({"path": str(path)})
        except BadImageError as exc:
            results.append({"path": str(path), "error": str(exc)})
    if not images:
        return results
    grid, _ = extractor(np.stack(images), training=False)
    generator = run.generator()
    tokens, attention = generator.greedy(grid)
    beam_tokens, _, _ = generator.beam(grid, beam_size, length_penalty)
    tokens, attention, beam_tokens = tokens.numpy(), attention.numpy(), beam_tokens.numpy()
    for j, i in enumerate(order):
        words = step_words(run.vocab, tokens[j])
        results[i].update(
            greedy=" ".join(words),
            beam=run.vocab.decode(beam_tokens[j]),
            greedy_words=words,
            attention=attention[j, : len(words)],
            image=images[j],
        )
    return results
