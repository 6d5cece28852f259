"""Semantic similarity of generated and reference captions with gensim word vectors.

A caption's vector is the mean of its in-vocabulary word vectors; an image's
similarity is the cosine between its generated caption's vector and each
reference's (reported as the max and the mean over references), averaged over
images. Word Mover's Distance (`KeyedVectors.wmdistance`, needs POT) is
reported beside it. Out-of-vocabulary words are ignored and counted.

Vectors come from a user file (`--word-vectors PATH`: GloVe text, word2vec
text/binary or a gensim `.kv`) or, without one, from a word2vec model trained
deterministically on the training captions.

Example:

>>> kv, source = word_vectors_for(None, ["a red circle", "a blue square"] * 20)
>>> sim = semantic_similarity({"a": ["a red circle"]}, {"a": "a red circle"}, kv, source)
>>> round(sim["cosine_max"], 6)
1.0
"""

from __future__ import annotations

import collections
import logging
import os
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
from gensim.models import KeyedVectors, Word2Vec
from tqdm.auto import tqdm

from caption_tf.evaluation.metrics import tokenize

# word2vec trained on the training captions when no vector file is given. workers=1 plus a
# process-independent hash (Python's str hash is salted per process) make it deterministic.
W2V_VECTOR_SIZE = 64
W2V_WINDOW = 5
W2V_MIN_COUNT = 1
W2V_EPOCHS = 40
W2V_SEED = 42
TOP_OOV_WORDS = 20
# Importing POT otherwise imports TensorFlow, torch and jax backends (seconds); WMD uses numpy.
_POT_BACKENDS_OFF = ("POT_BACKEND_DISABLE_PYTORCH", "POT_BACKEND_DISABLE_TENSORFLOW", "POT_BACKEND_DISABLE_JAX", "POT_BACKEND_DISABLE_CUPY")


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (word2vec seeds each word's vector with it).

    Example:

    >>> stable_hash("circle") == stable_hash("circle")
    True
    """
    return zlib.crc32(text.encode("utf-8"))


def _is_word2vec_header(line: bytes) -> bool:
    parts = line.split()
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def load_word_vectors(path: str | os.PathLike) -> KeyedVectors:
    """Load word vectors: gensim `.kv`, word2vec binary (`.bin`), word2vec text or GloVe text.

    Text files whose first line is "<count> <dim>" are read as word2vec text,
    others as GloVe (no header).

    Example:

    >>> kv = load_word_vectors("glove.6B.50d.txt")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Word vector file {path} does not exist")
    try:
        if path.suffix == ".kv":
            return KeyedVectors.load(str(path))
        if path.suffix == ".bin":
            return KeyedVectors.load_word2vec_format(str(path), binary=True)
        with open(path, "rb") as fh:
            first = fh.readline()
        return KeyedVectors.load_word2vec_format(str(path), binary=False, no_header=not _is_word2vec_header(first))
    except Exception as err:  # noqa: BLE001 - re-raised with the file name and the accepted formats
        raise ValueError(
            f"Could not read word vectors from {path}: {err}. Expected a gensim .kv file, word2vec binary (.bin), "
            "word2vec text ('<count> <dim>' header line) or GloVe text (one 'word v1 v2 ...' per line)"
        ) from err


def train_word_vectors(captions: list[str], seed: int = W2V_SEED) -> KeyedVectors:
    """Train word2vec (CBOW) on captions, deterministically (seed, workers=1, stable hash).

    Example:

    >>> kv = train_word_vectors(["a red circle", "a blue square"] * 10)
    >>> kv.vector_size
    64
    """
    sentences = [tokens for tokens in map(tokenize, captions) if tokens]
    if not sentences:
        raise ValueError("train_word_vectors: no non-empty captions to train word2vec on")
    model = Word2Vec(
        sentences,
        vector_size=W2V_VECTOR_SIZE,
        window=W2V_WINDOW,
        min_count=W2V_MIN_COUNT,
        epochs=W2V_EPOCHS,
        seed=seed,
        workers=1,
        hashfxn=stable_hash,
    )
    return model.wv


def word_vectors_for(path: Optional[str], training_captions: list[str]) -> tuple[KeyedVectors, str]:
    """The vectors to use and a description of their source for the report.

    Example:

    >>> kv, source = word_vectors_for(None, ["a red circle"] * 5)
    >>> source
    'word2vec trained on 5 training captions'
    """
    if path:
        kv = load_word_vectors(path)
        return kv, f"{path} ({len(kv.index_to_key)} words, {kv.vector_size} dims)"
    return train_word_vectors(training_captions), f"word2vec trained on {len(training_captions)} training captions"


def caption_vector(kv: KeyedVectors, tokens: list[str]) -> Optional[np.ndarray]:
    """Mean vector of the in-vocabulary tokens, or None when there are none.

    Example:

    >>> kv = train_word_vectors(["a red circle"] * 5)
    >>> caption_vector(kv, ["zebra"]) is None
    True
    """
    known = [t for t in tokens if t in kv.key_to_index]
    if not known:
        return None
    return np.mean([kv[t] for t in known], axis=0)


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine similarity; 0 when either vector is zero.

    Example:

    >>> cosine(np.array([1.0, 0.0]), np.array([1.0, 0.0]))
    1.0
    """
    norm = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.dot(u, v) / norm) if norm > 0 else 0.0


def wmd_status() -> dict:
    """Whether Word Mover's Distance can run (POT importable), with the reason if not.

    Example:

    >>> wmd_status()["available"] in (True, False)
    True
    """
    for key in _POT_BACKENDS_OFF:
        os.environ.setdefault(key, "1")
    try:
        import ot  # noqa: F401
    except ImportError as err:
        return {"available": False, "reason": f"POT is not installed ({err}); pip install POT"}
    return {"available": True}


def _image_similarity(kv: KeyedVectors, hyp: list[str], refs: list[list[str]], use_wmd: bool) -> dict:
    hyp_vec = caption_vector(kv, hyp)
    ref_vecs = [v for v in (caption_vector(kv, r) for r in refs) if v is not None]
    scorable = hyp_vec is not None and bool(ref_vecs)
    # An empty or all-unknown caption conveys nothing: it scores 0 and is counted, not dropped.
    cosines = [cosine(hyp_vec, v) for v in ref_vecs] if scorable else [0.0]
    out = {"cosine_max": max(cosines), "cosine_mean": float(np.mean(cosines)), "scorable": scorable}
    if use_wmd:
        # Suppress gensim's per-pair OOV logging; OOV words are counted separately.
        distances = [kv.wmdistance(hyp, r) for r in refs] if scorable else []
        finite = [d for d in distances if np.isfinite(d)]
        out["wmd_min"] = float(min(finite)) if finite else None
    return out


def semantic_similarity(
    references: dict[str, list[str]],
    hypotheses: dict[str, str],
    kv: KeyedVectors,
    source: str,
    wmd: bool = True,
    progress: bool = False,
) -> dict:
    """Cosine similarity (max and mean over references) and WMD of generated vs reference captions.

    Returns {"vectors": source, "cosine_max", "cosine_mean" (means over images),
    "wmd": {"available", "mean_min_distance" | "reason"}, "oov": {"hypothesis_tokens",
    "reference_tokens", "oov_hypothesis", "oov_reference", "top"}, "unscorable_images",
    "per_image": {id: {"cosine_max", "cosine_mean", "wmd_min"?}}}.

    Example:

    >>> kv = train_word_vectors(["a red circle", "a blue square"] * 10)
    >>> s = semantic_similarity({"a": ["a red circle"]}, {"a": "a red circle"}, kv, "toy", wmd=False)
    >>> round(s["cosine_max"], 6), s["unscorable_images"]
    (1.0, 0)
    """
    missing = [k for k in hypotheses if not references.get(k)]
    if missing:
        raise ValueError(f"semantic_similarity: {len(missing)} hypotheses have no references, e.g. {missing[:5]}")
    wmd_info = wmd_status() if wmd else {"available": False, "reason": "not requested (wmd=False)"}
    oov: collections.Counter = collections.Counter()
    totals = {"hypothesis_tokens": 0, "reference_tokens": 0, "oov_hypothesis": 0, "oov_reference": 0}
    per_image = {}
    gensim_log = logging.getLogger("gensim.models.keyedvectors")
    previous_level = gensim_log.level
    gensim_log.setLevel(logging.ERROR)
    try:
        for key, hyp_text in tqdm(hypotheses.items(), desc="semantic similarity", unit="img", disable=not progress):
            hyp, refs = tokenize(hyp_text), [tokenize(r) for r in references[key]]
            for role, tokens in [("hypothesis", hyp)] + [("reference", r) for r in refs]:
                unknown = [t for t in tokens if t not in kv.key_to_index]
                totals[f"{role}_tokens"] += len(tokens)
                totals[f"oov_{role}"] += len(unknown)
                oov.update(unknown)
            per_image[key] = _image_similarity(kv, hyp, refs, wmd_info["available"])
    finally:
        gensim_log.setLevel(previous_level)
    result = {
        "vectors": source,
        "num_images": len(per_image),
        "cosine_max": float(np.mean([p["cosine_max"] for p in per_image.values()])) if per_image else 0.0,
        "cosine_mean": float(np.mean([p["cosine_mean"] for p in per_image.values()])) if per_image else 0.0,
        "unscorable_images": sum(not p.pop("scorable") for p in per_image.values()),
        "oov": {**totals, "top": oov.most_common(TOP_OOV_WORDS)},
    }
    if wmd_info["available"]:
        distances = [p["wmd_min"] for p in per_image.values() if p.get("wmd_min") is not None]
        wmd_info = {
            "available": True,
            "mean_min_distance": float(np.mean(distances)) if distances else None,
            "images": len(distances),
        }
    result["wmd"] = wmd_info
    result["per_image"] = per_image
    return result
