"""Error analysis of generated captions.

- `score_distribution`: summary statistics and histogram arrays of a per-image score.
- `best_and_worst`: the K best and worst captions with their references.
- `word_errors`: words hallucinated (generated, in no reference of that image)
  and missed (in most references, not generated), with counts.
- `length_stats`: generated vs reference caption lengths.
- `repetition_rate`: the share of captions that stutter ("circle circle") or repeat a phrase.
- `object_accuracy` (shapes dataset, which has ground-truth objects): parses
  captions into (size?, colour, shape) mentions plus the relation between the
  first two mentioned objects, and scores colour, shape, size, objects, count
  and relation against the scene, with colour/shape confusion tables.

Example:

>>> refs = {"a": ["a red circle", "one red circle"]}
>>> word_errors(refs, {"a": "a blue circle"})["hallucinated"]
[('blue', 1)]
"""

from __future__ import annotations

import collections
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from caption_tf.data.records import ImageRecord, SceneObject
from caption_tf.data.shapes import COLOURS, RELATIONS, SHAPES, SIZES, relation
from caption_tf.evaluation.metrics import tokenize

DEFAULT_K = 5
HISTOGRAM_BINS = 20
PERCENTILES = (5, 25, 50, 75, 95)
TOP_WORDS = 20
# "Missed" words: present in at least this fraction of an image's references (3 of 5).
MISSED_MIN_REFERENCE_FRACTION = 0.6
# Function words say nothing about the image; they are left out of hallucinated/missed lists.
FUNCTION_WORDS = frozenset(
    "a an the is are of and to on in at with there its it this that some while".split()
)
COUNT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
NONE_LABEL = "<none>"  # a matched mention that names no colour (or no shape)
# Assignment weights when pairing mentions with ground-truth objects: colour and shape
# decide the pairing, size only breaks ties.
_MATCH_WEIGHTS = {"colour": 2.0, "shape": 2.0, "size": 1.0}
_RELATION_TOKENS = [tuple(r.split()) for r in RELATIONS]


def _stats(values: Iterable[float]) -> dict:
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {"count": 0}
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "percentiles": {str(p): float(np.percentile(arr, p)) for p in PERCENTILES},
    }


def score_distribution(per_image: dict[str, dict[str, float]], metric: str = "cider", bins: int = HISTOGRAM_BINS) -> dict:
    """Summary statistics plus histogram-ready arrays of one per-image score.

    `per_image` is `caption_metrics(...)["per_image"]`. "values" (in image-id
    order, with "image_ids") feed `sns.histplot`; "histogram" holds numpy's
    counts and bin edges.

    Example:

    >>> d = score_distribution({"a": {"cider": 1.0}, "b": {"cider": 3.0}})
    >>> d["mean"], d["histogram"]["counts"][0]
    (2.0, 1)
    """
    ids = [k for k, scores in per_image.items() if metric in scores]
    if not ids:
        raise ValueError(f"score_distribution: no per-image {metric!r} scores (have {sorted(next(iter(per_image.values()), {}))})")
    values = np.array([per_image[k][metric] for k in ids], dtype=float)
    counts, edges = np.histogram(values, bins=bins)
    return {
        "metric": metric,
        **_stats(values),
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        "image_ids": ids,
        "values": values.tolist(),
    }


def best_and_worst(
    per_image: dict[str, dict[str, float]],
    references: dict[str, list[str]],
    hypotheses: dict[str, str],
    metric: str = "cider",
    k: int = DEFAULT_K,
) -> dict[str, list[dict]]:
    """The k lowest- and k highest-scoring captions with their references.

    Ties are broken by image id, so the lists are stable.

    Example:

    >>> per = {"a": {"cider": 0.1}, "b": {"cider": 2.0}}
    >>> out = best_and_worst(per, {"a": ["x"], "b": ["y"]}, {"a": "z", "b": "y"}, k=1)
    >>> out["worst"][0]["image_id"], out["best"][0]["image_id"]
    ('a', 'b')
    """
    ranked = sorted((scores[metric], key) for key, scores in per_image.items() if metric in scores)

    def entry(score: float, key: str) -> dict:
        return {"image_id": key, metric: score, "generated": hypotheses[key], "references": list(references[key])}

    return {
        "metric": metric,
        "worst": [entry(s, key) for s, key in ranked[:k]],
        "best": [entry(s, key) for s, key in sorted(ranked, key=lambda x: (-x[0], x[1]))[:k]],
    }


def word_errors(
    references: dict[str, list[str]],
    hypotheses: dict[str, str],
    min_reference_fraction: float = MISSED_MIN_REFERENCE_FRACTION,
    top: int = TOP_WORDS,
    ignore: frozenset = FUNCTION_WORDS,
) -> dict:
    """Words most often hallucinated and missed, counted once per image.

    Hallucinated: in the generated caption but in no reference of that image.
    Missed: in at least `min_reference_fraction` of the image's references but
    not in the generated caption. Words in `ignore` (function words) are skipped.

    Example:

    >>> refs = {"a": ["a red circle", "a red circle above"]}
    >>> word_errors(refs, {"a": "a red square"})["missed"]
    [('circle', 1)]
    """
    hallucinated: collections.Counter = collections.Counter()
    missed: collections.Counter = collections.Counter()
    images_with = {"hallucination": 0, "miss": 0}
    for key, hyp in hypotheses.items():
        generated = set(tokenize(hyp)) - ignore
        ref_sets = [set(tokenize(r)) for r in references[key]]
        in_refs: collections.Counter = collections.Counter(w for s in ref_sets for w in s)
        extra = {w for w in generated if in_refs[w] == 0}
        needed = {w for w, c in in_refs.items() if c >= min_reference_fraction * len(ref_sets)} - ignore
        lacking = needed - generated
        hallucinated.update(extra)
        missed.update(lacking)
        images_with["hallucination"] += bool(extra)
        images_with["miss"] += bool(lacking)
    return {
        "hallucinated": hallucinated.most_common(top),
        "missed": missed.most_common(top),
        "images_with_hallucination": images_with["hallucination"],
        "images_with_miss": images_with["miss"],
        "num_images": len(hypotheses),
        "missed_min_reference_fraction": min_reference_fraction,
    }


def length_stats(references: dict[str, list[str]], hypotheses: dict[str, str]) -> dict:
    """Token-length statistics of generated vs reference captions (+ arrays for plots).

    Example:

    >>> s = length_stats({"a": ["a red circle", "a red circle above"]}, {"a": "a red"})
    >>> s["generated"]["mean"], s["reference"]["mean"]
    (2.0, 3.5)
    """
    generated = [len(tokenize(hypotheses[k])) for k in hypotheses]
    reference = [len(tokenize(r)) for k in hypotheses for r in references[k]]
    gen_stats, ref_stats = _stats(generated), _stats(reference)
    ratio = gen_stats["mean"] / ref_stats["mean"] if generated and ref_stats.get("mean") else None
    return {
        "generated": gen_stats,
        "reference": ref_stats,
        "mean_length_ratio": ratio,
        "generated_lengths": generated,
        "reference_lengths": reference,
    }


REPEAT_NGRAM = 4  # phrases this long repeated in one caption count as a repetition


def repeated_phrases(caption: str, n: int = REPEAT_NGRAM) -> list[str]:
    """Word stutters ("circle circle") and word n-grams said twice in one caption.

    Example:

    >>> repeated_phrases("a circle circle")
    ['circle circle']
    >>> repeated_phrases("a large green circle left of a large green circle")
    ['a large green circle']
    >>> repeated_phrases("a large red circle left of a large red square")
    []
    """
    words = tokenize(caption)
    found = [f"{a} {b}" for a, b in zip(words, words[1:]) if a == b]
    seen: set = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen and " ".join(gram) not in found:
            found.append(" ".join(gram))
        seen.add(gram)
    return found


def repetition_rate(hypotheses: dict[str, str], n: int = REPEAT_NGRAM) -> dict:
    """Share of captions with a stutter or a repeated n-gram (`repeated_phrases`), with examples.

    Example:

    >>> repetition_rate({"a": "a circle circle", "b": "a red square"})["rate"]
    0.5
    """
    repeats = {key: repeated_phrases(h, n) for key, h in hypotheses.items()}
    flagged = {key: r for key, r in repeats.items() if r}
    return {
        "rate": _ratio(len(flagged), len(hypotheses)),
        "captions_with_repeats": len(flagged),
        "num_captions": len(hypotheses),
        "ngram": n,
        "examples": [{"image_id": k, "caption": hypotheses[k], "repeated": r} for k, r in list(flagged.items())[:10]],
    }


# ---- shapes dataset: object-level accuracy ----------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """An object named in a caption; any part may be missing from a malformed caption."""

    colour: Optional[str]
    shape: Optional[str]
    size: Optional[str] = None


@dataclass
class ParsedCaption:
    """Mentions in caption order, the stated count, and the relation between mentions 0 and 1."""

    mentions: list[Mention] = field(default_factory=list)
    stated_count: Optional[int] = None
    relation: Optional[str] = None

    @property
    def implied_count(self) -> int:
        """The stated count ("two shapes") or else the number of distinct mentions."""
        return self.stated_count if self.stated_count is not None else len(set(self.mentions))


def _relation_at(tokens: list[str], i: int) -> Optional[tuple[str, int]]:
    for phrase in _RELATION_TOKENS:
        if tuple(tokens[i : i + len(phrase)]) == phrase:
            return " ".join(phrase), len(phrase)
    return None


def parse_shapes_caption(caption: str) -> ParsedCaption:
    """Parse a shapes caption into mentions, stated count and first relation.

    A mention is [size] [colour] shape, or a colour/size with no shape (a
    malformed caption). The relation is the first relation phrase between the
    first and second mention.

    Example:

    >>> p = parse_shapes_caption("a small red circle to the left of a large blue square")
    >>> [(m.size, m.colour, m.shape) for m in p.mentions], p.relation
    ([('small', 'red', 'circle'), ('large', 'blue', 'square')], 'to the left of')
    """
    tokens = tokenize(caption)
    parsed = ParsedCaption()
    pending: dict[str, Optional[str]] = {"size": None, "colour": None}
    relation_candidate: Optional[str] = None

    def flush(shape: Optional[str]) -> None:
        if shape is None and pending["colour"] is None and pending["size"] is None:
            return
        parsed.mentions.append(Mention(colour=pending["colour"], shape=shape, size=pending["size"]))
        pending.update(size=None, colour=None)

    i = 0
    while i < len(tokens):
        tok = tokens[i]
        rel = _relation_at(tokens, i)
        if rel is not None:
            flush(None)
            if len(parsed.mentions) == 1 and relation_candidate is None:
                relation_candidate = rel[0]
            i += rel[1]
            continue
        if tok in COUNT_WORDS and parsed.stated_count is None and not parsed.mentions:
            parsed.stated_count = COUNT_WORDS[tok]
        elif tok in SIZES:
            if pending["size"] is not None or pending["colour"] is not None:
                flush(None)
            pending["size"] = tok
        elif tok in COLOURS:
            if pending["colour"] is not None:
                flush(None)
            pending["colour"] = tok
        elif tok in SHAPES:
            flush(tok)
        i += 1
    flush(None)
    if relation_candidate is not None and len(parsed.mentions) >= 2:
        parsed.relation = relation_candidate
    return parsed


def _pair_mentions(mentions: list[Mention], objects: list[SceneObject]) -> list[tuple[int, int]]:
    """Pairs (mention index, object index) maximising shared attributes (Hungarian assignment)."""
    if not mentions or not objects:
        return []
    score = np.array(
        [
            [sum(w for attr, w in _MATCH_WEIGHTS.items() if getattr(m, attr) == getattr(o, attr)) for o in objects]
            for m in mentions
        ]
    )
    rows, cols = linear_sum_assignment(-score)
    return list(zip(rows.tolist(), cols.tolist()))


def _exact(m: Mention, o: SceneObject) -> bool:
    # (colour, shape) is unique within a scene; a stated size must also be right.
    return m.colour == o.colour and m.shape == o.shape and (m.size is None or m.size == o.size)


def _score_image(parsed: ParsedCaption, objects: list[SceneObject], tallies: dict) -> dict:
    # The same (colour, shape) named twice: scenes never hold two such objects, so it is a repetition.
    named = [(m.colour, m.shape) for m in parsed.mentions]
    repeated_mention = len(named) != len(set(named))
    mentions = list(dict.fromkeys(parsed.mentions))  # repeated mentions count once
    pairs = _pair_mentions(mentions, objects)
    for mi, oi in pairs:
        m, o = mentions[mi], objects[oi]
        tallies["colour_confusion"][o.colour][m.colour or NONE_LABEL] += 1
        tallies["shape_confusion"][o.shape][m.shape or NONE_LABEL] += 1
        tallies["colour_correct"] += m.colour == o.colour
        tallies["shape_correct"] += m.shape == o.shape
        if m.size is not None:
            tallies["size_stated"] += 1
            tallies["size_correct"] += m.size == o.size
    tallies["matched"] += len(pairs)
    correct_mentions = sum(any(_exact(m, o) for o in objects) for m in mentions)
    found_objects = sum(any(_exact(m, o) for m in mentions) for o in objects)
    tallies["mentions"] += len(mentions)
    tallies["correct_mentions"] += correct_mentions
    tallies["objects"] += len(objects)
    tallies["found_objects"] += found_objects
    count_ok = parsed.implied_count == len(objects)
    relation_ok = None
    if parsed.relation is not None:
        first, second = parsed.mentions[0], parsed.mentions[1]
        a = next((o for o in objects if _exact(first, o)), None)
        b = next((o for o in objects if _exact(second, o)), None)
        # A relation between objects that are not in the scene cannot be right.
        relation_ok = a is not None and b is not None and a is not b and relation(a, b) == parsed.relation
        tallies["relations_stated"] += 1
        tallies["relations_correct"] += relation_ok
        tallies["relations_unresolved"] += a is None or b is None
    exact_image = correct_mentions == len(mentions) and found_objects == len(objects) and count_ok
    return {
        "mentions": [asdict(m) for m in mentions],
        "correct_mentions": correct_mentions,
        "found_objects": found_objects,
        "num_objects": len(objects),
        "count_ok": count_ok,
        "relation": parsed.relation,
        "relation_ok": relation_ok,
        "repeated_mention": repeated_mention,
        "all_correct": exact_image,
    }


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / den if den else None


def object_accuracy(objects: dict[str, list[SceneObject]], hypotheses: dict[str, str]) -> dict:
    """Object-level accuracy of captions of shapes scenes against their ground truth.

    Returns colour/shape/size accuracy over mentions paired with ground-truth
    objects, object precision (mentions naming a real object) and recall
    (objects named), count accuracy (stated or implied count == objects),
    relation accuracy (the relation between the first two mentions, checked on
    the ground-truth boxes with `shapes.relation`), the share of captions naming
    one object (colour and shape) twice ("repeated_mention_rate"), "object_accuracy" (the
    fraction of images whose caption names exactly the scene's objects with
    the right count), colour/shape confusion tables {truth: {generated: n}},
    and per-image details.

    Example:

    >>> objs = {"a": [SceneObject("circle", "red", "small", (0.1, 0.1, 0.3, 0.3))]}
    >>> acc = object_accuracy(objs, {"a": "a small blue circle"})
    >>> acc["colour_accuracy"], acc["shape_accuracy"], acc["colour_confusion"]
    (0.0, 1.0, {'red': {'blue': 1}})
    """
    missing = [k for k in hypotheses if k not in objects]
    if missing:
        raise ValueError(f"object_accuracy: no ground-truth objects for {len(missing)} images, e.g. {missing[:5]}")
    tallies: dict = collections.defaultdict(int)
    tallies["colour_confusion"] = collections.defaultdict(collections.Counter)
    tallies["shape_confusion"] = collections.defaultdict(collections.Counter)
    per_image = {k: _score_image(parse_shapes_caption(h), objects[k], tallies) for k, h in hypotheses.items()}
    n = len(per_image)
    return {
        "num_images": n,
        "object_accuracy": _ratio(sum(p["all_correct"] for p in per_image.values()), n),
        "colour_accuracy": _ratio(tallies["colour_correct"], tallies["matched"]),
        "shape_accuracy": _ratio(tallies["shape_correct"], tallies["matched"]),
        "size_accuracy": _ratio(tallies["size_correct"], tallies["size_stated"]),
        "object_precision": _ratio(tallies["correct_mentions"], tallies["mentions"]),
        "object_recall": _ratio(tallies["found_objects"], tallies["objects"]),
        "count_accuracy": _ratio(sum(p["count_ok"] for p in per_image.values()), n),
        "relation_accuracy": _ratio(tallies["relations_correct"], tallies["relations_stated"]),
        "relations_stated": tallies["relations_stated"],
        "relations_unresolved": tallies["relations_unresolved"],
        "repeated_mention_rate": _ratio(sum(p["repeated_mention"] for p in per_image.values()), n),
        "matched_objects": tallies["matched"],
        "colour_confusion": {t: dict(c) for t, c in sorted(tallies["colour_confusion"].items())},
        "shape_confusion": {t: dict(c) for t, c in sorted(tallies["shape_confusion"].items())},
        "per_image": per_image,
    }


def objects_by_id(records: Iterable[ImageRecord]) -> dict[str, list[SceneObject]]:
    """Ground-truth objects of the records that have them (shapes dataset).

    Example:

    >>> objects_by_id([ImageRecord("a", "a.png", ["x"], "test")])
    {}
    """
    return {r.image_id: r.objects for r in records if r.objects is not None}


def confusion_matrix(table: dict[str, dict[str, int]], labels: Optional[list[str]] = None) -> tuple[np.ndarray, list[str], list[str]]:
    """A confusion table as (counts, row labels, column labels) for `sns.heatmap`.

    Rows are ground truth, columns generated; `labels` fixes the order (e.g.
    `list(shapes.COLOURS)`); NONE_LABEL becomes an extra column when present.

    Example:

    >>> m, rows, cols = confusion_matrix({"red": {"red": 3, "blue": 1}}, ["red", "blue"])
    >>> m.tolist(), rows, cols
    ([[3, 1], [0, 0]], ['red', 'blue'], ['red', 'blue'])
    """
    seen_rows = sorted(table)
    seen_cols = sorted({c for row in table.values() for c in row})
    rows = list(labels) if labels is not None else seen_rows
    rows += [r for r in seen_rows if r not in rows]
    cols = list(labels) if labels is not None else [c for c in seen_cols if c != NONE_LABEL]
    cols += [c for c in seen_cols if c not in cols]
    matrix = np.zeros((len(rows), len(cols)), dtype=int)
    for r, row in table.items():
        for c, n in row.items():
            matrix[rows.index(r), cols.index(c)] = n
    return matrix, rows, cols


def error_analysis(
    references: dict[str, list[str]],
    hypotheses: dict[str, str],
    per_image: dict[str, dict[str, float]],
    objects: Optional[dict[str, list[SceneObject]]] = None,
    metric: str = "cider",
    k: int = DEFAULT_K,
) -> dict:
    """Everything above in one JSON-ready report; object accuracy only when `objects` is given.

    Example:

    >>> refs, hyps = {"a": ["a red circle"]}, {"a": "a red circle"}
    >>> sorted(error_analysis(refs, hyps, {"a": {"cider": 1.0}}))
    ['best_and_worst', 'lengths', 'repetition', 'score_distribution', 'words']
    """
    report = {
        "score_distribution": score_distribution(per_image, metric),
        "best_and_worst": best_and_worst(per_image, references, hypotheses, metric, k),
        "words": word_errors(references, hypotheses),
        "lengths": length_stats(references, hypotheses),
        "repetition": repetition_rate(hypotheses),
    }
    if objects:
        report["objects"] = object_accuracy(objects, {key: h for key, h in hypotheses.items() if key in objects})
    return report


def save_error_report(report: dict, path: str | Path) -> None:
    """Write the report as JSON (tuples become lists).

    Example:

    >>> save_error_report({"words": {"missed": [("circle", 1)]}}, "/tmp/errors.json")
    """
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
