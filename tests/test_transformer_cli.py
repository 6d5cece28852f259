"""The Transformer decoder through the user's commands: train.py killed mid-run and rerun ends with
exactly the weights of an uninterrupted run; evaluate.py reports it (attention maps, repetition rate)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from caption_tf.config import load_config, load_saved_config
from caption_tf.data.text import DETERMINERS, FUNCTION_WORDS
from caption_tf.evaluation.errors import repeated_phrases
from caption_tf.training.trainer import prepare_data
from caption_tf.training.faults import CRASH_AFTER_BATCHES_ENV
from conftest import REPO_ROOT, repeated_mentions, tiny_overrides, h5_arrays, cli_flags

# Batches of whole images (`--group-by-image`, the pairs path resumes in test_kill_resume.py): batch 16
# captions = 3 images of 5, 32 training images = 11 batches per epoch; checkpoints every 3.
CRASH_AFTER_BATCHES = 7


def _train(overrides, cwd, env=None):
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--preset", "minimal", *cli_flags(overrides)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_transformer_resumes_exactly_after_a_kill_and_is_evaluated(tmp_path):
    # Dropout on: the resumed run must also replay the dropout masks; the penalty and label smoothing on too.
    model = {"decoder": "transformer", "num_layers": 1, "num_heads": 2, "dropout": 0.2, "attention_penalty": 0.5,
             "label_smoothing": 0.1, "tie_embeddings": True, "no_repeat_ngram": 3, "group_by_image": True}
    overrides = tiny_overrides(tmp_path, epochs=2, checkpoint_every=3, **model)
    # The feature cache is built first, once (as in test_kill_resume): measured here, a run that
    # builds the cache does not train bit for bit like a later run that reuses it.
    prepare_data(load_config("minimal", overrides))
    reference = _train({**overrides, "run_name": "uninterrupted"}, tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "11/11" in reference.stdout  # whole images: 11 batches per epoch (pairs would be 10)

    crashed = _train({**overrides, "run_name": "killed"}, tmp_path, env={CRASH_AFTER_BATCHES_ENV: str(CRASH_AFTER_BATCHES)})
    assert crashed.returncode == -9, crashed.stderr[-3000:]  # SIGKILL after 7 batches (checkpoint at 6)
    resumed = _train({**overrides, "run_name": "killed"}, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resum" in resumed.stdout.lower()

    runs = tmp_path / "runs"
    expected, actual = h5_arrays(runs / "uninterrupted" / "model.weights.h5"), h5_arrays(runs / "killed" / "model.weights.h5")
    assert expected.keys() == actual.keys() and any("decoder_layers/" in k for k in expected)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    history = (runs / "killed" / "history.csv").read_text().splitlines()
    assert "attention_penalty" in history[0] and len(history) == 3  # header + 2 epochs

    report_dir = tmp_path / "report"
    command = [sys.executable, str(REPO_ROOT / "evaluate.py"), "--run", str(runs / "killed"), "--out", str(report_dir),
               "--no-meteor", "--no-resources", "--no-embeddings"]
    evaluated = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((report_dir / "metrics.json").read_text())
    run = report["runs"]["killed"]
    metrics = json.loads((runs / "killed" / "metrics.json").read_text())
    assert run["greedy"]["scores"]["bleu4"] == metrics["greedy"]["bleu4"]  # the same model, the same captions
    for decoding in ("greedy", "beam"):
        row, captions = report["comparison"][decoding]["killed"], run[decoding]["captions"].values()
        assert row["repetition_rate"] == np.mean([bool(repeated_phrases(c)) for c in captions])
        assert "attention_in_box_colour" in row
        # Each head's map, scored alike: the last layer's heads average to the head-averaged map's score.
        localised = run[decoding]["localisation"]
        assert [(h["layer"], h["head"]) for h in localised["by_head"]] == [(0, 0), (0, 1)]  # 1 layer x 2 heads
        for kind, values in localised["by_type"].items():
            assert np.mean([h[kind] for h in localised["by_head"]]) == pytest.approx(values["mass_in_box"], abs=1e-5), kind
        # --no-repeat-ngram 3 held: no caption repeats a 3-word phrase; nor a mention (the default ban).
        for caption in captions:
            words = caption.split()
            grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
            assert len(grams) == len(set(grams)), caption
            assert not repeated_mentions(words, FUNCTION_WORDS, DETERMINERS), caption
    assert run["decoding"]["block_repeated_mentions"] is True
    assert list((report_dir / "figures").glob("*attention*.png"))
    assert "each head of each decoder layer" in (report_dir / "report.html").read_text()


def test_encoder_registers_and_readout_attention_train_and_caption_through_the_cli(tmp_path):
    # `train.py --registers 2 --encoder-layers 1 --encoder-registers --readout-attention`, then `evaluate.py`:
    # the registers are the grid encoder's weight (encoded with the cells), the readout attention one
    # more of the decoder's, and the report scores the trained model.
    model = {"decoder": "transformer", "num_layers": 1, "num_heads": 2, "registers": 2, "encoder_layers": 1,
             "encoder_registers": True, "readout_attention": True, "run_name": "ereg"}
    trained = _train(tiny_overrides(tmp_path, **model), tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ereg"
    saved = load_saved_config(run_dir / "config.yaml").model
    assert saved.encoder_registers is True and saved.readout_attention is True
    weights = h5_arrays(run_dir / "model.weights.h5")
    assert weights["layers/multi_head_attention/query_dense/vars/0"].shape == (16, 1, 16)  # the readout: one head as wide as the model
    assert weights["grid_encoder/vars/0"].shape == (2, 16)  # the registers, at the model width
    assert "vars/0" not in weights  # no constant registers after the encoder
    report_dir = tmp_path / "report"
    command = [sys.executable, str(REPO_ROOT / "evaluate.py"), "--run", str(run_dir), "--out", str(report_dir),
               "--no-meteor", "--no-resources", "--no-embeddings", "--no-retrieval"]
    evaluated = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((report_dir / "metrics.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert report["runs"]["ereg"]["greedy"]["scores"]["bleu4"] == metrics["greedy"]["bleu4"]
