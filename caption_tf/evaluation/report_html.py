"""Render the report summary (the content of metrics.json) as one self-contained HTML page.

The page has inline CSS, no scripts and no network references; figures are
PNG files in `figures/` beside it, referenced by relative paths, so the
folder can be zipped, moved or opened straight from disk.

Example:

```python
html_text = render_report(json.load(open("reports/x/metrics.json")))
html_text.startswith("<!DOCTYPE html>")
```
"""

from __future__ import annotations

import html
from typing import Any, Iterable, Optional, Sequence

METRIC_NAMES = {
    "bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "cider": "CIDEr-D",
    "rouge_l": "ROUGE-L", "meteor": "METEOR", "cosine_max": "word-vector cosine (max over refs)",
    "wmd": "WMD (min over refs, lower is better)",
    "repetition_rate": "captions repeating a word or phrase (lower is better)", "object_accuracy": "object accuracy (whole scene right)",
    "colour_accuracy": "colour accuracy", "shape_accuracy": "shape accuracy", "relation_accuracy": "relation accuracy",
    "repeated_mention_rate": "captions naming one object twice (lower is better)",
    "attention_in_box_colour": "attention in box: colour words", "attention_in_box_shape": "attention in box: shape words",
    "attention_in_box_size": "attention in box: size words",
    "image_to_text_R@1": "image→text Recall@1", "image_to_text_R@5": "image→text Recall@5",
}
DIGITS = 3
STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1300px;color:#222;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:2px solid #3b75af;padding-bottom:4px;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef3f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}
.note{color:#666;font-size:0.9em}.bad{color:#a33}.figs img{max-width:48%;margin-right:1%}
nav a{margin-right:12px}code{background:#f4f4f4;padding:1px 4px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, spec: Optional[str] = None) -> str:
    """Scores to 3 decimals, counts with thousands separators, None as an en dash, the rest as text.

    `spec` (a format spec such as ",.0f" for megabytes) overrides the default for numbers.

    Example:

    >>> fmt(0.12345), fmt(None), fmt(1267385), fmt(1525.578, ",.0f")
    ('0.123', '–', '1,267,385', '1,526')
    """
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec and isinstance(value, (int, float)):
        return format(value, spec)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{DIGITS}f}"
    return str(value)


COUNT = ",.0f"  # a count stored as a float (e.g. words per caption): "13", not "13.000"
MEGABYTES = ",.0f"
MILLISECONDS = ",.1f"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], formats: Optional[dict[int, str]] = None) -> str:
    """An HTML table; numeric cells are right-aligned; `formats` gives a column's number format.

    Example:

    >>> table(["a", "n"], [[1.0, 2.0]], formats={1: COUNT})
    '<table><tr><th>a</th><th>n</th></tr><tr><td class="num">1.000</td><td class="num">2</td></tr></table>'
    """
    formats = formats or {}
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = ""
    for row in rows:
        cells = "".join(
            f'<td class="num">{esc(fmt(c, formats.get(k)))}</td>' if isinstance(c, (int, float)) or c is None else f"<td>{esc(c)}</td>"
            for k, c in enumerate(row)
        )
        body += f"<tr>{cells}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def images(paths: Iterable[str], alt: str, cls: str = "") -> str:
    tags = "".join(f'<img src="{esc(p)}" alt="{esc(alt)}">' for p in paths)
    return f'<div class="{cls}">{tags}</div>' if cls else tags


def section(anchor: str, title: str, body: str) -> str:
    return f'<h2 id="{esc(anchor)}">{esc(title)}</h2>\n{body}\n'


def _comparison(summary: dict) -> str:
    body = ""
    for decoding, columns in summary.get("comparison", {}).items():
        names = list(columns)
        metrics = [m for m in METRIC_NAMES if any(m in columns[c] for c in names)]
        rows = [[METRIC_NAMES[m]] + [columns[c].get(m) for c in names] for m in metrics]
        label = "greedy decoding" if decoding == "greedy" else "beam search"
        body += f"<h3>{esc(label)}</h3>" + table(["metric", *names], rows)
    runs = summary["runs"]
    settings = ("beam_size", "length_penalty", "no_repeat_ngram", "block_repeated_mentions")
    body += table(["run", "what it is", "images", "beam size", "length penalty", "no-repeat n-gram (0: off)", "repeated mentions blocked"],
                  [[n, r["label"], r.get("images"), *[r.get("decoding", {}).get(k) for k in settings]] for n, r in runs.items()])
    body += images(summary["figures"].get("comparison", []), "metric comparison", "figs")
    llm = summary.get("llm")
    if llm is not None:
        if llm.get("available"):
            body += f'<p class="note">LLM column: <code>{esc(llm["model"])}</code> captioned the same images ' \
                    f"(its captions are the same for both tables; decoding settings from the first run).</p>"
        else:
            body += f'<p class="bad">LLM column unavailable: {esc(llm.get("reason"))}</p>'
    first = next(iter(runs.values()), {})
    scores = first.get("beam", {}).get("scores", {})
    if scores:
        meteor = scores.get("meteor", {})
        body += f'<p class="note">Tokenizer: {esc(scores.get("tokenizer"))}. BLEU smoothing: {esc(scores.get("bleu_smoothing"))}. ' \
                f'METEOR: {esc("computed" if meteor.get("available") else meteor.get("reason"))}. ' \
                f'SPICE: {esc(scores.get("spice", {}).get("reason", ""))}</p>'
    return section("comparison", "Comparison", body)


def _semantic(summary: dict) -> str:
    rows = []
    for name, r in summary["runs"].items():
        for decoding in ("greedy", "beam"):
            s = r.get(decoding, {}).get("semantic")
            if s:
                wmd = s["wmd"].get("mean_min_distance") if s["wmd"].get("available") else s["wmd"].get("reason")
                oov = s["oov"]
                rows.append([name, decoding, s["cosine_max"], s["cosine_mean"], wmd, s["unscorable_images"],
                             f"{oov['oov_hypothesis']}/{oov['hypothesis_tokens']}", s["vectors"]])
    body = table(["run", "decoding", "cosine max", "cosine mean", "WMD", "unscorable images", "OOV generated tokens", "word vectors"], rows)
    return section("semantic", "Semantic similarity", body)


def _errors(name: str, run: dict) -> str:
    body = f"<h3>{esc(name)}</h3>" + images(run["figures"].get("histograms", []), "score histogram", "figs")
    for decoding in ("greedy", "beam"):
        errors = run.get(decoding, {}).get("errors")
        if not errors:
            continue
        dist, words, lengths = errors["score_distribution"], errors["words"], errors["lengths"]
        body += f"<h4>{esc(decoding)}</h4>"
        body += table(["per-image " + dist["metric"], "mean", "std", "min", "median", "max"],
                      [["", dist["mean"], dist["std"], dist["min"], dist["percentiles"]["50"], dist["max"]]])
        for which in ("worst", "best"):
            entries = errors["best_and_worst"][which]
            body += f"<p><b>{esc(which)} captions</b></p>" + table(
                ["image", dist["metric"], "generated", "references"],
                [[e["image_id"], e[dist["metric"]], e["generated"], " | ".join(e["references"])] for e in entries])
        body += table(["most hallucinated words (images)", "most missed words (images)"],
                      [[", ".join(f"{w} ({c})" for w, c in words["hallucinated"]) or "none",
                        ", ".join(f"{w} ({c})" for w, c in words["missed"]) or "none"]])
        repetition = errors["repetition"]
        body += f'<p class="note">Captions that stutter or repeat a {repetition["ngram"]}-word phrase: ' \
                f'{repetition["captions_with_repeats"]} of {repetition["num_captions"]}' + \
                "".join(f"<br>{esc(e['caption'])} ({esc(', '.join(e['repeated']))})" for e in repetition["examples"][:3]) + "</p>"
        body += table(["length (words)", "mean", "std", "min", "max"],
                      [[k, lengths[k].get("mean"), lengths[k].get("std"), lengths[k].get("min"), lengths[k].get("max")]
                       for k in ("generated", "reference")], formats={3: COUNT, 4: COUNT})
        objects = errors.get("objects")
        if objects:
            keys = ("object_accuracy", "colour_accuracy", "shape_accuracy", "size_accuracy", "object_precision",
                    "object_recall", "count_accuracy", "relation_accuracy", "repeated_mention_rate")
            body += table(["object-level (shapes)", *[k.replace("_", " ") for k in keys]],
                          [["", *[objects[k] for k in keys]]])
    body += images(run["figures"].get("confusion", []), "confusion", "figs")
    return body


def _localisation(summary: dict) -> str:
    rows = []
    for name, r in summary["runs"].items():
        for decoding in ("greedy", "beam"):
            loc = r.get(decoding, {}).get("localisation")
            if not loc:
                continue
            for kind, v in loc["by_type"].items():
                rows.append([name, decoding, f"{kind} words", v["count"], v["mass_in_box"], v["uniform_baseline"], v["ratio"]])
            for word, v in loc["by_word"].items():
                rows.append([name, decoding, word, v["count"], v["mass_in_box"], v["uniform_baseline"], v["ratio"]])
            rows.append([name, decoding, "unresolved words (no unique named object)", loc["unresolved"], None, None, None])
    if not rows:
        return section("localisation", "Attention localisation",
                       '<p class="note">Not computed: the evaluated dataset has no ground-truth object boxes (shapes dataset only).</p>')
    body = '<p class="note">Share of a step\'s attention mass inside the box of the object the generated word names; ' \
           "uniform attention would score the box area (baseline). Ratio &gt; 1: the model looks at the object.</p>"
    body += table(["run", "decoding", "word", "count", "attention in box", "uniform baseline", "ratio"], rows)
    heads = [[name, decoding, h["layer"], h["head"], h.get("colour"), h.get("shape"), h.get("size")]
             for name, r in summary["runs"].items() for decoding in ("greedy", "beam")
             for h in r.get(decoding, {}).get("localisation", {}).get("by_head", [])]
    if heads:
        body += '<p class="note">Transformer: the table above scores the last layer\'s cross-attention, its heads ' \
                "together (with --readout-attention, the readout attention's one head); here each head of each " \
                "decoder layer alone (attention in the named box by word type). Heads " \
                "specialise: one looks at the object a word names while another looks elsewhere.</p>"
        body += table(["run", "decoding", "layer", "head", "colour words", "shape words", "size words"], heads, formats={2: COUNT, 3: COUNT})
    return section("localisation", "Attention localisation", body)


def _retrieval(summary: dict) -> str:
    rows, protocols = [], ""
    for name, r in summary["runs"].items():
        ret = r.get("retrieval")
        if not ret:
            continue
        protocols += f"<p><b>{esc(name)}</b>: {esc(ret.get('protocol', ''))} ({fmt(ret.get('pairs'))} pairs scored in " \
                     f"{fmt(ret.get('seconds'), ',.1f')} s).</p>"
        for direction in ("image_to_text", "text_to_image"):
            for k, value in ret[direction].items():
                rows.append([name, direction.replace("_", " "), k, value, ret["chance"][direction][k], ret["images"], ret["captions"]])
    if not rows:
        return section("retrieval", "Image-text retrieval", '<p class="note">Not computed (--no-retrieval).</p>')
    body = '<p class="note">The captioner as a retrieval scorer: every (image, caption) pair of a pool is scored by the ' \
           "model's mean token log-probability of the caption given the image. Recall@K: share of queries whose match is " \
           "among the K best of its pool; chance: a random ranking of the same pools. Recall depends on the pool size: " \
           "compare runs only on the same protocol.</p>" + protocols
    return section("retrieval", "Image-text retrieval", body + table(["run", "direction", "K", "recall", "chance", "images", "captions"], rows))


def _user_images(summary: dict) -> str:
    body = ""
    for name, items in summary.get("user_images", {}).items():
        body += f"<h3>{esc(name)}</h3>"
        beam = next((f"beam search (beam size {i['beam_size']})" for i in items if "beam_size" in i), "beam search")
        body += table(["image", "greedy decoding", beam, "problem"],
                      [[i["path"], i.get("greedy", ""), i.get("beam", ""), i.get("error", "")] for i in items])
        body += images([i["figure"] for i in items if "figure" in i], "attention on user image")
    body = '<p class="note">Each file goes through the run\'s own backbone, standardisation and decoder, exactly like its ' \
           "training images; attention maps show the greedy caption.</p>" + body
    return section("user-images", "Your images", body)


def _resources(summary: dict) -> str:
    rows = []
    for name, r in summary["runs"].items():
        usage = r.get("resources")
        if not usage:
            continue
        for t in sorted(usage["throughput"].values(), key=lambda x: x["batch_size"]):
            rows.append([name, usage["device"], usage["backbone_parameters"], usage["decoder_parameters"],
                         usage.get("peak_device_memory_mb", usage["peak_rss_mb"]), t["batch_size"],
                         t["latency_ms_per_image"], t["images_per_second"]])
    body = '<p class="note">Full inference path (backbone + standardisation + greedy decoder) on random images, median of timed calls ' \
           "after one warm-up per batch size. Memory: peak process RSS on CPU, TensorFlow peak on GPU.</p>"
    body += table(["run", "device", "backbone params", "decoder params", "peak memory (MB)", "batch size",
                   "latency (ms/image)", "throughput (images/s)"], rows, formats={4: MEGABYTES, 6: MILLISECONDS, 7: ",.1f"})
    llm = summary.get("llm_resources")
    if llm:
        body += "<p>LLM: " + esc(", ".join(f"{k}={fmt(v, MEGABYTES if k.endswith('_mb') else None)}"
                                           for k, v in llm.items() if not isinstance(v, (dict, list)))) + "</p>"
    body += images(summary["figures"].get("resources", []), "resources")
    return section("resources", "Resource usage", body)


def _timings(timings: dict) -> str:
    rows = [[scope, stage, seconds] for scope, stages in timings.items() if isinstance(stages, dict) for stage, seconds in stages.items()]
    body = table(["run", "stage", "seconds"], rows, formats={2: ",.1f"})
    if "total_seconds" in timings:
        body += f"<p>Total: {fmt(timings['total_seconds'], ',.1f')} s.</p>"
    return section("timings", "How long each stage took", body)


def render_report(summary: dict, title: Optional[str] = None) -> str:
    """The whole report page for a `build_report` summary."""
    runs = summary["runs"]
    title = title or "Caption evaluation: " + ", ".join(runs)
    scope = (f"split <b>{esc(summary['split'])}</b>" if "comparison" in summary
             else f"captions of {sum(len(v) for v in summary.get('user_images', {}).values()) // max(len(runs), 1)} image file(s)")
    parts = [f"<h1>{esc(title)}</h1>",
             f'<p class="note">Generated {esc(summary["generated"])}; {scope}; '
             f"numbers in <code>metrics.json</code> beside this page.</p>"]
    nav = []
    if "comparison" in summary:
        parts.append(_comparison(summary))
        parts.append(_semantic(summary))
        parts.append(section("errors", "Error analysis", "".join(_errors(n, r) for n, r in runs.items())))
        parts.append(_localisation(summary))
        parts.append(_retrieval(summary))
        attention = "".join(f"<h3>{esc(n)}</h3>" + images(r["figures"].get("attention", []), "attention map") for n, r in runs.items())
        parts.append(section("attention", "Attention maps (greedy, one panel per generated word)", attention))
        examples = "".join(f"<h3>{esc(n)}</h3>" + images(r["figures"].get("examples", []), "examples") for n, r in runs.items())
        parts.append(section("examples", "Examples: references and generated captions", examples))
        if summary["figures"].get("embeddings"):
            parts.append(section("embeddings", "Backbone embeddings (PCA and t-SNE)", images(summary["figures"]["embeddings"], "embeddings")))
        if any(r.get("resources") for r in runs.values()):
            parts.append(_resources(summary))
        nav = ["comparison", "semantic", "errors", "localisation", "retrieval", "attention", "examples", "embeddings", "resources"]
    if "user_images" in summary:
        parts.append(_user_images(summary))
        nav.append("user-images")
    if summary.get("timings"):
        parts.append(_timings(summary["timings"]))
        nav.append("timings")
    links = "".join(f'<a href="#{a}">{a.replace("-", " ")}</a>' for a in nav if f'id="{a}"' in "".join(parts))
    body = f"<nav>{links}</nav>\n" + "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
