"""Scheduled sampling (`--scheduled-sampling P`, Bahdanau): in training, a caption goes on from the
decoder's own previous word with probability P (after a ramp), as greedy decoding does."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_tf.config import load_config, load_saved_config
from caption_tf.models.decoder import CaptionDecoder
from caption_tf.training.faults import CRASH_AFTER_BATCHES_ENV
from caption_tf.training.optimizers import FusedAdam
from caption_tf.training.trainer import prepare_data
from conftest import REPO_ROOT, tiny_overrides, h5_arrays, cli_flags


def _model(**kwargs):
    keras.utils.set_random_seed(3)
    model = CaptionDecoder(vocab_size=20, embedding_dim=8, units=16, decoder="gru", attention="bahdanau", **kwargs)
    grid, tokens = keras.random.normal((4, 9, 12), seed=1), keras.random.randint((4, 7), 1, 20, seed=2)
    model((grid, tokens))
    return model, grid, tokens


def test_at_probability_one_training_feeds_the_greedy_words():
    model, grid, tokens = _model(scheduled_sampling=1.0)
    trained = model((grid, tokens), training=True)  # no ramp, no optimizer: the full probability
    # Greedy decoding from the same first word, one step at a time: the same logits at every step.
    values, keys, state = model.encode(grid)
    word, greedy = tokens[:, 0], []
    for _ in range(tokens.shape[1]):
        logits, state, _ = model.step(word, state, values, keys)
        greedy.append(logits)
        word = tf.argmax(logits, -1, output_type=tf.int32)
    np.testing.assert_allclose(trained, tf.stack(greedy, 1), atol=1e-5)
    # Only the first reference word was read; teacher forcing (inference) reads them all.
    changed = tf.concat([tokens[:, :1], (tokens[:, 1:] + 5) % 20], 1)
    np.testing.assert_array_equal(model((grid, changed), training=True), trained)
    assert not np.allclose(model((grid, changed)), model((grid, tokens)))


def test_the_probability_ramps_with_the_optimizer_steps_then_holds():
    model, grid, tokens = _model(scheduled_sampling=0.4, sampling_ramp_steps=10)
    model.compile(optimizer=FusedAdam(1e-3))
    probabilities = []
    for step in (0, 4, 9, 30):
        model.optimizer.iterations.assign(step)
        probabilities.append(float(model.sampling_probability()))
    np.testing.assert_allclose(probabilities, [0.04, 0.2, 0.4, 0.4], rtol=1e-6)
    # Teacher forcing at probability ~0: the words fed are the references (the first step draws p = 0.04).
    model.optimizer.iterations.assign(-1)
    np.testing.assert_allclose(model((grid, tokens), training=True), model((grid, tokens)), atol=1e-6)
    assert CaptionDecoder(vocab_size=20).sampling_probability() is None  # off by default


@pytest.mark.parametrize("overrides, fragment", [
    ({"decoder": "transformer"}, "transformer"),
    ({"attention": "luong"}, "lstm + luong"),
    ({"recompute_grad": True}, "recompute_grad=True"),
    ({"scheduled_sampling": 1.5}, "got 1.5"),
])
def test_scheduled_sampling_is_refused_where_the_decoder_reads_whole_captions(overrides, fragment):
    with pytest.raises(ValueError, match="--scheduled-sampling must be in \\(0, 1\\]") as error:
        load_config("minimal", {"decoder": "lstm", "attention": "bahdanau", "scheduled_sampling": 0.25, **overrides})  # validates
    assert fragment in str(error.value)


def test_train_py_with_scheduled_sampling_resumes_exactly_after_a_kill(tmp_path):
    # The coins and the ramp must survive a SIGKILL: the sampling seed is a checkpointed model
    # variable and the ramp reads the optimizer's step counter.
    overrides = tiny_overrides(tmp_path, decoder="gru", epochs=2, checkpoint_every=3, scheduled_sampling=0.5, dropout=0.2)
    prepare_data(load_config("minimal", overrides))  # the cache first, once (as test_kill_resume.py)
    flags = cli_flags(overrides)

    def train(name, env=None):
        command = [sys.executable, str(REPO_ROOT / "train.py"), "--preset", "minimal", *flags, "--run-name", name]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})

    reference = train("uninterrupted")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert train("killed", {CRASH_AFTER_BATCHES_ENV: "7"}).returncode == -9  # SIGKILL after 7 batches (checkpoint at 6)
    resumed = train("killed")
    assert resumed.returncode == 0 and "Resuming from" in resumed.stdout, resumed.stderr[-3000:]
    runs = tmp_path / "runs"
    assert load_saved_config(runs / "killed" / "config.yaml").model.scheduled_sampling == 0.5
    expected, actual = h5_arrays(runs / "uninterrupted" / "model.weights.h5"), h5_arrays(runs / "killed" / "model.weights.h5")
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    # And the sampling changed what was learned: the same command without it ends elsewhere.
    plain = [flag for flag in flags if not flag.startswith("--scheduled-sampling")]
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--preset", "minimal", *plain, "--run-name", "teacher-forcing"]
    assert subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600).returncode == 0
    forced = h5_arrays(runs / "teacher-forcing" / "model.weights.h5")
    assert any(not np.array_equal(forced[name], expected[name]) for name in expected if name in forced)
