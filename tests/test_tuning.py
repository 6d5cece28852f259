"""A 2-trial keras-tuner search on tiny cached features writes a loadable preset and a table."""

from __future__ import annotations

import csv
import math

import pytest
import tensorflow as tf
from conftest import tiny_overrides

from caption_tf.config import load_config
from caption_tf.training.trainer import prepare_data
from caption_tf.training.tuning import BATCH_SIZES, UNITS, max_length_choices, tune


def test_max_length_choices_surround_the_configured_length():
    assert max_length_choices(16) == [12, 16, 20]
    assert max_length_choices(4) == [4, 5]


def test_two_trial_search_writes_a_loadable_best_preset_and_results(tmp_path):
    cfg = load_config("minimal", tiny_overrides(tmp_path, num_images=30, tune=True, trials=2, max_length=8))
    result = tune(cfg)
    with open(result.results_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and result.objective == "val_loss"
    assert float(rows[0]["val_loss"]) <= float(rows[1]["val_loss"])  # best first
    assert float(rows[0]["val_loss"]) == round(result.best_score, 5)
    best = load_config(str(result.best_preset))
    assert best.train.tune is False and best.train.batch_size in BATCH_SIZES and best.model.units in UNITS
    assert best.model.units == int(rows[0]["units"]) and best.text.max_length == int(rows[0]["max_length"])
    assert best.data.num_images == 30  # the rest of the configuration is kept
    assert best.model.feature_units is None  # not pinned to the first width: the grid follows embedding_dim
    assert result.results_markdown.read_text().count("\n") == 4  # header, rule, 2 trials
    assert (result.directory / "search").is_dir()

    # TensorBoard: each trial's HParams record and val loss curve, for the HParams dashboard.
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata

    pairs = int(prepare_data(cfg).captions("train")[1].sum())  # the cached data's captions the trials trained on
    for row in rows:
        logs = result.directory / "logs" / f"trial_{row['trial']}"
        acc = event_accumulator.EventAccumulator(str(logs))
        acc.Reload()
        info = metadata.parse_session_start_info_plugin_data(acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
        assert info.hparams["units"].number_value == int(row["units"]) and info.hparams["attention"].string_value == row["attention"]
        assert info.hparams["learning_rate"].number_value == pytest.approx(float(row["learning_rate"]))
        val = event_accumulator.EventAccumulator(str(logs / "validation"), size_guidance={event_accumulator.TENSORS: 0})
        val.Reload()
        (loss,) = val.Tensors("epoch_loss")  # --epochs 1
        assert float(tf.make_ndarray(loss.tensor_proto)) == pytest.approx(float(row["val_loss"]), abs=1e-5)
        (after_steps,) = val.Tensors("evaluation_loss_vs_iterations")
        assert after_steps.step == math.ceil(pairs / int(row["batch_size"]))  # at the trial's optimizer steps

