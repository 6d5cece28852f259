"""The documentation stays true to the code: a complete configuration reference, no broken links.

`docs/configuration.md` holds a table generated from `caption_tf/config.py` (every
field, its flag, its default and the presets' values). After changing a config
field, regenerate it:

    python tests/test_docs.py --write

Cheap: no TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python tests/test_docs.py --write` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from caption_tf.config import CHOICES, CONFIG_DIR, Config, _base_type, field_index  # noqa: E402

CONFIG_DOC = REPO_ROOT / "docs" / "configuration.md"
TABLE_START, TABLE_END = "<!-- config-table:start -->", "<!-- config-table:end -->"
PRESETS = ("minimal", "fast", "optimized")
DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "benchmarks" / "RESULTS.md"]

# What each field means. A field not listed here is described by its comment in config.py.
MEANINGS = {
    "dataset": "the dataset to load ([datasets](datasets.md))",
    "data_dir": "the dataset's folder; shapes: where it is generated (default: `data_root`); "
    "`--download`: where Flickr8k goes (default: `data_root/flickr8k`)",
    "data_root": "default home of generated and downloaded datasets",
    "split_file": "a Karpathy `dataset_*.json`: its splits replace the dataset's own "
    "(`--dataset karpathy`: also its captions)",
    "captions_file": "the caption file to read instead of the default names (flickr8k, flickr30k, custom); "
    "a relative name is also looked up in `--data-dir`",
    "download": "flickr8k: download and extract the archives when `--data-dir` does not hold them",
    "num_images": "shapes: scenes generated",
    "scene_size": "shapes: side of a scene in pixels",
    "max_objects": "shapes: objects per scene, 1 to this",
    "val_fraction": "share of images in `val` where the dataset has no split of its own",
    "test_fraction": "share of images in `test` where the dataset has no split of its own",
    "max_train_images": "keep only the first N training images (smoke runs on real data); none: all",
    "data_seed": "seed of the shapes scenes and of every seeded split",
    "vocab_size": "vocabulary size, 4 reserved tokens included (padding, `[UNK]`, `<start>`, `<end>`); "
    "`auto`: words seen at least k times ([automatic settings](training.md#automatic-settings))",
    "max_length": "caption length in tokens, `<start>` and `<end>` included (longer captions are cut); "
    "`auto`: 95th percentile of the training captions + 2",
    "min_word_count": "a word seen fewer times in the training captions is left out of the vocabulary",
    "backbone": "the `keras.applications` CNN ([backbones](training.md#backbones-and-weights))",
    "weights": "backbone weights: `imagenet`, `none` (random, seeded) or the path of a `.weights.h5` file",
    "input_size": "square input size of the backbone in pixels; none: the backbone's native size",
    "cache_dir": "where the feature cache is written and reused",
    "extract_batch_size": "images per backbone call while building the feature cache",
    "extract_precision": "the backbone's compute precision while building the cache (a new cache when it changes); "
    "`auto`: `bfloat16` on a CPU with native bf16 matmuls (AMX, AVX512-BF16) and no GPU, else `float32`",
    "shard_size": "images per TFRecord shard of the feature cache",
    "fine_tune_layers": "N > 0: phase 2 unfreezes the last N backbone layers "
    "([two-phase training](training.md#two-phase-training-fine-tuning-the-backbone))",
    "decoder": "the recurrent cell of the decoder",
    "attention": "additive (Bahdanau) or multiplicative (Luong) attention",
    "luong_score": "Luong attention's score function (`general`: through a learned matrix)",
    "embedding_dim": "word embedding size",
    "units": "RNN units",
    "attention_units": "Bahdanau attention's hidden size; none: `units`",
    "dropout": "dropout rate in the decoder",
    "epochs": "training epochs (phase 1)",
    "batch_size": "batch size per replica (the global batch is this x replicas); `auto`: from the training pairs",
    "learning_rate": "Adam's learning rate at one replica (multiplied by the replica count); `auto`: from the batch size",
    "lr_schedule": "learning-rate schedule ([schedules](training.md#learning-rate-schedules-and-early-stopping))",
    "warmup_epochs": "`warmup_cosine`: epochs of linear warmup",
    "clipnorm": "gradient clipping by norm; none: no clipping",
    "early_stopping_patience": "stop after N epochs without improvement of the monitor, restoring the best weights; 0: off",
    "early_stopping_monitor": "what early stopping and `--tune` watch (`val_bleu4`: greedy BLEU-4 on the validation split)",
    "shuffle_buffer": "shuffle buffer of training pairs (the shuffle is seeded per epoch)",
    "seed": "seed of the decoder's initial weights, dropout and the per-epoch shuffle",
    "precision": "`auto`: `mixed_float16` on GPUs with compute capability >= 7.0, else `float32` "
    "([performance](performance.md#mixed-precision))",
    "jit": "XLA compilation of the train step and decoding; `auto`: on with GPUs, off on CPU",
    "recompute_grad": "gradient checkpointing of the decoder ([performance](performance.md#gradient-checkpointing))",
    "distribute": "`tf.distribute` strategy; `auto`: multi-worker with `TF_CONFIG`, mirrored on several GPUs, else one device",
    "runs_dir": "where run folders are written",
    "run_name": "the run folder's name; none: `<preset>-<dataset>-<backbone>-<decoder>-<attention>`",
    "tune": "run a keras-tuner hyperparameter search instead of training "
    "([search](training.md#hyperparameter-search))",
    "trials": "`--tune`: number of models trained",
    "fine_tune_epochs": "phase 2: epochs of end-to-end training on images",
    "fine_tune_learning_rate": "phase 2: learning rate",
    "fine_tune_batch_size": "phase 2: images per step (each with all its captions)",
    "checkpoint_every": "batches between checkpoints; 0: at epoch ends only ([recovery](recovery.md))",
    "keep_checkpoints": "the newest K checkpoints are kept",
    "resume": "`auto`: resume the run from its last verified checkpoint; `never`: move the old run aside and start fresh",
    "async_checkpoint": "save checkpoints in the background",
    "max_restarts": "rerun a crashed training process up to K times",
    "beam_size": "beam width of beam search (1: greedy)",
    "length_penalty": "GNMT length penalty alpha of beam search",
    "eval_batch_size": "images per decoding batch (test metrics, `val_bleu4`, report, LLM column)",
    "max_eval_images": "evaluate only the first N images of the split; none: all",
    "meteor": "compute METEOR (needs Java)",
    "word_vectors": "GloVe, word2vec or gensim `.kv` file for semantic similarity; "
    "none: word2vec trained on the training captions",
}


def source_comments() -> dict[str, str]:
    """{field name: its end-of-line comment in caption_tf/config.py}."""
    comments = {}
    for line in Path(inspect.getsourcefile(Config)).read_text().splitlines():
        match = re.match(r"^    (\w+): [^=]+=.*?#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _format(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _flag(name: str, base: type) -> str:
    flag = "--" + name.replace("_", "-")
    return f"`{flag}` / `--no-{flag[2:]}`" if base is bool else f"`{flag}`"


def _preset_values() -> dict[str, dict[str, object]]:
    values = {}
    for preset in PRESETS:
        raw = yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())
        values[preset] = {name: value for section in raw.values() if isinstance(section, dict) for name, value in section.items()}
    return values


def config_reference_table() -> str:
    """The Markdown table of every config field, one section after another."""
    presets = _preset_values()
    comments = source_comments()
    defaults = Config()
    lines = [
        "| field | flag | default | " + " | ".join(PRESETS) + " | meaning |",
        "|---|---|---|" + "---|" * len(PRESETS) + "---|",
    ]
    for name, (section, field, tp) in field_index().items():
        meaning = MEANINGS.get(name) or comments.get(name)
        if meaning is None:
            raise KeyError(f"Config field {section}.{name} has neither a comment in config.py nor a line in MEANINGS (tests/test_docs.py)")
        if name in CHOICES:
            meaning += "; one of " + ", ".join(f"`{c}`" for c in CHOICES[name])
        default = _format(getattr(getattr(defaults, section), field.name))
        cells = [f"`{section}.{name}`", _flag(name, _base_type(tp)), f"`{default}`"]
        cells += [f"`{_format(presets[p][name])}`" if name in presets[p] else "" for p in PRESETS]
        lines.append("| " + " | ".join(cells + [meaning]) + " |")
    return "\n".join(lines)


def documented_table(text: str) -> str:
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[start:end].strip()


def write_config_reference() -> None:
    text = CONFIG_DOC.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    CONFIG_DOC.write_text(text[:start] + "\n" + config_reference_table() + "\n" + text[end:])


def test_configuration_reference_lists_every_field_as_in_the_code():
    documented = documented_table(CONFIG_DOC.read_text())
    for name, (section, _, _) in field_index().items():
        assert f"`{section}.{name}`" in documented, f"docs/configuration.md lacks {section}.{name}: run python tests/test_docs.py --write"
    assert documented == config_reference_table(), (
        "docs/configuration.md's table differs from caption_tf/config.py and configs/*.yaml: run python tests/test_docs.py --write"
    )


def test_every_section_of_the_config_has_a_heading():
    text = CONFIG_DOC.read_text()
    for f in dataclasses.fields(Config):
        if f.name != "preset":
            assert f"`{f.name}`" in text.split(TABLE_START)[0], f"docs/configuration.md does not introduce the section {f.name}"


# ---------------------------------------------------------------------------
# Relative links.

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to dashes."""
    out = set()
    for line in _FENCE.sub("", markdown).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


# Guides other branches are adding; links to them are allowed before they land.
PENDING_GUIDES = {"docs/distributed.md", "docs/models.md", "docs/tensorboard.md"}


def _relative(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file whose file or heading does not exist."""
    text = path.read_text()
    broken = []
    for match in _LINK.finditer(_FENCE.sub("", text)):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        target_path = (path.parent / file_part).resolve() if file_part else path
        if not target_path.exists():
            if _relative(target_path) not in PENDING_GUIDES:
                broken.append(f"{_relative(path)}: {target} (no such file)")
        elif anchor and target_path.suffix == ".md" and anchor not in anchors(target_path.read_text()):
            broken.append(f"{_relative(path)}: {target} (no such heading)")
    return broken


def test_broken_links_are_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title: one (`x`)\n[ok](#title-one-x) [gone](missing.md) [bad](#nowhere) [web](https://x.org)\n")
    assert [b.split(": ", 1)[1] for b in broken_links(page)] == ["missing.md (no such file)", "#nowhere (no such heading)"]


def test_relative_links_in_readme_and_docs_resolve():
    broken = [b for path in DOC_FILES for b in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_name_no_path_of_a_development_machine():
    for path in DOC_FILES:
        assert "../shared" not in path.read_text(), f"{path.relative_to(REPO_ROOT)} names ../shared"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_config_reference()
        print(f"wrote the table of {CONFIG_DOC.relative_to(REPO_ROOT)}")
    else:
        print(config_reference_table())
