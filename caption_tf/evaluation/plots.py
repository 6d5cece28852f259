"""Report figures (matplotlib with the Agg backend, seaborn styling), each written as a PNG.

The attention grid lives in `caption_tf.figures` (training draws it too).

Every function takes plain arrays/dicts, draws one figure, saves it to `path`
and closes it, so a report can draw hundreds without leaking memory.

Example:

>>> score_histogram([0.1, 0.5, 0.9], "cider", "hist.png", "greedy")
'hist.png'
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

# The attention grid is shared with training's TensorBoard images; re-exported for the report.
from caption_tf.figures import attention_grid, save_figure, wrap_title  # noqa: E402, F401

TEXT_WRAP = 60
TSNE_MAX_PERPLEXITY = 30.0
TSNE_ITERATIONS = 500
EMBEDDING_SEED = 0


def score_histogram(values: Sequence[float], metric: str, path: str | Path, title: str = "") -> str:
    """Histogram of per-image scores.

    Example:

    >>> score_histogram([0.2, 1.4], "cider", "h.png")
    'h.png'
    """
    fig, ax = plt.subplots(figsize=(5, 3.4))
    sns.histplot(np.asarray(values, dtype=float), bins=min(20, max(len(values), 1)), ax=ax, color="#3b75af")
    ax.set_xlabel(f"per-image {metric}")
    ax.set_ylabel("images")
    ax.set_title(wrap_title(title, 48), fontsize=10)
    return save_figure(fig, path)


def confusion_heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str | Path, title: str = "") -> str:
    """Ground truth (rows) vs generated (columns) counts as an annotated heatmap.

    Example:

    >>> confusion_heatmap(np.eye(2, dtype=int), ["red", "blue"], ["red", "blue"], "c.png")
    'c.png'
    """
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 0.8 + 0.6 * len(rows)))
    sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", xticklabels=cols, yticklabels=rows, cbar=False, ax=ax)
    ax.set_xlabel("generated")
    ax.set_ylabel("ground truth")
    ax.set_title(wrap_title(title, int(12 * (1.0 + 0.7 * len(cols)))), fontsize=10)
    return save_figure(fig, path)


def examples_figure(examples: Sequence[dict], path: str | Path) -> str:
    """One row per image: the image beside its references and every generated caption.

    Each example: {"image": array, "references": [...], "captions": {label: text}}.
    """
    fig, axes = plt.subplots(len(examples), 2, figsize=(11, 2.6 * len(examples)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3]})
    for (ax_image, ax_text), example in zip(axes, examples):
        ax_image.imshow(example["image"])
        ax_image.set_title(example.get("title", ""), fontsize=8)
        ax_image.axis("off")
        ax_text.axis("off")
        lines = [f"{label}: {text}" for label, text in example["captions"].items()]
        lines += ["references:"] + [f"  - {r}" for r in example["references"]]
        wrapped = "\n".join(textwrap.shorten(line, TEXT_WRAP * 2) for line in lines)
        ax_text.text(0.0, 1.0, wrapped, va="top", ha="left", fontsize=9, family="monospace", transform=ax_text.transAxes)
    return save_figure(fig, path)


def project_2d(pooled: np.ndarray, method: str) -> np.ndarray:
    """2-D PCA or t-SNE (scikit-learn) of pooled embeddings [N, C].

    Example:

    >>> project_2d(np.random.rand(10, 4), "pca").shape
    (10, 2)
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(pooled, dtype=np.float32)
    if method == "pca":
        return PCA(n_components=2, random_state=EMBEDDING_SEED).fit_transform(x)
    if method == "tsne":
        perplexity = min(TSNE_MAX_PERPLEXITY, max((len(x) - 1) / 3.0, 1.0))
        reduced = PCA(n_components=min(50, *x.shape), random_state=EMBEDDING_SEED).fit_transform(x)
        # Exact gradients, 500 iterations: for the <= 600 points plotted, measured here (2 shared cores)
        # 8 s against 45-55 s for sklearn's default Barnes-Hut, at the same final KL divergence (0.68).
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=EMBEDDING_SEED,
                    method="exact", max_iter=TSNE_ITERATIONS).fit_transform(reduced)
    raise ValueError(f"unknown projection {method!r}; expected 'pca' or 'tsne'")


def _palette(labels: Sequence[str]):
    """Colour-name labels (shapes: "red", "blue", ...) drawn in their own colour; others in tab10."""
    from matplotlib.colors import CSS4_COLORS

    names = sorted(set(labels))
    return {n: n for n in names} if all(n in CSS4_COLORS for n in names) else "tab10"


def embedding_plots(groups: Sequence[dict], path: str | Path) -> str:
    """PCA and t-SNE side by side, one row per backbone, points coloured by label.

    Each group: {"name", "pooled" [N, C], "labels" [N], "label_name", optionally "markers" [N]}.
    """
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.4 * len(groups)), squeeze=False)
    bar = tqdm(total=2 * len(groups), desc="embeddings (PCA, t-SNE)", unit="projection")
    for (ax_pca, ax_tsne), group in zip(axes, groups):
        for ax, method in ((ax_pca, "pca"), (ax_tsne, "tsne")):
            points = project_2d(group["pooled"], method)
            bar.update(1)
            sns.scatterplot(x=points[:, 0], y=points[:, 1], hue=group["labels"], style=group.get("markers"),
                            s=22, ax=ax, palette=_palette(group["labels"]))
            ax.set_title(f"{group['name']}: {method.upper()} of pooled features", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(fontsize=7, title=group["label_name"], title_fontsize=7, loc="best")
    bar.close()
    return save_figure(fig, path)


def resources_plot(usages: dict[str, dict], path: str | Path) -> str:
    """Latency per image and throughput vs batch size, parameters and peak memory per model."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    names = list(usages)
    for name, usage in usages.items():
        rows = sorted(usage["throughput"].values(), key=lambda r: r["batch_size"])
        sizes = [r["batch_size"] for r in rows]
        axes[0].plot(sizes, [r["latency_ms_per_image"] for r in rows], marker="o", label=name)
        axes[1].plot(sizes, [r["images_per_second"] for r in rows], marker="o", label=name)
    for ax, label in ((axes[0], "latency (ms / image)"), (axes[1], "throughput (images / s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    short = [n if len(n) <= 18 else n[:17] + "…" for n in names]
    decoder = [usages[n]["decoder_parameters"] / 1e6 for n in names]
    backbone = [usages[n]["backbone_parameters"] / 1e6 for n in names]
    axes[2].bar(short, backbone, label="backbone", color="#9bb7d4")
    axes[2].bar(short, decoder, bottom=backbone, label="decoder", color="#e8894a")
    axes[2].set_ylabel("parameters (millions)")
    axes[2].legend(fontsize=7)
    memory = [usages[n].get("peak_device_memory_mb", usages[n]["peak_rss_mb"]) for n in names]
    axes[3].bar(short, memory, color="#6aa36f")
    axes[3].set_ylabel("peak memory (MB)")
    for ax in axes[2:]:
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    return save_figure(fig, path)


def metric_bars(table: dict[str, dict[str, float]], path: str | Path, title: str = "") -> str:
    """Grouped bars: one group per metric, one bar per column (run or LLM).

    Example:

    >>> metric_bars({"run": {"bleu4": 0.3, "cider": 1.1}}, "m.png")
    'm.png'
    """
    metrics = sorted({m for col in table.values() for m in col})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(len(table), 1) ** 0.5), 3.4))
    width = 0.8 / max(len(table), 1)
    for k, (name, values) in enumerate(table.items()):
        xs = np.arange(len(metrics)) + k * width
        ax.bar(xs, [values.get(m, np.nan) or 0.0 for m in metrics], width, label=name)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2)
    ax.set_xticklabels(metrics)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
