"""A run folder: everything needed to reproduce and reload a training run.

    runs/<name>/
        config.yaml          the resolved Config
        vocab.json           the vocabulary (tokens in id order, max length)
        run.json             feature cache, grid shape, fingerprints, status
        model.weights.h5     final (or best) decoder weights
        history.csv          per-epoch metrics
        logs/                TensorBoard
        metrics.json         test-split metrics
        skips.json           what the dataset loader and feature extractor left out

Example:

>>> run = load_run("runs/minimal-shapes")
>>> run.generator().greedy(grid)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from caption_tf.config import Config, load_saved_config, save_config
from caption_tf.data.text import CaptionVocabulary

CONFIG_FILE, VOCAB_FILE, RUN_FILE, WEIGHTS_FILE = "config.yaml", "vocab.json", "run.json", "model.weights.h5"
METRICS_FILE, HISTORY_FILE, LOG_DIR, SKIPS_FILE = "metrics.json", "history.csv", "logs", "skips.json"


def default_run_name(cfg: Config) -> str:
    """Deterministic, so rerunning the same command finds (and resumes) the same run."""
    parts = [cfg.preset or "custom", cfg.data.dataset, cfg.features.backbone, cfg.model.decoder, cfg.model.attention]
    return "-".join(parts)


def run_directory(cfg: Config) -> Path:
    return Path(cfg.train.runs_dir) / (cfg.train.run_name or default_run_name(cfg))


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def save_run_files(run_dir: Path, cfg: Config, vocab: CaptionVocabulary, info: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    vocab.save(run_dir / VOCAB_FILE)
    write_json(run_dir / RUN_FILE, info)


@dataclass
class Run:
    """A finished (or resumable) run loaded from disk."""

    directory: Path
    config: Config
    vocab: CaptionVocabulary
    info: dict
    model: object = None

    def generator(self, jit_compile: bool = False):
        from caption_tf.models.decoding import CaptionGenerator

        return CaptionGenerator(
            self.model, self.vocab.start_id, self.vocab.end_id, self.vocab.max_length, jit_compile, self.config.eval.no_repeat_ngram
        )


def load_run(run_dir: str | Path, with_model: bool = True) -> Run:
    """Reload config, vocabulary and (optionally) the trained decoder of a run folder."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, VOCAB_FILE, RUN_FILE):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name}: missing; is {run_dir} a caption_tf run folder?")
    cfg = load_saved_config(run_dir / CONFIG_FILE)
    vocab = CaptionVocabulary.load(run_dir / VOCAB_FILE)
    info = json.loads((run_dir / RUN_FILE).read_text())
    run = Run(run_dir, cfg, vocab, info)
    if with_model:
        from caption_tf.models.decoder import build_decoder

        weights = run_dir / WEIGHTS_FILE
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: no trained weights; has training finished? (rerun train.py to resume)")
        run.model = build_decoder(cfg.model, vocab.size, tuple(info["grid_shape"]), vocab.max_length)
        run.model.load_weights(weights)
    return run
