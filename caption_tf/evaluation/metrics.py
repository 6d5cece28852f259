"""Caption metrics: corpus BLEU-1..4 (nltk), CIDEr-D, ROUGE-L, METEOR (pycocoevalcap).

BLEU is computed with nltk's `corpus_bleu` on lowercase whitespace tokens, with
cumulative n-gram weights and nltk's smoothing method1 (an epsilon count for
n-gram orders with no match), so a corpus with no 4-gram match scores a small
positive number instead of a warning and 0. pycocoevalcap's own BLEU (the one
COCO papers quote) is reported beside it as `bleu_coco`; the two agree to 1e-9
except that nltk counts one n-gram in the denominator for a hypothesis shorter
than n tokens (so very short captions pull nltk's BLEU-n below COCO's).

CIDEr (pycocoevalcap `Cider`, which is CIDEr-D: clipped n-gram counts and a
Gaussian length penalty, sigma 6, x10) takes its IDF weights from the references
of the images being scored, so it needs at least two images with different
references to be non-zero.

Example:

>>> refs = [["a red circle", "one red circle"]]
>>> round(corpus_bleu_scores(refs, ["a red circle"])["bleu1"], 3)
1.0
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from tqdm.auto import tqdm

from caption_tf.data.text import clean_caption

BLEU_SMOOTHING = "nltk SmoothingFunction().method1 (epsilon=0.1 for zero n-gram counts)"
BLEU_WEIGHTS = {
    "bleu1": (1.0,),
    "bleu2": (0.5, 0.5),
    "bleu3": (1 / 3, 1 / 3, 1 / 3),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}
TOKENIZERS = ("ptb", "simple")
PTB_TIMEOUT_S = 120
METEOR_TIMEOUT_S = 300  # the first call loads METEOR's paraphrase tables (~8 s here)
SPICE_UNAVAILABLE_REASON = (
    "SPICE is not computed: pycocoevalcap's Spice downloads Stanford CoreNLP models on first use, "
    "which needs internet access; this project evaluates offline"
)
_METEOR_FORBIDDEN = re.compile(r"[|\n\r]")  # the METEOR jar's line protocol uses '|||' and newlines


def tokenize(caption: str) -> list[str]:
    """The words of a caption as the model's vocabulary sees them (`data.text.clean_caption`).

    Example:

    >>> tokenize("A red circle , above  a Square.")
    ['a', 'red', 'circle', 'above', 'a', 'square']
    """
    return clean_caption(caption).split()


def _bleu_from_tokens(refs: list[list[list[str]]], hyps: list[list[str]]) -> dict[str, float]:
    if not hyps or not any(hyps):
        return {name: 0.0 for name in BLEU_WEIGHTS}
    smoothing = SmoothingFunction().method1
    return {
        name: float(corpus_bleu(refs, hyps, weights=weights, smoothing_function=smoothing))
        for name, weights in BLEU_WEIGHTS.items()
    }


def corpus_bleu_scores(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 with cumulative weights and smoothing `BLEU_SMOOTHING`.

    `references[i]` holds all reference captions of image i, `hypotheses[i]`
    its generated caption; both go through `tokenize`. Empty
    hypotheses count as zero-length candidates (they add to the brevity
    penalty) and do not crash.

    Example:

    >>> corpus_bleu_scores([["a red circle above a square"]], ["a red circle above a square"])["bleu4"]
    1.0
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"corpus_bleu_scores: {len(references)} reference lists but {len(hypotheses)} hypotheses")
    refs = [[tokenize(r) for r in group] for group in references]
    return _bleu_from_tokens(refs, [tokenize(h) for h in hypotheses])


def java_available() -> bool:
    """Whether a `java` executable is on PATH (PTB tokenizer and METEOR need it).

    Example:

    >>> isinstance(java_available(), bool)
    True
    """
    return shutil.which("java") is not None


def _ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    # pycocoevalcap's PTBTokenizer wrapper writes its temp file into site-packages and lets the
    # jar print to stderr; this runs the same jar and command with a private temp dir instead.
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    keys = [k for k, caps in captions.items() for _ in caps]
    lines = [c.replace("\n", " ").replace("\r", " ") for caps in captions.values() for c in caps]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "captions.txt"
        src.write_text("\n".join(lines), encoding="utf-8")
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(src)]
        proc = subprocess.run(cmd, capture_output=True, timeout=PTB_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
    out_lines = proc.stdout.decode("utf-8").split("\n")
    if len(out_lines) < len(lines):
        raise RuntimeError(f"{len(lines)} captions in but {len(out_lines)} lines out")
    out: dict[str, list[str]] = {k: [] for k in captions}
    for key, line in zip(keys, out_lines):
        out[key].append(" ".join(w for w in line.split() if w not in ptb.PUNCTUATIONS))
    return out


def tokenize_captions(captions: dict[str, list[str]], tokenizer: str = "ptb") -> tuple[dict[str, list[str]], str]:
    """Tokenise every caption to a space-joined lowercase string; returns (captions, tokenizer used).

    "ptb" runs pycocoevalcap's Stanford PTBTokenizer (Java, offline; COCO's
    standard: keeps "t-shirt" and splits "pool's" into "pool 's", then drops
    punctuation tokens). Without Java, or if it fails, it falls back to
    "simple" (`data.text.clean_caption`) and says why in the returned name.

    Example:

    >>> tokenize_captions({"a": ["A red circle."]}, "simple")
    ({'a': ['a red circle']}, 'simple')
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"Unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    if tokenizer == "ptb":
        if not java_available():
            reason = "java not found on PATH"
        else:
            try:
                tokenised = _ptb_tokenize(captions)
                return {k: tokenised.get(k, []) for k in captions}, "ptb"
            except Exception as err:  # noqa: BLE001 - any failure means: use the documented fallback
                reason = f"PTBTokenizer failed: {err}"
        return {k: [clean_caption(c) for c in v] for k, v in captions.items()}, f"simple (ptb unavailable: {reason})"
    return {k: [clean_caption(c) for c in v] for k, v in captions.items()}, "simple"


_meteor_lock = threading.Lock()
_meteor_scorer = None


def _get_meteor():
    # One METEOR JVM per process: starting it loads paraphrase tables (~8 s), later calls take ms.
    global _meteor_scorer
    if _meteor_scorer is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor_scorer = Meteor()
    return _meteor_scorer


def start_meteor() -> None:
    """Start METEOR's JVM now, in its own process, so the first METEOR score does not wait for it.

    The JVM spends ~8-25 s loading its paraphrase tables; started before decoding,
    that load overlaps with it. A no-op without Java; a failure here is reported
    by the first `meteor_scores` call instead.
    """
    if not java_available():
        return
    with _meteor_lock, contextlib.suppress(Exception):
        _get_meteor()


def _drop_meteor() -> None:
    global _meteor_scorer
    if _meteor_scorer is not None:
        with contextlib.suppress(Exception):
            _meteor_scorer.meteor_p.kill()
    _meteor_scorer = None


def meteor_scores(gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict:
    """METEOR 1.5 via pycocoevalcap, or {"available": False, "reason": ...}.

    `gts`/`res` are tokenised captions keyed by image id (res: one caption each).
    The JVM is started once per process and reused.

    Example:

    ```python
    out = meteor_scores({"a": ["a red circle"]}, {"a": ["a red circle"]})
    out["score"] if out["available"] else out["reason"]
    ```
    """
    if not java_available():
        return {"available": False, "reason": "java not found on PATH (METEOR runs a Java jar)"}
    gts = {k: [_METEOR_FORBIDDEN.sub(" ", c) for c in v] for k, v in gts.items()}
    res = {k: [_METEOR_FORBIDDEN.sub(" ", c) for c in v] for k, v in res.items()}
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["value"] = _get_meteor().compute_score(gts, res)
        except Exception as err:  # noqa: BLE001 - reported as unavailable with the reason
            outcome["error"] = err

    with _meteor_lock:
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(METEOR_TIMEOUT_S)
        if thread.is_alive() or "error" in outcome:
            _drop_meteor()
            reason = outcome.get("error", f"no answer from the METEOR jar within {METEOR_TIMEOUT_S} s")
            return {"available": False, "reason": f"METEOR failed: {reason}"}
    score, per_image = outcome["value"]
    return {"available": True, "score": float(score), "per_image": dict(zip(gts, map(float, per_image)))}


def _check_inputs(references: dict[str, list[str]], hypotheses: dict[str, str]) -> None:
    missing = [k for k in hypotheses if k not in references]
    if missing:
        raise ValueError(f"caption_metrics: {len(missing)} hypotheses have no references, e.g. {missing[:5]}")
    empty = [k for k in hypotheses if not references[k]]
    if empty:
        raise ValueError(f"caption_metrics: images with an empty reference list: {empty[:5]}")
    if not hypotheses:
        raise ValueError("caption_metrics: no hypotheses to score")


def caption_metrics(
    references: dict[str, list[str]],
    hypotheses: dict[str, str],
    meteor: bool = True,
    tokenizer: str = "simple",
    progress: bool = False,
) -> dict:
    """All caption metrics for the images in `hypotheses`, corpus-level and per image.

    Returns numeric "bleu1".."bleu4" (nltk, `BLEU_SMOOTHING`), "bleu_coco"
    (pycocoevalcap's BLEU-1..4), "cider" (CIDEr-D), "rouge_l", "meteor" and
    "spice" as {"available": bool, "score" | "reason"}, "tokenizer" (which one
    was used), "num_images" and "per_image": {id: {"bleu4", "cider", "rouge_l"
    (and "meteor" when computed)}}. References of images without a hypothesis
    are ignored. The default tokenizer "simple" splits words exactly where
    `data.text.clean_caption` (the model's vocabulary) does; "ptb" gives
    COCO-comparable numbers but keeps "t-shirt", which a generated "t shirt"
    then never matches. `progress` shows a tqdm bar over the metrics.

    Example:

    >>> refs = {"a": ["a red circle above a square"], "b": ["a blue square on the left"]}
    >>> m = caption_metrics(refs, {k: v[0] for k, v in refs.items()}, meteor=False)
    >>> m["bleu4"], m["cider"] > 0
    (1.0, True)
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_inputs(references, hypotheses)
    ids = list(hypotheses)
    # Tokenise references and hypotheses in one batch: one JVM start for PTB.
    keyed = {f"r{i}": references[k] for i, k in enumerate(ids)}
    keyed.update({f"h{i}": [hypotheses[k]] for i, k in enumerate(ids)})
    tokenised, used = tokenize_captions(keyed, tokenizer)
    gts = {k: tokenised[f"r{i}"] for i, k in enumerate(ids)}
    res = {k: tokenised[f"h{i}"] or [""] for i, k in enumerate(ids)}

    ref_tokens = [[r.split() for r in gts[k]] for k in ids]
    hyp_tokens = [res[k][0].split() for k in ids]
    result: dict = {"num_images": len(ids), "tokenizer": used, "bleu_smoothing": BLEU_SMOOTHING}
    steps = ["BLEU", "CIDEr-D", "ROUGE-L"] + (["METEOR"] if meteor else [])
    with tqdm(total=len(steps), desc="caption metrics", unit="metric", disable=not progress) as bar:
        bar.set_postfix_str(steps[0])
        result.update(_bleu_from_tokens(ref_tokens, hyp_tokens))
        with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap's Bleu prints its ratios
            coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        result["bleu_coco"] = {f"bleu{n + 1}": float(v) for n, v in enumerate(coco_bleu)}
        bar.update(1)
        bar.set_postfix_str(steps[1])
        cider, cider_per_image = Cider().compute_score(gts, res)
        bar.update(1)
        bar.set_postfix_str(steps[2])
        rouge, rouge_per_image = Rouge().compute_score(gts, res)
        bar.update(1)
        result["cider"], result["rouge_l"] = float(cider), float(rouge)
        if meteor:
            bar.set_postfix_str(steps[3])
        result["meteor"] = meteor_scores(gts, res) if meteor else {"available": False, "reason": "not requested (meteor=False)"}
        bar.update(1 if meteor else 0)
    result["spice"] = {"available": False, "reason": SPICE_UNAVAILABLE_REASON}

    smoothing = SmoothingFunction().method1
    per_image = {}
    for i, k in enumerate(ids):
        bleu4 = sentence_bleu(ref_tokens[i], hyp_tokens[i], smoothing_function=smoothing) if hyp_tokens[i] else 0.0
        per_image[k] = {"bleu4": float(bleu4), "cider": float(cider_per_image[i]), "rouge_l": float(rouge_per_image[i])}
        if result["meteor"]["available"]:
            per_image[k]["meteor"] = result["meteor"]["per_image"][k]
    if result["meteor"]["available"]:
        result["meteor"] = {"available": True, "score": result["meteor"]["score"]}
    result["per_image"] = per_image
    return result


def headline(metrics: dict) -> dict[str, Optional[float]]:
    """The flat numbers worth a table row: BLEU-1..4, CIDEr, ROUGE-L, METEOR (None if unavailable).

    Example:

    >>> headline({"bleu1": 1, "bleu2": 1, "bleu3": 1, "bleu4": 1, "cider": 2, "rouge_l": 1,
    ...           "meteor": {"available": False, "reason": "x"}})["meteor"] is None
    True
    """
    row = {name: metrics[name] for name in (*BLEU_WEIGHTS, "cider", "rouge_l")}
    row["meteor"] = metrics["meteor"]["score"] if metrics["meteor"]["available"] else None
    return row
