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
        logs/                        TensorBoard, phases 1 and 2 on one step axis (caption_tf.training.summaries)
        metrics.json                 test-split metrics
        skips.json                   what the dataset loader and feature extractor left out
        checkpoints/                 verified checkpoints (caption_tf.training.checkpoints)
        alerts.jsonl                 health alerts (caption_tf.training.health)
        backbone.weights.h5          phase 2 only: the fine-tuned backbone
        decoder_phase1.weights.h5    phase 2 only: the decoder after phase 1
        history_fine_tune.csv        phase 2 only: per-epoch metrics
        checkpoints_fine_tune/       phase 2 only: its verified checkpoints
    runs/<name>.lock                 held by the process training runs/<name> (its PID inside)
    runs/<name>.old-<time>/          a run moved aside by --resume never

Every file here is published atomically (`caption_tf.files`). Reading a run
folder needs no TensorFlow (the supervising parent process reads it); only
`load_run(..., with_model=True)` builds the decoder.

Example:

```python
run = load_run("runs/minimal-shapes-inception_v3-transformer")
tokens, attention = run.generator().greedy(grids)
```
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import yaml

from caption_tf.config import Config, field_index, load_saved_config, save_config
from caption_tf.data.text import CaptionVocabulary
from caption_tf.files import atomic_path, file_sha256, stable_hash, write_json

CONFIG_FILE, VOCAB_FILE, RUN_FILE, WEIGHTS_FILE = "config.yaml", "vocab.json", "run.json", "model.weights.h5"
METRICS_FILE, HISTORY_FILE, LOG_DIR, SKIPS_FILE = "metrics.json", "history.csv", "logs", "skips.json"
CHECKPOINT_DIR = "checkpoints"
# A model field every config.yaml written since the decoders share `models.base.CaptionModel` has;
# runs from before (no grid positions, another weights layout) cannot be loaded by this version.
CURRENT_DECODER_FIELD = "grid_positions"
ALERTS_FILE = "alerts.jsonl"
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"
# With run.json's "encoder", what turns a new image into the decoder's input (features.encoder).
FEATURE_NORMALIZER_FILE = "feature_normalizer.npz"
PHASE1_WEIGHTS_FILE = "decoder_phase1.weights.h5"
FINE_TUNE_HISTORY_FILE = "history_fine_tune.csv"
FINE_TUNE_CHECKPOINT_DIR = "checkpoints_fine_tune"
OLD_RUN_SUFFIX = ".old-"  # --resume never moves runs/<name> to runs/<name>.old-<time>
LOCK_SUFFIX = ".lock"  # runs/<name>.lock, beside the folder so --resume never can move the folder


class RunFolderError(ValueError):
    """A run folder file that cannot be used (truncated, not valid JSON, wrong content); the message names it."""


def default_run_name(cfg: Config) -> str:
    """Deterministic, so rerunning the same command finds (and resumes) the same run.

    The decoder is named by `ModelConfig.family`: no attention for the transformer.

    Example:

    >>> from caption_tf.config import load_config
    >>> default_run_name(load_config("minimal")), default_run_name(load_config("fast"))
    ('minimal-shapes-inception_v3-transformer', 'fast-shapes-inception_v3-gru-bahdanau')
    """
    return "-".join([cfg.preset or "custom", cfg.data.dataset, cfg.features.backbone, *cfg.model.family])


def run_directory(cfg: Config) -> Path:
    """`runs_dir/<run name>`; a run name is a plain name, not a path.

    A Transformer run started before its default name dropped the attention
    (`...-transformer-bahdanau`) is still found by the same command, so it resumes
    instead of starting over in a new folder.
    """
    name = cfg.train.run_name or default_run_name(cfg)
    if Path(name).name != name or name in (".", "..") or name.endswith(LOCK_SUFFIX):
        raise RunFolderError(
            f"--run-name {name!r} is not a plain name: a run is written to --runs-dir/<name> ({cfg.train.runs_dir}/<name>). "
            "Pass a name, and --runs-dir to choose the folder it goes in"
        )
    run_dir = Path(cfg.train.runs_dir) / name
    if not cfg.train.run_name and cfg.model.decoder == "transformer":
        earlier = run_dir.with_name(f"{name}-{cfg.model.attention}")
        if not run_dir.exists() and earlier.is_dir():
            return earlier
    return run_dir


def move_aside(run_dir: Path) -> Path:
    """Rename `runs/<name>` to `runs/<name>.old-<UTC time>` (--resume never: nothing is deleted)."""
    target = run_dir.with_name(f"{run_dir.name}{OLD_RUN_SUFFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    while target.exists():
        target = target.with_name(target.name + "+")
    os.replace(run_dir, target)
    return target


def check_run_folder(run_dir: Path) -> None:
    """Refuse an existing, non-empty folder that is not a caption_tf run: training would overwrite its files."""
    if run_dir.is_dir() and any(run_dir.iterdir()) and not ((run_dir / RUN_FILE).exists() or (run_dir / CONFIG_FILE).exists()):
        raise RunFolderError(
            f"{run_dir} exists and is not a caption_tf run folder (no {RUN_FILE} or {CONFIG_FILE}); nothing was written. "
            "Pick another --run-name or --runs-dir"
        )


def config_hash(cfg: Config) -> str:
    """Identity of a configuration as requested (before `auto` settings are resolved): 16 hex digits.

    Stored in run.json's phase markers, so its encoding (sorted-key JSON) must not change.

    Example:

    ```python
    config_hash(load_config("minimal")) == config_hash(load_config("minimal"))
    ```
    """
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ what a resumed run must match

RESUME_OVERRIDES = ("learning_rate", "clipnorm")  # a resume may change them (the NaN advice); run.json records it
# Config fields that do not change the training maths; `epochs` may grow (except under warmup_cosine).
# How the replicas come about (`cpu_replicas`, GPUs, workers) is neutral; their number is not (`RunIdentity.of`).
NEUTRAL_FIELDS = frozenset({
    "data_root", "data_dir", "download", "cache_dir", "extract_batch_size", "runs_dir", "run_name", "tune", "trials",
    "epochs", "early_stopping_patience", "jit", "cpu_replicas", "cluster_start_timeout", "fine_tune_layers", "fine_tune_epochs", "fine_tune_learning_rate",
    "fine_tune_batch_size", "checkpoint_every", "keep_checkpoints", "resume", "async_checkpoint", "max_restarts",
    "profile_batches", "tensorboard_images", "verbose",
    *RESUME_OVERRIDES,
})


class CheckpointMismatchError(ValueError):
    """A checkpoint made under other settings (config, vocabulary, feature cache)."""


def _flag(name: str, value: Any) -> str:
    """The command-line flag that sets config field `name` to `value` (`--no-tie-embeddings`, `--units 32`)."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _saved_grid_width(model: Mapping[str, Any]) -> Optional[int]:
    """The LSTM/GRU grid width a saved `model` section means: runs written before the width was
    saved (2026-11-29) have `feature_units: null`, which then meant `units`."""
    if model.get("feature_units") is None and model.get("decoder") != "transformer":
        return model.get("units")
    return model.get("feature_units")


def _saved_value(compat: Mapping[str, Any], section: str, name: str) -> Any:
    """A field of a checkpoint's `compat_config` as a flag would set it."""
    return _saved_grid_width(compat.get("model", {})) if name == "feature_units" else compat.get(section, {}).get(name)


def compat_config(cfg: Config) -> dict:
    """The config fields that change the training maths: what a resume must match."""
    kept = {s: {k: v for k, v in values.items() if k not in NEUTRAL_FIELDS}
            for s, values in cfg.to_dict().items() if isinstance(values, dict) and s != "eval"}
    if cfg.train.lr_schedule == "warmup_cosine":  # the decay is planned over all epochs
        kept["train"]["epochs"] = cfg.train.epochs
    return kept


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to be resumed, and the settings a resume may override."""

    config_hash: str
    vocab_hash: str
    feature_fingerprint: str
    config: dict
    settings: dict = dataclasses.field(default_factory=dict)
    # Checkpoints saved before the LSTM/GRU grid width was written out (2026-11-29) hashed
    # `feature_units: null`, which then meant `units`: they match a config asking for that width.
    legacy_config_hash: Optional[str] = None

    KEYS = ("config_hash", "vocab_hash", "feature_fingerprint")

    @classmethod
    def of(cls, cfg: Config, vocab_hash: str, feature_fingerprint: str, replicas: int = 1) -> "RunIdentity":
        """The identity of `cfg` trained on `replicas` replicas (devices and workers together)."""
        config = compat_config(cfg)
        # The global batch, so the steps per epoch and a checkpoint's data position, depend on the
        # replicas. Hashed only when > 1: one-device runs keep their identity; shown always, so a
        # refusal names the change ("--replicas 2 -> 1").
        with_replicas = lambda c: {**c, "train": {**c["train"], "replicas": replicas}}  # noqa: E731
        hashed = lambda c: stable_hash(with_replicas(c) if replicas != 1 else c)  # noqa: E731
        settings = {k: getattr(cfg.train, k) for k in RESUME_OVERRIDES}
        legacy = None
        if cfg.model.decoder != "transformer" and cfg.model.feature_units == cfg.model.units:
            legacy = hashed({**config, "model": {**config["model"], "feature_units": None}})
        return cls(hashed(config), vocab_hash, feature_fingerprint, with_replicas(config), settings, legacy)

    def metadata(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS} | {"compat_config": self.config, "resume_settings": self.settings}

    def check(self, saved: Mapping[str, Any], where: str) -> None:
        """Raise `CheckpointMismatchError` naming each difference and how to start fresh."""
        same = lambda k: saved.get(k) == getattr(self, k) or (k == "config_hash" and saved.get(k) == self.legacy_config_hash)  # noqa: E731
        differences = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {getattr(self, k)!r}" for k in self.KEYS if not same(k)]
        if not differences:
            return
        old, new = saved.get("compat_config") or {}, self.config
        names = [(s, name) for s in sorted(set(old) | set(new)) for name in sorted(set(old.get(s, {})) | set(new.get(s, {})))
                 if old.get(s, {}).get(name) != new.get(s, {}).get(name)]
        changed = [f"--{name.replace('_', '-')} {old.get(s, {}).get(name)!r} -> {new.get(s, {}).get(name)!r}" for s, name in names]
        # The checkpoint's own values as flags: what resumes it (e.g. after a default changed).
        fields = field_index()  # not `replicas`: the cluster, not a flag, sets it
        restore = [_flag(name, _saved_value(old, s, name)) for s, name in names if name in fields and _saved_value(old, s, name) is not None]
        raise CheckpointMismatchError(
            f"{where}: Refusing to resume: the checkpoint was made under different settings ({'; '.join(differences)})."
            + (f" Changed settings: {', '.join(changed)}." if changed else "")
            + (f" To resume it, add its settings: {' '.join(restore)}." if restore and len(restore) == len(names) else "")
            + f" To keep the old run and start over, rerun with --resume never (it is moved to <run>{OLD_RUN_SUFFIX}<time>)"
            " or pick another --run-name."
        )

    def overrides(self, saved: Mapping[str, Any]) -> dict:
        """{setting: [checkpoint's value, this run's]} for the allowed overrides that differ."""
        old = saved.get("resume_settings") or {}
        return {k: [old[k], v] for k, v in self.settings.items() if k in old and old[k] != v}


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


def trim_history(path: Path, first_epoch: int) -> None:
    """Drop the rows of epochs >= `first_epoch` (trained again) and any torn row from a CSVLogger file."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or "epoch" not in rows[0]:
        return
    column = rows[0].index("epoch")
    kept = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[column].isdigit() and int(r[column]) < first_epoch]
    if len(kept) < len(rows):
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows(kept if len(kept) > 1 else [])


# ------------------------------------------------------------------ the run-folder lock


class RunFolderLocked(RunFolderError):
    """Another process is training in this run folder."""


_HELD: dict[str, object] = {}  # lock path -> open file, for the locks this process holds (taking one again is a no-op)
LOCK_RESERVE_BYTES = 1 << 16  # padding of the lock file, given back so run.json can record a full-disk stop


@contextlib.contextmanager
def locked_run(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold `runs/<name>.lock` while training in `runs/<name>`: one training process per run folder.

    An exclusive `flock` that the kernel releases when its process dies, so the lock
    of a killed process is simply taken over; the file holds the holder's PID to
    name it, and 64 KiB of padding that `release_disk_reserve` gives back on a full
    disk. `enabled=False` (a multi-worker cluster's other workers) does nothing.

    Raises:
        RunFolderLocked: naming the process that holds it.
    """
    import fcntl  # POSIX; imported here so reading a run folder stays portable

    path = Path(str(run_dir) + LOCK_SUFFIX)
    key = str(path.resolve())
    if not enabled or key in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunFolderLocked(
            f"{run_dir} is in use: another training process (PID {holder}) holds {path}. "
            "Wait for it to finish or stop it, or train under another --run-name"
        ) from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous and previous != str(os.getpid()):
        print(f"Taking over the lock {path} of PID {previous}, which is no longer running", flush=True)
    handle.seek(0)
    handle.truncate()
    try:
        handle.write(f"{os.getpid()}\n" + "\n" * LOCK_RESERVE_BYTES)
        handle.flush()
    except OSError:
        handle.close()
        raise
    _HELD[key] = handle
    try:
        yield
    finally:
        del _HELD[key]
        handle.seek(0)
        handle.truncate()  # an empty lock file: nobody holds it
        handle.close()  # releases the flock


def release_disk_reserve(run_dir: str | Path) -> None:
    """Give back the lock file's padding (a full disk: run.json must still record why training stopped)."""
    handle = _HELD.get(str(Path(str(run_dir) + LOCK_SUFFIX).resolve()))
    if handle is not None:
        handle.truncate(len(f"{os.getpid()}\n"))


# ------------------------------------------------------------------ a trained run


@dataclass
class Run:
    """A finished (or resumable) run loaded from disk."""

    directory: Path
    config: Config
    vocab: CaptionVocabulary
    info: dict
    model: object = None

    def generator(self, jit_compile: bool = False, no_repeat_ngram: Optional[int] = None, block_repeated_mentions: Optional[bool] = None):
        """The run's `CaptionGenerator`; `no_repeat_ngram` / `block_repeated_mentions` None: the run's `eval` settings."""
        from caption_tf.models.decoding import CaptionGenerator  # TensorFlow: only when decoding

        ev = self.config.eval
        return CaptionGenerator.for_vocabulary(
            self.model, self.vocab, jit_compile=jit_compile,
            no_repeat_ngram=ev.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram,
            block_repeated_mentions=ev.block_repeated_mentions if block_repeated_mentions is None else block_repeated_mentions,
        )


def weights_problem(run_dir: Path, info: dict) -> Optional[str]:
    """Why the run's model.weights.h5 cannot be used (missing, or not the file training wrote), or None."""
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.exists():
        return f"{path} is missing"
    if info.get("weights_sha256") and file_sha256(path) != info["weights_sha256"]:
        return f"{path} is damaged (its SHA-256 differs from the one training recorded in {RUN_FILE}; truncated or overwritten?)"
    return None


def record_weights(run_dir: Path, **changes) -> dict:
    """Update run.json with `changes` and the SHA-256 of the model.weights.h5 just published."""
    return update_run_info(run_dir, weights_sha256=file_sha256(Path(run_dir) / WEIGHTS_FILE), **changes)


def _check_decoder_layout(run_dir: Path) -> None:
    """Raise a `RunFolderError` for a run trained by the decoder of an earlier caption_tf version."""
    with open(run_dir / CONFIG_FILE) as fh:
        model = (yaml.safe_load(fh) or {}).get("model") or {}
    if CURRENT_DECODER_FIELD not in model:
        raise RunFolderError(
            f"{run_dir}: trained by an earlier version of caption_tf's decoder ({run_dir / CONFIG_FILE} has no "
            f"model.{CURRENT_DECODER_FIELD}), whose weights this version cannot load. Train it again with this version "
            "(train.py with a new --run-name), or evaluate it with the caption_tf version that trained it"
        )


def load_run(run_dir: str | Path, with_model: bool = True) -> Run:
    """Reload config, vocabulary and (optionally) the trained decoder of a run folder.

    Raises:
        RunFolderError: naming a damaged file (run.json, model.weights.h5) and the way back.
    """
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, VOCAB_FILE, RUN_FILE):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name}: missing; is {run_dir} a caption_tf run folder?")
    cfg = load_saved_config(run_dir / CONFIG_FILE)
    cfg.model.feature_units = _saved_grid_width(dataclasses.asdict(cfg.model))
    vocab = CaptionVocabulary.load(run_dir / VOCAB_FILE)
    run = Run(run_dir, cfg, vocab, read_run_info(run_dir))
    if with_model:
        from caption_tf.models.decoder import build_decoder  # TensorFlow: only when a model is wanted

        weights = run_dir / WEIGHTS_FILE
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: no trained weights; has training finished? (rerun train.py to resume)")
        _check_decoder_layout(run_dir)
        rewrite = "Rerun the train.py command that made this run: it writes the weights again from the run's newest verified checkpoint"
        problem = weights_problem(run_dir, run.info)
        if problem:
            raise RunFolderError(f"{problem}. {rewrite}")
        run.model = build_decoder(cfg.model, vocab.size, tuple(run.info["grid_shape"]), vocab.max_length)
        try:
            run.model.load_weights(weights)
        except (OSError, ValueError) as err:  # h5py: truncated or not an HDF5 file
            raise RunFolderError(f"{weights} cannot be read ({err}). {rewrite}") from None
    return run
