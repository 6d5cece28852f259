"""Learning-rate schedules, plateau, validation BLEU and early stopping in real (tiny) fits."""

from __future__ import annotations

import csv
import math

import keras
import numpy as np
import pytest
from conftest import tiny_overrides

from caption_tf.config import TrainConfig, load_config
from caption_tf.training.schedules import early_stopping, learning_rate_for, schedule_callbacks, warmup_cosine


def hand_written_warmup_cosine(step, peak, warmup_steps, total_steps, floor=0.0):
    """The schedule this project used before Keras' CosineDecay (kept here to compare against)."""
    warm = peak * min(step + 1, warmup_steps) / max(warmup_steps, 1)
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    cosine = peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return warm if step < warmup_steps else cosine


@pytest.mark.parametrize("warmup_steps,total_steps,floor", [(10, 110, 0.0), (0, 50, 0.0), (7, 40, 0.1), (5, 5, 0.0)])
def test_warmup_cosine_is_keras_cosine_decay_and_matches_the_old_formula(warmup_steps, total_steps, floor):
    peak = 1e-3
    schedule = warmup_cosine(peak, warmup_steps, total_steps, floor)
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    steps = range(total_steps + 20)
    rates = np.array([float(schedule(s)) for s in steps])
    old = np.array([hand_written_warmup_cosine(s, peak, warmup_steps, total_steps, floor) for s in steps])
    # The same first rate (peak / warmup: the first update moves), the same peak and cosine after warmup ...
    np.testing.assert_allclose(rates[0], old[0], rtol=1e-6)
    np.testing.assert_allclose(rates[warmup_steps:], old[warmup_steps:], rtol=1e-5, atol=1e-6 * peak)  # float32
    # ... and a linear warmup between: Keras' reaches the peak one step later than the old one did.
    if warmup_steps > 1:
        np.testing.assert_allclose(np.diff(rates[: warmup_steps + 1]), (peak - peak / warmup_steps) / warmup_steps, rtol=1e-4)
    assert rates[-1] == pytest.approx(floor * peak, abs=1e-6 * peak)
    clone = keras.optimizers.schedules.CosineDecay.from_config(schedule.get_config())
    assert float(clone(3)) == float(schedule(3))
    with pytest.raises(ValueError, match="total_steps >= 1"):
        warmup_cosine(1e-3, warmup_steps=1, total_steps=0)


def test_learning_rate_for_each_schedule():
    assert learning_rate_for(TrainConfig(learning_rate=2e-3), steps_per_epoch=7, replicas=2) == pytest.approx(4e-3)
    schedule = learning_rate_for(TrainConfig(lr_schedule="warmup_cosine", learning_rate=1e-3, epochs=4, warmup_epochs=0.5), 10, replicas=2)
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay) and schedule.warmup_target == pytest.approx(2e-3)
    assert schedule.warmup_steps == 5 and schedule.decay_steps == 35  # 4 epochs x 10 steps, the first 5 warm up
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


def saved_model_val_bleu4(run_dir) -> float:
    """Validation BLEU-4 of the run's saved model, computed the way evaluate.py computes test BLEU."""
    from caption_tf.data.datasets import load_dataset
    from caption_tf.evaluation.captioning import caption_split, open_run_cache, references_for
    from caption_tf.evaluation.metrics import corpus_bleu_scores
    from caption_tf.run_folder import load_run

    run = load_run(run_dir)
    dataset = load_dataset(run.config.data)
    generated = caption_split(run, open_run_cache(run, dataset), "val")
    return corpus_bleu_scores(references_for(dataset, generated.image_ids), generated.captions)["bleu4"]


def test_fit_logs_the_cosine_learning_rate_and_each_epochs_validation_bleu(tmp_path):
    from caption_tf.evaluation.metrics import corpus_bleu_scores
    from caption_tf.training.trainer import train

    # --no-repeat-ngram 1 (no word twice) changes the tiny model's captions: the per-epoch BLEU must decode like evaluate.py.
    cfg = load_config("minimal", tiny_overrides(tmp_path, num_images=30, epochs=3, lr_schedule="warmup_cosine", warmup_epochs=1,
                                                no_repeat_ngram=1))
    run_dir = train(cfg, bleu=corpus_bleu_scores)
    rows = read_history(run_dir)
    assert len(rows) == 3
    # val_bleu4 is the BLEU of the model as it was at that epoch's end, decoded as the run decodes: the last one is the saved model's.
    assert float(rows[-1]["val_bleu4"]) == pytest.approx(saved_model_val_bleu4(run_dir), abs=1e-12)
    rates = [float(r["learning_rate"]) for r in rows]
    # Logged at each epoch end: after warmup (peak) the cosine only goes down.
    assert rates[0] == pytest.approx(cfg.train.learning_rate, rel=0.05)
    assert rates[0] > rates[1] > rates[2] >= 0
    assert (run_dir / "logs").is_dir()


def epoch_end_weights(run_dir) -> dict[int, list[np.ndarray]]:
    """{epoch: the model variables of its end-of-epoch checkpoint}, from the verified checkpoints on disk."""
    import json

    import tensorflow as tf

    weights = {}
    for manifest in (run_dir / "checkpoints").glob("ckpt-*.manifest.json"):
        meta = json.loads(manifest.read_text())["metadata"]
        if meta["batch"] == meta["steps_per_epoch"]:
            reader = tf.train.load_checkpoint(str(manifest).removesuffix(".manifest.json"))
            count = sum(1 for key in reader.get_variable_to_shape_map() if key.startswith("model/"))
            weights[meta["epoch"]] = [reader.get_tensor(f"model/{i}/.ATTRIBUTES/VARIABLE_VALUE") for i in range(count)]
    return weights


def test_early_stopping_fires_and_restores_the_best_epochs_weights(tmp_path):
    from caption_tf.evaluation.metrics import corpus_bleu_scores
    from caption_tf.run_folder import load_run
    from caption_tf.training.trainer import train

    epochs, patience = 6, 1
    # Learning rate 0.1: validation BLEU of the tiny decoder stops improving within a few epochs.
    cfg = load_config("minimal", tiny_overrides(tmp_path, epochs=epochs, learning_rate=0.1, checkpoint_every=0, keep_checkpoints=epochs,
                                                early_stopping_monitor="val_bleu4", early_stopping_patience=patience))
    run_dir = train(cfg, bleu=corpus_bleu_scores)
    bleu = [float(r["val_bleu4"]) for r in read_history(run_dir)]
    best = int(np.argmax(bleu))
    assert len(bleu) == best + 1 + patience < epochs, bleu  # stopped `patience` epochs after the best, before the last
    model = load_run(run_dir).model
    # The checkpoint holds model.variables in order; the weights are those variables minus RNG states.
    weight_ids = {id(w) for w in model.weights}
    indices = [i for i, v in enumerate(model.variables) if id(v) in weight_ids]
    saved = [np.asarray(model.variables[i]) for i in indices]
    at_epoch_end = {epoch: [values[i] for i in indices] for epoch, values in epoch_end_weights(run_dir).items()}
    assert sorted(at_epoch_end) == list(range(len(bleu))) and len(saved) == len(model.weights) > 10
    for weight, best_weight in zip(saved, at_epoch_end[best], strict=True):
        np.testing.assert_array_equal(weight, best_weight)
    assert any(not np.array_equal(w, last) for w, last in zip(saved, at_epoch_end[len(bleu) - 1]))
    assert saved_model_val_bleu4(run_dir) == pytest.approx(bleu[best], abs=1e-12) and bleu[best] > bleu[-1]
