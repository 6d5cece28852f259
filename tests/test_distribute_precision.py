"""Mixed precision, XLA and gradient checkpointing together, through `train()` on CPU.

A float16 run with XLA and recompute_grad, SIGKILLed mid-epoch and rerun, ends with exactly
the weights of an uninterrupted run: the dynamic loss scale and its step counter are
restored with the optimizer. bfloat16 (no loss scaling) trains to the end with recompute_grad.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, tiny_overrides, h5_arrays

STEPS, CHECKPOINT_EVERY = 10, 3  # one epoch: 160 caption pairs / batch 16
CHILD = (
    "import sys, json; sys.path.insert(0, sys.argv[1]);"
    "from caption_tf.config import load_config; from caption_tf.training.trainer import train;"
    "train(load_config('minimal', json.loads(sys.argv[2])));"
    "from caption_tf.cli import exit_without_teardown; exit_without_teardown(0)"  # as train.py ends: 1.3 s less
)
PROCESS_TIMEOUT_S = 600
TOGETHER = {"jit": "on", "recompute_grad": True}


def train_child(values: dict, log_path) -> subprocess.Popen:
    """`train(load_config("minimal", values))` in a new process, output to `log_path`."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-c", CHILD, str(REPO_ROOT), json.dumps(values)], stdout=log, stderr=subprocess.STDOUT)


def finish(proc, log_path) -> str:
    assert proc.wait(PROCESS_TIMEOUT_S) == 0, log_path.read_text()[-3000:]
    return log_path.read_text()


def published_steps(runs_dir) -> list[int]:
    """Steps of the checkpoints whose manifest (written last, once the files are complete) exists."""
    return sorted(int(p.name[5:].split(".")[0]) for p in runs_dir.glob("*/checkpoints/ckpt-*.manifest.json"))


def loss_scale_state(run_dir) -> dict:
    """The LossScaleOptimizer's variables in the run's newest checkpoint.

    The checkpoint holds the optimizer's variables as a list (`optimizer/<i>`); their positions
    are those of a LossScaleOptimizer's `variables`, which start with its own.
    """
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam())
    optimizer.build([keras.Variable(np.zeros(1, "float32"))])
    wanted = {i: v.name for i, v in enumerate(optimizer.variables) if v.name in ("dynamic_scale", "step_counter")}
    prefix = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    return {name: float(tf.train.load_variable(prefix, f"optimizer/{i}/.ATTRIBUTES/VARIABLE_VALUE")) for i, name in wanted.items()}


def test_mixed_float16_xla_recompute_resume_exactly_after_sigkill(tmp_path):
    # Captions cut at 8 tokens and GRU + Luong (one recurrent layer call, not a loop over the steps):
    # less for XLA to compile, 16 s per run instead of 28 s with LSTM + Bahdanau. Bahdanau's step
    # under XLA has its own test (test_models: the packed output's gradients, XLA included).
    values = tiny_overrides(
        tmp_path, precision="mixed_float16", checkpoint_every=CHECKPOINT_EVERY, dropout=0.3, max_length=8,
        decoder="gru", attention="luong", **TOGETHER
    )
    from caption_tf.config import load_config
    from caption_tf.training.trainer import prepare_data

    prepare_data(load_config("minimal", values))  # data and features once, so the runs below only train
    # The reference and the run to kill side by side: XLA compiles mostly on one core.
    reference = train_child({**values, "runs_dir": str(tmp_path / "reference")}, tmp_path / "reference.log")
    killed = {**values, "runs_dir": str(tmp_path / "killed")}
    proc = train_child(killed, tmp_path / "killed.log")
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not published_steps(tmp_path / "killed"):  # SIGKILL a random moment after the first checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.01)
    time.sleep(random.SystemRandom().uniform(0.0, 0.05))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(PROCESS_TIMEOUT_S) == -signal.SIGKILL
    killed_at = max(published_steps(tmp_path / "killed"))
    assert 0 < killed_at < STEPS
    resumed_log = finish(train_child(killed, tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert f"ckpt-{killed_at}: epoch 1, {killed_at} batch(es) done" in resumed_log
    assert "Runtime: 1 replica(s), precision mixed_float16, XLA on" in finish(reference, tmp_path / "reference.log")

    ref_dir, run_dir = (next((tmp_path / runs).iterdir()) for runs in ("reference", "killed"))
    expected, actual = h5_arrays(ref_dir / "model.weights.h5"), h5_arrays(run_dir / "model.weights.h5")
    assert expected.keys() == actual.keys() and len(expected) > 10
    difference = max(float(np.max(np.abs(expected[k].astype(np.float64) - actual[k]))) for k in expected)
    assert difference == 0.0, f"killed after step {killed_at}: max abs weight difference {difference}"
    # The loss scale's step counter counts the steps since the scale last changed: 10 in both
    # runs, so the resumed run restored it (a fresh one would have counted only its own steps).
    assert loss_scale_state(run_dir) == loss_scale_state(ref_dir) == {"dynamic_scale": 32768.0, "step_counter": STEPS}


@pytest.fixture
def restore_float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_bfloat16_with_recompute_trains_to_the_end(tmp_path, restore_float32_policy):
    from caption_tf.config import load_config
    from caption_tf.run_folder import read_run_info
    from caption_tf.training.trainer import train

    run_dir = train(load_config("minimal", tiny_overrides(tmp_path, precision="mixed_bfloat16", recompute_grad=True, max_length=8)))
    assert read_run_info(run_dir)["precision"] == "mixed_bfloat16"
    weights = h5_arrays(run_dir / "model.weights.h5")
    assert all(np.all(np.isfinite(w)) for w in weights.values())
    rows = (run_dir / "history.csv").read_text().splitlines()
    assert len(rows) == 2 and "nan" not in rows[1].lower()
