"""The evaluation report behind `evaluate.py`: metrics, analyses and figures for one or more runs.

For every run, the test split (from the run's feature cache) is captioned with
greedy and beam search and scored against all references of each image
(BLEU-1..4, CIDEr-D, ROUGE-L, METEOR), word-vector similarity, error analysis,
object accuracy and attention localisation (shapes dataset), resource usage;
then the runs (and an LLM captioner when requested) are compared side by side.
Everything lands in one folder: `report.html`, `metrics.json`, `figures/*.png`.

Example:

```python
summary = build_report(["runs/a", "runs/b"], ReportOptions(out_dir="reports/a-vs-b"))
summary["comparison"]["beam"]["a"]["bleu4"]
```
"""

from __future__ import annotations

import contextlib
import datetime
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from caption_tf.data.datasets import load_dataset
from caption_tf.data.images import load_rgb
from caption_tf.evaluation import plots
from caption_tf.evaluation.attention import localisation, localisation_by_head
from caption_tf.evaluation.captioner import Captioner, run_encoder
from caption_tf.evaluation.captioning import open_run_cache
from caption_tf.evaluation.errors import confusion_matrix, error_analysis, objects_by_id
from caption_tf.evaluation.metrics import caption_metrics, headline, start_meteor
from caption_tf.evaluation.resources import RESOURCE_BATCH_SIZES, measure_resources
from caption_tf.evaluation.retrieval import DEFAULT_POOL_IMAGES, DEFAULT_RETRIEVAL_IMAGES
from caption_tf.features.tfrecords import feature_batches
from caption_tf.files import write_json
from caption_tf.run_folder import load_run

REPORT_FILE, METRICS_JSON, FIGURES_DIR = "report.html", "metrics.json", "figures"
EXAMPLE_IMAGES = 6  # test images shown with references and every caption
ATTENTION_MAP_IMAGES = 3  # test images whose per-word attention is drawn, per run
EMBEDDING_MAX_POINTS = 600  # pooled embeddings projected per backbone (t-SNE cost grows ~N^2)
DECODINGS = ("greedy", "beam")
SCORE_METRIC = "cider"  # per-image score of the histogram and best/worst lists


@dataclass
class ReportOptions:
    """What `build_report` computes; `None` fields fall back to each run's `EvalConfig`.

    Example:

    >>> ReportOptions(out_dir="reports/x", beam_size=5).split
    'test'
    """

    out_dir: str
    split: str = "test"
    beam_size: Optional[int] = None
    length_penalty: Optional[float] = None
    no_repeat_ngram: Optional[int] = None
    block_repeated_mentions: Optional[bool] = None
    max_eval_images: Optional[int] = None
    word_vectors: Optional[str] = None
    meteor: Optional[bool] = None
    llm: Optional[str] = None
    images: Sequence[str] = ()
    evaluate_split: bool = True  # False: only caption `images` (a small report)
    resources: bool = True
    embeddings: bool = True
    retrieval: bool = True
    retrieval_pool: Optional[int] = DEFAULT_POOL_IMAGES  # images per retrieval pool; None: one pool (standard protocol)
    retrieval_images: Optional[int] = DEFAULT_RETRIEVAL_IMAGES  # first N evaluated images ranked; None: all
    resource_batch_sizes: Sequence[int] = RESOURCE_BATCH_SIZES
    examples: int = EXAMPLE_IMAGES
    attention_maps: int = ATTENTION_MAP_IMAGES


@dataclass
class RunResult:
    """One run's evaluation: JSON-ready `metrics` plus in-memory captions for figures."""

    name: str
    run: object
    dataset: object
    cache: object = None  # the run's FeatureCache, opened (and checked) once
    metrics: dict = field(default_factory=dict)
    captions: dict = field(default_factory=dict)  # decoding -> {"ids", "text", "words", "attention", "head_attention"}
    figures: dict = field(default_factory=dict)  # section -> [relative paths]
    _captioner: Optional[Captioner] = None

    @property
    def captioner(self) -> Captioner:
        """One captioner per run: its compiled decoding loops serve the split and the user's images."""
        if self._captioner is None:
            ev = self.run.config.eval
            self._captioner = Captioner(self.run, beam_size=ev.beam_size, length_penalty=ev.length_penalty,
                                        batch_size=ev.eval_batch_size, no_repeat_ngram=ev.no_repeat_ngram,
                                        block_repeated_mentions=ev.block_repeated_mentions)
        return self._captioner


def slug(text: str) -> str:
    """A file-name-safe version of a run name.

    Example:

    >>> slug("minimal-shapes/lstm bahdanau")
    'minimal-shapes_lstm_bahdanau'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def run_label(run) -> str:
    """Short description of what distinguishes a run: decoder, attention, backbone.

    Example:

    ```python
    run_label(load_run("runs/x"))
    ```
    """
    m, f = run.config.model, run.config.features
    return f"{m.label.replace(m.decoder, m.decoder.upper(), 1)}, {f.backbone} ({f.input_size or 'native'} px)"


def unique_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Folder names of the runs, made unique with a suffix where two are the same."""
    names: list[str] = []
    for d in run_dirs:
        base = Path(d).resolve().name
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


class Stages:
    """Times the report's stages: each prints its duration as it ends and lands in metrics.json.

    Example:

    >>> stages = Stages()
    >>> with stages("decoding", "run-a"):
    ...     pass
      run-a: decoding ... 0.0 s
    >>> stages.seconds
    {'run-a': {'decoding': 0.0}}
    """

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str, scope: str = "report"):
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.seconds.setdefault(scope, {})[stage] = round(seconds, 2)
        print(f"  {scope}: {stage} ... {seconds:.1f} s", flush=True)


def decode_split(captioner: Captioner, cache, split: str, limit: Optional[int]) -> dict:
    """Greedy and beam captions (words aligned with attention steps) of the first `limit` images of the cache.

    Decoded by `captioner.caption_grids`, the path image files take too. For a Transformer,
    also each layer's and head's cross-attention of those steps ("head_attention", `head_maps`).
    """
    all_ids = cache.image_ids(split)[:limit] if limit else cache.image_ids(split)
    by_head = hasattr(captioner.run.model, "cross_attention_by_head")
    out = {d: {"ids": [], "text": [], "words": [], "attention": [], "head_attention": []} for d in DECODINGS}
    batch_size = captioner.batch_size
    with tqdm(total=len(all_ids), desc=f"decoding {split} (greedy + beam {captioner.beam_size})", unit="img") as bar:
        for index, grid in feature_batches(cache.shards(split), cache.grid_shape, batch_size):
            keep = [j for j, i in enumerate(index.numpy()) if int(i) < len(all_ids)]
            if not keep:
                break
            grids = grid.numpy()[keep]
            decoded = captioner.caption_grids(grids)
            for decoding in DECODINGS:
                words = [item[f"{decoding}_words"] for item in decoded]
                out[decoding]["head_attention"] += head_maps(captioner.run, grids, words) if by_head else []
            for j, item in zip(keep, decoded):
                image_id = all_ids[int(index.numpy()[j])]
                for decoding in DECODINGS:
                    out[decoding]["ids"].append(image_id)
                    out[decoding]["words"].append(item[f"{decoding}_words"])
                    out[decoding]["text"].append(item[decoding])
                    out[decoding]["attention"].append(item[f"{decoding}_attention"])
            bar.update(len(keep))
    return out


def head_maps(run, grids: np.ndarray, words: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Each layer's and head's cross-attention [layers, heads, words, cells] of decoded captions (Transformer).

    The captions (`words[i]` decoded from `grids[i]`) are fed back whole, so the maps are those
    of their decoding steps.
    """
    tokens = np.zeros((len(words), run.vocab.max_length), np.int32)
    for row, caption in enumerate(words):
        ids = [run.vocab.start_id, *run.vocab.ids_of(caption)]  # every generated word is a vocabulary token
        tokens[row, : len(ids)] = ids
    maps = np.asarray(run.model.cross_attention_by_head(grids, tokens))
    return [maps[row, :, :, : len(caption)] for row, caption in enumerate(words)]


def _with_eval_overrides(run, options: ReportOptions):
    ev = run.config.eval
    for name in ("beam_size", "length_penalty", "no_repeat_ngram", "block_repeated_mentions", "max_eval_images", "word_vectors", "meteor"):
        value = getattr(options, name)
        if value is not None:
            setattr(ev, name, value)
    if ev.beam_size < 1:
        raise ValueError(f"--beam-size must be >= 1, got {ev.beam_size}")
    if ev.no_repeat_ngram < 0:
        raise ValueError(f"--no-repeat-ngram must be >= 0 (0: off), got {ev.no_repeat_ngram}")
    return run


class _WordVectors:
    """Word vectors shared by the runs of one report (trained once per dataset)."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, path: Optional[str], dataset):
        from caption_tf.evaluation.semantic import word_vectors_for

        key = (path, dataset.name, dataset.caption_fingerprint()) if not path else (path,)
        if key not in self._cache:
            training = [c for r in dataset.split("train") for c in r.captions]
            self._cache[key] = word_vectors_for(path, training)
        return self._cache[key]


def evaluate_split(result: RunResult, options: ReportOptions, vectors: _WordVectors, figures: Path, stages: Stages) -> None:
    """Decode, score and analyse the run's split; fills `result.metrics` and its figures."""
    from caption_tf.evaluation.retrieval import retrieval_scores
    from caption_tf.evaluation.semantic import semantic_similarity

    run, dataset, ev, cache = result.run, result.dataset, result.run.config.eval, result.cache
    with stages("decoding (greedy + beam)", result.name):
        result.captions = decode_split(result.captioner, cache, options.split, ev.max_eval_images)
    records = dataset.by_id()
    ids = result.captions["greedy"]["ids"]
    if not ids:
        raise ValueError(f"{run.directory}: the {options.split} split of its feature cache has no images to evaluate")
    references = {i: list(records[i].captions) for i in ids}
    objects = objects_by_id(records[i] for i in ids)
    with stages("word vectors", result.name):
        kv, source = vectors.get(ev.word_vectors, dataset)
    metrics = {
        "label": run_label(run),
        "run_dir": str(run.directory),
        "config": {"model": asdict(run.config.model), "features": asdict(run.config.features), "eval": asdict(ev)},
        "images": len(ids),
        "decoding": {"beam_size": ev.beam_size, "length_penalty": ev.length_penalty, "no_repeat_ngram": ev.no_repeat_ngram,
                     "block_repeated_mentions": ev.block_repeated_mentions},
    }
    name = slug(result.name)
    for decoding in DECODINGS:
        caps = result.captions[decoding]
        hypotheses = dict(zip(caps["ids"], caps["text"]))
        with stages(f"caption metrics, {decoding}" + (" (METEOR on)" if ev.meteor else ""), result.name):
            scores = caption_metrics(references, hypotheses, meteor=ev.meteor, progress=True)
        with stages(f"semantic similarity, {decoding}", result.name):
            semantic = semantic_similarity(references, hypotheses, kv, source, progress=True)
        with stages(f"error analysis and figures, {decoding}", result.name):
            errors = error_analysis(references, hypotheses, scores["per_image"], objects or None, SCORE_METRIC)
            entry = {
                "scores": {k: v for k, v in scores.items() if k != "per_image"},
                "headline": headline(scores),
                "per_image": scores["per_image"],
                "semantic": semantic,
                "errors": errors,
                "captions": hypotheses,
            }
            if objects:
                entry["localisation"] = localisation(caps["words"], caps["attention"], [records[i].objects for i in ids])
                if caps["head_attention"]:  # Transformer: the heads the map above mixes
                    entry["localisation"]["by_head"] = localisation_by_head(caps["words"], caps["head_attention"],
                                                                            [records[i].objects for i in ids])
            metrics[decoding] = entry
            result.figures.setdefault("histograms", []).append(
                _rel(plots.score_histogram(errors["score_distribution"]["values"], SCORE_METRIC,
                                           figures / f"{name}-{decoding}-hist.png", f"{result.name}: {decoding}"), figures)
            )
            if "objects" in errors:
                for attr in ("colour", "shape"):
                    matrix, rows, cols = confusion_matrix(errors["objects"][f"{attr}_confusion"])
                    if matrix.size:
                        path = figures / f"{name}-{decoding}-{attr}-confusion.png"
                        plots.confusion_heatmap(matrix, rows, cols, path, f"{attr}: {decoding}")
                        result.figures.setdefault("confusion", []).append(_rel(path, figures))
    with stages("attention maps", result.name):
        for k in range(min(options.attention_maps, len(ids))):
            caps = result.captions["greedy"]
            image = load_rgb(records[ids[k]].path)
            path = figures / f"{name}-attention-{k}.png"
            plots.attention_grid(image, caps["words"][k], caps["attention"][k], path, f"{result.name}, {ids[k]} (greedy)")
            result.figures.setdefault("attention", []).append(_rel(path, figures))
    if options.retrieval:
        with stages("image-text retrieval", result.name):
            metrics["retrieval"] = retrieval_scores(run, cache, options.split, max_images=len(ids), dataset=dataset,
                                                    pool_images=options.retrieval_pool, images=options.retrieval_images)
        print(f"  {result.name}: retrieval protocol: {metrics['retrieval']['protocol']}", flush=True)
    result.metrics.update(metrics)


def _rel(path: str | Path, figures: Path) -> str:
    return f"{FIGURES_DIR}/{Path(path).relative_to(figures).as_posix()}"


def score_llm(model: str, results: list[RunResult], options: ReportOptions) -> dict:
    """The LLM column: the first run's evaluated images captioned by `model` and scored like the runs."""
    from caption_tf.evaluation.llm import llm_column
    from caption_tf.evaluation.semantic import semantic_similarity, word_vectors_for

    first = results[0]
    ids = first.captions["greedy"]["ids"]
    records = first.dataset.by_id()
    column = llm_column(model, {i: records[i].path for i in ids}, first.run.config)
    if not column["available"]:
        return column
    references = {i: list(records[i].captions) for i in column["captions"]}
    hypotheses = dict(column["captions"])
    scores = caption_metrics(references, hypotheses, meteor=first.run.config.eval.meteor)
    kv, source = word_vectors_for(first.run.config.eval.word_vectors, [c for r in first.dataset.split("train") for c in r.captions])
    column.update(
        headline=headline(scores),
        scores={k: v for k, v in scores.items() if k != "per_image"},
        semantic={k: v for k, v in semantic_similarity(references, hypotheses, kv, source).items() if k != "per_image"},
    )
    objects = objects_by_id(records[i] for i in hypotheses)
    if objects:
        column["errors"] = error_analysis(references, hypotheses, scores["per_image"], objects, SCORE_METRIC)
    return column


def comparison_table(results: list[RunResult], llm: Optional[dict]) -> dict:
    """{decoding: {column: {metric: value}}}, columns = runs (+ "LLM" when it ran)."""
    table: dict = {}
    for decoding in DECODINGS:
        table[decoding] = {}
        for r in results:
            m = r.metrics[decoding]
            row = dict(m["headline"])
            row["cosine_max"] = m["semantic"]["cosine_max"]
            row["wmd"] = m["semantic"]["wmd"].get("mean_min_distance")
            row["repetition_rate"] = m["errors"]["repetition"]["rate"]
            objs = m["errors"].get("objects")
            if objs:
                row["object_accuracy"] = objs["object_accuracy"]
                row["colour_accuracy"] = objs["colour_accuracy"]
                row["shape_accuracy"] = objs["shape_accuracy"]
                row["relation_accuracy"] = objs["relation_accuracy"]
                row["repeated_mention_rate"] = objs["repeated_mention_rate"]
            loc = m.get("localisation", {}).get("by_type", {})
            for kind, values in loc.items():
                row[f"attention_in_box_{kind}"] = values["mass_in_box"]
            for k, value in r.metrics.get("retrieval", {}).get("image_to_text", {}).items():
                row[f"image_to_text_{k}"] = value
            table[decoding][r.name] = row
        if llm and llm.get("available"):
            row = dict(llm["headline"])
            row["cosine_max"] = llm["semantic"]["cosine_max"]
            row["wmd"] = llm["semantic"]["wmd"].get("mean_min_distance")
            objs = llm.get("errors", {}).get("objects")
            if objs:
                for key in ("object_accuracy", "colour_accuracy", "shape_accuracy", "relation_accuracy"):
                    row[key] = objs[key]
            table[decoding][f"LLM ({llm['model']})"] = row
    return table


def embedding_groups(results: list[RunResult], max_points: int = EMBEDDING_MAX_POINTS) -> list[dict]:
    """Pooled backbone embeddings per distinct feature cache, with class labels.

    Shapes: coloured by the colour, marked by the shape, of the first (leftmost)
    object; other datasets: coloured by split.
    """
    groups, seen = [], set()
    for r in results:
        cache = r.cache
        if cache.directory in seen:
            continue
        seen.add(cache.directory)
        records = r.dataset.by_id()
        pooled, ids, splits = [], [], []
        for split in ("train", "val", "test"):
            loaded = cache.load_split(split, fields=("pooled",))
            pooled.append(loaded["pooled"])
            ids += cache.image_ids(split)
            splits += [split] * len(cache.image_ids(split))
        pooled = np.concatenate(pooled).astype(np.float32)
        keep = np.linspace(0, len(ids) - 1, min(max_points, len(ids))).astype(int) if ids else np.zeros(0, int)
        if len(keep) < 3:
            continue
        first = [records[ids[k]].objects[0] if records[ids[k]].objects else None for k in keep]
        group = {"name": f"{r.run.config.features.backbone} ({cache.manifest['input_size']} px)", "pooled": pooled[keep]}
        if all(o is not None for o in first):
            group.update(labels=[o.colour for o in first], markers=[o.shape for o in first], label_name="first object")
        else:
            group.update(labels=[splits[k] for k in keep], label_name="split")
        groups.append(group)
    return groups


def examples_for(result: RunResult, llm: Optional[dict], count: int) -> list[dict]:
    """Images, references and greedy/beam/LLM captions of the first `count` evaluated images."""
    records = result.dataset.by_id()
    examples = []
    for k, image_id in enumerate(result.captions["greedy"]["ids"][:count]):
        captions = {"greedy": result.captions["greedy"]["text"][k], f"beam {result.run.config.eval.beam_size}": result.captions["beam"]["text"][k]}
        if llm and llm.get("available") and image_id in llm["captions"]:
            captions["LLM"] = llm["captions"][image_id]
        examples.append({"image_id": image_id, "title": image_id, "image": load_rgb(records[image_id].path),
                         "references": list(records[image_id].captions), "captions": captions})
    return examples


def caption_user_images(result: RunResult, paths: Sequence[str], figures: Path) -> list[dict]:
    """Greedy and beam captions and attention-map figures of the user's images for one run."""
    captioner = result.captioner
    out = []
    for k, item in enumerate(captioner.caption(paths)):
        if not item.ok:
            out.append({"path": item.path, "error": item.error})
            continue
        entry = {"path": item.path, "greedy": item.greedy, "beam": item.beam, "beam_size": captioner.beam_size}
        path = figures / f"{slug(result.name)}-user-{k}.png"
        plots.attention_grid(item.image, item.greedy_words, item.greedy_attention, path, f"{Path(item.path).name} (greedy): {item.greedy}")
        entry["figure"] = _rel(path, figures)
        out.append(entry)
    return out


def default_out_dir(run_dirs: Sequence[str | Path], images_only: bool = False) -> Path:
    """reports/<run> for one run, reports/<run1>_vs_<run2>... for several; `images_only` adds "_images".

    A report of the user's images alone goes to its own folder, so it never replaces the
    split's report of the same run.

    Example:

    >>> default_out_dir(["runs/a", "runs/b"]).as_posix(), default_out_dir(["runs/a"], images_only=True).as_posix()
    ('reports/a_vs_b', 'reports/a_images')
    """
    return Path("reports") / ("_vs_".join(unique_names(run_dirs))[:150] + ("_images" if images_only else ""))


def _load_datasets(results: list[RunResult], stages: Stages) -> None:
    """Each run's dataset (loaded once per distinct data config, its summary printed once) and checked feature cache."""
    loaded: dict[str, object] = {}
    for r in results:
        key = repr(asdict(r.run.config.data))
        if key not in loaded:
            with stages("loading the dataset", r.name):
                loaded[key] = load_dataset(r.run.config.data)
            print(f"  Dataset {loaded[key].summary()}", flush=True)
        r.dataset = loaded[key]
        with stages("checking the feature cache", r.name):
            r.cache = open_run_cache(r.run, r.dataset)


def build_report(run_dirs: Sequence[str | Path], options: ReportOptions) -> dict:
    """Evaluate the runs, write report.html, metrics.json and figures into `options.out_dir`.

    Every stage prints its time as it ends (also saved as `timings` in metrics.json);
    long ones show a progress bar. Returns the metrics.json content.
    """
    from caption_tf.evaluation.report_html import render_report

    if not run_dirs:
        raise ValueError("build_report: give at least one run folder")
    started = time.perf_counter()
    out = Path(options.out_dir)
    figures = out / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    results = []
    for name, run_dir in zip(unique_names(run_dirs), run_dirs):
        with stages("loading the run", name):
            run = _with_eval_overrides(load_run(run_dir), options)
        results.append(RunResult(name=name, run=run, dataset=None))
    vectors = _WordVectors()
    summary: dict = {
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "split": options.split if options.evaluate_split else None,
        "options": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(options).items()},
        "runs": {},
        "figures": {},
    }
    llm = None
    if options.evaluate_split:
        if any(r.run.config.eval.meteor for r in results):
            start_meteor()  # its JVM loads while the runs decode
        _load_datasets(results, stages)
        for r in results:
            print(f"Evaluating {r.name} on the {options.split} split ...", flush=True)
            evaluate_split(r, options, vectors, figures, stages)
        if options.llm:
            with stages(f"LLM column ({options.llm})"):
                llm = score_llm(options.llm, results, options)
            summary["llm"] = llm
        with stages("comparison and examples figures"):
            summary["comparison"] = comparison_table(results, llm)
            for decoding in DECODINGS:
                bars = {col: {k: v for k, v in row.items() if k in ("bleu1", "bleu4", "cider", "rouge_l", "meteor") and v is not None}
                        for col, row in summary["comparison"][decoding].items()}
                path = plots.metric_bars(bars, figures / f"comparison-{decoding}.png", f"{options.split} split, {decoding}")
                summary["figures"].setdefault("comparison", []).append(_rel(path, figures))
            for r in results:
                path = figures / f"{slug(r.name)}-examples.png"
                plots.examples_figure(examples_for(r, llm, options.examples), path)
                r.figures["examples"] = [_rel(path, figures)]
        if options.embeddings:
            with stages("backbone embeddings (PCA, t-SNE)"):
                groups = embedding_groups(results)
                if groups:
                    path = plots.embedding_plots(groups, figures / "embeddings.png")
                    summary["figures"]["embeddings"] = [_rel(path, figures)]
        if options.resources:
            usages = {}
            for r in results:
                with stages("resources (latency, memory)", r.name):
                    usages[r.name] = measure_resources(r.run, encoder=run_encoder(r.run), batch_sizes=options.resource_batch_sizes, progress=True)
                r.metrics["resources"] = usages[r.name]
            if llm and llm.get("available"):
                summary["llm_resources"] = llm.get("resources")
            path = plots.resources_plot(usages, figures / "resources.png")
            summary["figures"]["resources"] = [_rel(path, figures)]
    if options.images:
        summary["user_images"] = {}
        for r in results:
            with stages(f"captioning {len(options.images)} image file(s)", r.name):
                summary["user_images"][r.name] = caption_user_images(r, list(options.images), figures)
    for r in results:
        r.metrics.setdefault("label", run_label(r.run))
        r.metrics.setdefault("run_dir", str(r.run.directory))
        r.metrics["figures"] = r.figures
        summary["runs"][r.name] = r.metrics
    with stages("writing the report"):
        summary["timings"] = stages.seconds
        write_json(out / METRICS_JSON, summary)
        (out / REPORT_FILE).write_text(render_report(summary), encoding="utf-8")
    total = time.perf_counter() - started
    summary["timings"]["total_seconds"] = round(total, 1)
    write_json(out / METRICS_JSON, summary)
    print(f"Report written in {total:.1f} s", flush=True)
    return summary
