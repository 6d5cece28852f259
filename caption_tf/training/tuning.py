"""Hyperparameter search with keras-tuner's BayesianOptimization on cached features.

`python train.py --tune --trials K` runs K trials (each: build a decoder with
the trial's settings, train it for `--epochs` on the feature cache, score it
on the validation split) and writes, under `<runs-dir>/tuning/<run name>/`:

    best.yaml        the best configuration as a preset: `train.py --preset <path>`
    results.csv      one row per trial: its settings and objective, best first
    results.md       the same as a Markdown table
    search/          keras-tuner's own state (reused: rerunning continues the search)
    logs/trial_<id>/ TensorBoard: each trial's curves and its HParams record, so the HParams
                     dashboard (`tensorboard --logdir runs`) compares the trials with the runs

The objective is `--early-stopping-monitor`: `val_loss` (minimised, the
default) or `val_bleu4` (maximised; greedy decoding of the validation split
each epoch). BayesianOptimization (not Hyperband) because `--trials` then is
exactly the number of models trained, and the search space mixes a log-scale
float with categorical choices, which its Gaussian process handles.

Example:

```python
result = tune(load_config("minimal", {"tune": True, "trials": 10}))
load_config(str(result.best_preset)).model.units
```
"""

from __future__ import annotations

import copy
import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras_tuner as kt
import yaml

from caption_tf.config import Config
from caption_tf.data.text import CaptionVocabulary
from caption_tf.files import atomic_path, write_text
from caption_tf.run_folder import default_run_name
from caption_tf.training import summaries
from caption_tf.training.runtime import setup_runtime
from caption_tf.training.schedules import BLEU_MONITOR, BleuFunction, monitor_mode, schedule_callbacks
from caption_tf.training.trainer import build_model, make_split_dataset, prepare_data, validation_bleu

TUNING_DIR = "tuning"
SEARCH_PROJECT = "search"
TRIAL_LOGS = "logs"
BEST_PRESET, RESULTS_CSV, RESULTS_MD = "best.yaml", "results.csv", "results.md"

# The search space (name -> choices or range); max_length choices come from the configured length.
LEARNING_RATE_RANGE = (1e-4, 1e-2)  # log-uniform
BATCH_SIZES = [16, 32, 64, 128]
UNITS = [64, 128, 256, 384]
EMBEDDING_DIMS = [32, 64, 128, 256]
DROPOUT_RANGE, DROPOUT_STEP = (0.0, 0.5), 0.1
ATTENTIONS = ["bahdanau", "luong"]
MAX_LENGTH_FACTORS = (0.75, 1.0, 1.25)  # x the configured (or auto) max length
MIN_TUNED_MAX_LENGTH = 4


@dataclass
class TuningResult:
    directory: Path
    best_preset: Path
    results_csv: Path
    results_markdown: Path
    best_score: float
    objective: str


def max_length_choices(base: int) -> list[int]:
    """Caption lengths to try around `base`.

    Example:

    >>> max_length_choices(16)
    [12, 16, 20]
    """
    return sorted({max(MIN_TUNED_MAX_LENGTH, round(base * f)) for f in MAX_LENGTH_FACTORS})


def trial_config(cfg: Config, hp: kt.HyperParameters) -> Config:
    """`cfg` with the trial's hyperparameters (declared in `hp` on first use)."""
    trial = copy.deepcopy(cfg)
    trial.train.learning_rate = hp.Float("learning_rate", *LEARNING_RATE_RANGE, sampling="log")
    trial.train.batch_size = hp.Choice("batch_size", BATCH_SIZES)
    trial.model.units = hp.Choice("units", UNITS)
    trial.model.embedding_dim = hp.Choice("embedding_dim", EMBEDDING_DIMS)
    trial.model.dropout = hp.Float("dropout", *DROPOUT_RANGE, step=DROPOUT_STEP)
    trial.model.attention = hp.Choice("attention", ATTENTIONS)
    trial.text.max_length = hp.Choice("max_length", max_length_choices(cfg.text.max_length))
    trial.train.tune = False
    return trial


class CaptionTuner(kt.BayesianOptimization):
    """BayesianOptimization whose trial trains a `CaptionDecoder` on prepared (cached) data."""

    def __init__(self, cfg: Config, data, runtime, bleu: Optional[BleuFunction], log_dir: Optional[Path] = None, **kwargs):
        monitor = cfg.train.early_stopping_monitor
        super().__init__(objective=kt.Objective(monitor, monitor_mode(monitor)), **kwargs)
        self.cfg, self.data, self.runtime, self.bleu, self.log_dir = cfg, data, runtime, bleu, log_dir

    def run_trial(self, trial, *args, **kwargs):
        cfg = trial_config(self.cfg, trial.hyperparameters)
        # Same words, another caption length: only the token tables change.
        data = dataclasses.replace(self.data, vocab=CaptionVocabulary(self.data.vocab.tokens, cfg.text.max_length))
        train_ds = make_split_dataset(data, "train", cfg, self.runtime, training=True)
        val_ds = make_split_dataset(data, "val", cfg, self.runtime, training=False)
        model = build_model(cfg, data, self.runtime, steps_per_epoch=int(train_ds.cardinality()))
        bleu = validation_bleu(data, cfg, self.bleu) if cfg.train.early_stopping_monitor == BLEU_MONITOR else None
        callbacks = schedule_callbacks(cfg.train, bleu, has_validation=True)
        if self.log_dir is not None:  # a rerun trial starts its curves again
            trial_dir = self.log_dir / f"trial_{trial.trial_id}"
            summaries.trim_events(trial_dir, 0, -1)
            hparams = summaries.run_hparams(cfg, data.vocab.size, self.runtime.replicas, self.runtime.precision)
            summaries.write_hparams(trial_dir, hparams, trial_id=f"{self.log_dir.parent.name}/trial_{trial.trial_id}")
            callbacks.append(summaries.TensorBoard(trial_dir, summaries.SummaryAxis(step=lambda: int(model.optimizer.iterations))))
        history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs, callbacks=callbacks, shuffle=False, verbose=2)
        values = history.history[self.oracle.objective.name]
        best = max(values) if self.oracle.objective.direction == "max" else min(values)
        return {self.oracle.objective.name: float(best)}


def results_rows(tuner: kt.Tuner) -> list[dict]:
    """One row per finished trial, best first."""
    rows = []
    for trial in tuner.oracle.trials.values():
        if trial.score is None:
            continue
        rows.append({"trial": trial.trial_id, tuner.oracle.objective.name: round(trial.score, 5), **trial.hyperparameters.values})
    return sorted(rows, key=lambda r: r[tuner.oracle.objective.name], reverse=tuner.oracle.objective.direction == "max")


def write_results(rows: list[dict], csv_path: Path, md_path: Path) -> None:
    columns = list(rows[0]) if rows else ["trial"]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |" for r in rows]
    write_text(md_path, "\n".join(lines) + "\n")


def write_preset(cfg: Config, path: Path, note: str) -> None:
    """A configs/-style YAML preset of a full configuration."""
    body = {name: values for name, values in cfg.to_dict().items() if name != "preset"}
    write_text(path, f"# {note}\n" + yaml.safe_dump(body, sort_keys=False))


def tune(cfg: Config, bleu: Optional[BleuFunction] = None) -> TuningResult:
    """Run `cfg.train.trials` BayesianOptimization trials; write best.yaml and the results table.

    Example:

    ```python
    tune(load_config("minimal", {"trials": 2, "epochs": 1})).best_preset
    ```
    """
    if cfg.train.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {cfg.train.trials}")
    if cfg.train.early_stopping_monitor == BLEU_MONITOR and bleu is None:
        raise ValueError("tuning on val_bleu4 needs a BLEU scorer (train.py passes one)")
    runtime = setup_runtime(cfg.train)
    data = prepare_data(cfg, runtime.replicas)
    requested_grid_width = cfg.model.feature_units
    cfg = data.config  # resolved: `auto` settings derived from the data
    # ...but the grid width as asked: with none given, each trial's grid follows its embedding_dim.
    cfg.model.feature_units = requested_grid_width
    if not data.cache.image_ids("val"):
        raise ValueError("--tune scores trials on the validation split, and this dataset has none (--val-fraction)")
    directory = Path(cfg.train.runs_dir) / TUNING_DIR / (cfg.train.run_name or default_run_name(cfg))
    directory.mkdir(parents=True, exist_ok=True)
    tuner = CaptionTuner(
        cfg, data, runtime, bleu, directory / TRIAL_LOGS, max_trials=cfg.train.trials, seed=cfg.train.seed, directory=str(directory), project_name=SEARCH_PROJECT
    )
    tuner.search()
    best_hp = tuner.get_best_hyperparameters(1)[0]
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best_cfg = trial_config(cfg, best_hp)
    objective = tuner.oracle.objective.name
    result = TuningResult(
        directory, directory / BEST_PRESET, directory / RESULTS_CSV, directory / RESULTS_MD, float(best_trial.score), objective
    )
    write_preset(best_cfg, result.best_preset, f"best of {len(tuner.oracle.trials)} keras-tuner BayesianOptimization trials: {objective} {best_trial.score:.4f}")
    write_results(results_rows(tuner), result.results_csv, result.results_markdown)
    print(f"Tuning: best {objective} {best_trial.score:.4f}; preset {result.best_preset}; table {result.results_markdown}", flush=True)
    return result
