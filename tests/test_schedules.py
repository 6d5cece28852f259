"""Learning-rate schedules, plateau, validation BLEU and early stopping in real (tiny) fits."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest
from conftest import tiny_overrides

from caption_tf.config import TrainConfig, load_config
from caption_tf.training.schedules import (
    WarmupCosine,
    early_stopping,
    learning_rate_for,
    schedule_callbacks,
)


def test_warmup_cosine_shape_and_config_round_trip():
    schedule = WarmupCosine(peak=1e-3, warmup_steps=10, total_steps=110)
    rates = np.array([float(schedule(s)) for s in range(111)])
    assert rates[0] == pytest.approx(1e-4)  # first update already moves: (0+1)/10 of the peak
    assert np.all(np.diff(rates[:10]) > 0)
    assert rates[10] == pytest.approx(1e-3)
    assert rates[60] == pytest.approx(5e-4, rel=1e-4)  # half-way through the cosine
    assert np.all(np.diff(rates[10:]) <= 1e-12) and rates[110] == pytest.approx(0.0, abs=1e-9)
    clone = WarmupCosine.from_config(schedule.get_config())
    assert float(clone(37)) == pytest.approx(float(schedule(37)))
    with pytest.raises(ValueError):
        WarmupCosine(1e-3, warmup_steps=1, total_steps=0)


def test_learning_rate_for_each_schedule():
    assert learning_rate_for(TrainConfig(learning_rate=2e-3), steps_per_epoch=7, replicas=2) == pytest.approx(4e-3)
    schedule = learning_rate_for(TrainConfig(lr_schedule="warmup_cosine", learning_rate=1e-3, epochs=4, warmup_epochs=0.5), 10)
    assert isinstance(schedule, WarmupCosine) and schedule.total_steps == 40 and schedule.warmup_steps == 5
    plateau = schedule_callbacks(TrainConfig(lr_schedule="plateau"))
    assert any(isinstance(c, keras.callbacks.ReduceLROnPlateau) for c in plateau)
    with pytest.raises(ValueError, match="validation split"):
        schedule_callbacks(TrainConfig(lr_schedule="plateau"), has_validation=False)
    with pytest.raises(ValueError, match="val_bleu4"):
        schedule_callbacks(TrainConfig(early_stopping_monitor="val_bleu4"))
    (stop,) = early_stopping(TrainConfig(early_stopping_patience=2, early_stopping_monitor="val_bleu4"))
    assert stop.monitor == "val_bleu4" and stop.mode == "max" and stop.restore_best_weights


def read_history(run_dir):
    with open(run_dir / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_fit_logs_cosine_learning_rate_and_val_bleu4_for_early_stopping(tmp_path):
    from caption_tf.evaluation.metrics import corpus_bleu_scores
    from caption_tf.training.trainer import train

    cfg = load_config(
        "minimal",
        tiny_overrides(
            tmp_path,
            num_images=30,
            epochs=3,
            lr_schedule="warmup_cosine",
            warmup_epochs=1,
            early_stopping_monitor="val_bleu4",
            early_stopping_patience=5,
        ),
    )
    run_dir = train(cfg, bleu=corpus_bleu_scores)
    rows = read_history(run_dir)
    assert len(rows) == 3
    bleu = [float(r["val_bleu4"]) for r in rows]
    assert all(0.0 <= b <= 1.0 for b in bleu)
    rates = [float(r["learning_rate"]) for r in rows]
    # Logged at each epoch end: after warmup (peak) the cosine only goes down.
    assert rates[0] == pytest.approx(cfg.train.learning_rate, rel=0.05)
    assert rates[0] > rates[1] > rates[2] >= 0
    assert (run_dir / "logs").is_dir()
