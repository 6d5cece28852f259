"""The run folder: its layout, reading and writing its files, and loading a trained run.

Training writes a run folder and evaluation reads it; both go through this
module, so the layout and the file formats are defined once.

    runs/<name>/
        config.yaml                  the resolved Config (no `auto` left)
        vocab.json                   the vocabulary (tokens in id order, max length)
        run.json                     feature cache, encoder (backbone, weights, size, seed), grid shape,
                                     fingerprints, status, phases
        feature_normalizer.npz       the per-channel statistics the decoder's inputs were standardised with
        model.weights.h5             final (or best) decoder weights
        history.csv                  per-epoch metrics
        logs/                        TensorBoard (logs/fine_tune: phase 2)
        metrics.json                 test-split metrics
        skips.json                   what the dataset loader and feature extractor left out
        checkpoints/                 verified checkpoints (caption_tf.training.integrity)
        alerts.jsonl                 health alerts (caption_tf.training.health)
        backbone.weights.h5          phase 2 only: the fine-tuned backbone
        decoder_phase1.weights.h5    phase 2 only: the decoder after phase 1
        history_fine_tune.csv        phase 2 only: per-epoch metrics
        fine_tune_backup/            phase 2 only: keras BackupAndRestore state
    runs/<name>.old-<time>/          a run moved aside by --resume never

Every file here is published atomically (`caption_tf.files`). Reading a run
folder needs no TensorFlow (the supervising parent process reads it); only
`load_run(..., with_model=True)` builds the decoder.

Example:

>>> run = load_run("runs/minimal-shapes-inception_v3-lstm-bahdanau")
>>> tokens, attention = run.generator().greedy(grids)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from caption_tf.config import Config, load_saved_config, save_config
from caption_tf.data.text import CaptionVocabulary
from caption_tf.files import write_json

CONFIG_FILE, VOCAB_FILE, RUN_FILE, WEIGHTS_FILE = "config.yaml", "vocab.json", "run.json", "model.weights.h5"
METRICS_FILE, HISTORY_FILE, LOG_DIR, SKIPS_FILE = "metrics.json", "history.csv", "logs", "skips.json"
CHECKPOINT_DIR = "checkpoints"
ALERTS_FILE = "alerts.jsonl"
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"
# With run.json's "encoder", what turns a new image into the decoder's input (features.encoder).
FEATURE_NORMALIZER_FILE = "feature_normalizer.npz"
PHASE1_WEIGHTS_FILE = "decoder_phase1.weights.h5"
FINE_TUNE_HISTORY_FILE = "history_fine_tune.csv"
FINE_TUNE_LOG_DIR = "fine_tune"  # under logs/
FINE_TUNE_BACKUP_DIR = "fine_tune_backup"
OLD_RUN_SUFFIX = ".old-"  # --resume never moves runs/<name> to runs/<name>.old-<time>


class RunFolderError(ValueError):
    """A run folder file that cannot be used (truncated, not valid JSON, wrong content); the message names it."""


def default_run_name(cfg: Config) -> str:
    """Deterministic, so rerunning the same command finds (and resumes) the same run."""
    parts = [cfg.preset or "custom", cfg.data.dataset, cfg.features.backbone, cfg.model.decoder, cfg.model.attention]
    return "-".join(parts)


def run_directory(cfg: Config) -> Path:
    return Path(cfg.train.runs_dir) / (cfg.train.run_name or default_run_name(cfg))


def config_hash(cfg: Config) -> str:
    """Identity of a configuration as requested (before `auto` settings are resolved): 16 hex digits.

    Stored in run.json's phase markers, so its encoding (sorted-key JSON) must not change.

    Example:

    >>> config_hash(load_config("minimal")) == config_hash(load_config("minimal"))
    True
    """
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ run.json


def read_run_info(run_dir: str | Path, missing_ok: bool = False) -> dict:
    """The run's `run.json`.

    Args:
        run_dir: the run folder.
        missing_ok: return {} when there is no run.json (a run not started yet)
            instead of raising FileNotFoundError.

    Raises:
        RunFolderError: naming the file, when it is truncated, damaged or not a JSON object.
    """
    path = Path(run_dir) / RUN_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise FileNotFoundError(f"{path}: missing; is {path.parent} a caption_tf run folder?") from None
    try:
        info = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise RunFolderError(
            f"{path} is truncated or damaged ({err}). Delete it and rerun the train.py command that made this run: "
            "training resumes from the run's newest checkpoint and writes it again"
        ) from None
    if not isinstance(info, dict):
        raise RunFolderError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def write_run_info(run_dir: str | Path, info: dict) -> None:
    write_json(Path(run_dir) / RUN_FILE, info)


def update_run_info(run_dir: str | Path, **changes) -> dict:
    """Read run.json, set `changes`, publish it again; returns the new content."""
    info = {**read_run_info(run_dir), **changes}
    write_run_info(run_dir, info)
    return info


def save_run_files(run_dir: Path, cfg: Config, vocab: CaptionVocabulary, info: dict) -> None:
    """config.yaml, vocab.json and run.json of a run about to train."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    vocab.save(run_dir / VOCAB_FILE)
    write_run_info(run_dir, info)


# ------------------------------------------------------------------ the run-folder lock
#
# One process trains in a run folder at a time (issue 12). The lock that makes
# it so belongs here, beside the layout, so train.py, the supervisor and
# evaluate.py all take the same one. Not implemented yet.


# ------------------------------------------------------------------ a trained run


@dataclass
class Run:
    """A finished (or resumable) run loaded from disk."""

    directory: Path
    config: Config
    vocab: CaptionVocabulary
    info: dict
    model: object = None

    def generator(self, jit_compile: bool = False):
        from caption_tf.models.decoding import CaptionGenerator  # TensorFlow: only when decoding

        return CaptionGenerator(self.model, self.vocab.start_id, self.vocab.end_id, self.vocab.max_length, jit_compile)


def load_run(run_dir: str | Path, with_model: bool = True) -> Run:
    """Reload config, vocabulary and (optionally) the trained decoder of a run folder."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, VOCAB_FILE, RUN_FILE):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name}: missing; is {run_dir} a caption_tf run folder?")
    cfg = load_saved_config(run_dir / CONFIG_FILE)
    vocab = CaptionVocabulary.load(run_dir / VOCAB_FILE)
    run = Run(run_dir, cfg, vocab, read_run_info(run_dir))
    if with_model:
        from caption_tf.models.decoder import build_decoder  # TensorFlow: only when a model is wanted

        weights = run_dir / WEIGHTS_FILE
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: no trained weights; has training finished? (rerun train.py to resume)")
        run.model = build_decoder(cfg.model, vocab.size, tuple(run.info["grid_shape"]), vocab.max_length)
        run.model.load_weights(weights)
    return run
