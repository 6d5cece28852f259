"""A real training process SIGKILLed twice at random batches, then resumed to the end,
ends with exactly the weights of an uninterrupted run with the same seed."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from conftest import REPO_ROOT, tiny_overrides

EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 3, 10, 3  # 32 images x 5 captions / batch 16
CHILD = (
    "import sys, json; sys.path.insert(0, sys.argv[1]);"
    "from caption_tf.config import load_config; from caption_tf.training.trainer import train;"
    "train(load_config('minimal', json.loads(sys.argv[2])))"
)
PROCESS_TIMEOUT_S = 120
POLL_S = 0.01


def overrides_for(tmp, runs):
    # Dropout > 0: the resumed run must also replay the dropout masks (RNG state in the checkpoint).
    overrides = tiny_overrides(tmp, epochs=EPOCHS, checkpoint_every=CHECKPOINT_EVERY, dropout=0.3)
    overrides["runs_dir"] = str(tmp / runs)
    return overrides


def start(overrides, log_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-c", CHILD, str(REPO_ROOT), json.dumps(overrides)], stdout=log, stderr=subprocess.STDOUT, env=env)


def published_steps(run_dir):
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in folder.glob("ckpt-*") if p.name[5:].isdigit() and (p / "manifest.json").exists())


def kill_after_checkpoint(proc, run_dir, min_step, delay_s, log_path):
    """Wait until a checkpoint >= min_step is published, wait delay_s more, SIGKILL."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not any(step >= min_step for step in published_steps(run_dir)):
        assert proc.poll() is None, f"training ended before the kill:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(POLL_S)
    time.sleep(delay_s)
    assert proc.poll() is None, f"training ended before the kill:\n{log_path.read_text()[-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(PROCESS_TIMEOUT_S) == -signal.SIGKILL


def h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def val_losses(run_dir):
    with open(run_dir / "history.csv", newline="") as fh:
        return [float(row["val_loss"]) for row in csv.DictReader(fh)]


def test_sigkill_twice_then_resume_matches_an_uninterrupted_run_exactly(tmp_path):
    from caption_tf.config import load_config
    from caption_tf.training.trainer import prepare_data

    prepare_data(load_config("minimal", overrides_for(tmp_path, "ref")))  # feature cache built once, shared

    reference = start(overrides_for(tmp_path, "ref"), tmp_path / "ref.log")
    assert reference.wait(PROCESS_TIMEOUT_S) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    ref_dir = next((tmp_path / "ref").iterdir())

    seed = random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    overrides = overrides_for(tmp_path, "killed")
    run_dir = tmp_path / "killed" / ref_dir.name
    resumed_from = [0]
    for attempt, step_range in enumerate([(1, 9), (4, 7)]):  # 1st kill: a checkpoint >= 1..9; 2nd: 4..7 later
        log_path = tmp_path / f"killed-{attempt}.log"
        proc = start(overrides, log_path)
        min_step = resumed_from[-1] + rng.randint(*step_range)
        kill_after_checkpoint(proc, run_dir, min_step, rng.uniform(0.0, 0.2), log_path)
        resumed_from.append(max(published_steps(run_dir)))
    final = start(overrides, tmp_path / "final.log")
    assert final.wait(PROCESS_TIMEOUT_S) == 0, (tmp_path / "final.log").read_text()[-3000:]
    final_log = (tmp_path / "final.log").read_text()
    assert f"ckpt-{resumed_from[-1]}:" in final_log, f"seed {seed}: {final_log[-2000:]}"
    assert 0 < resumed_from[1] < resumed_from[2] < EPOCHS * STEPS_PER_EPOCH, f"seed {seed}: resumed from {resumed_from}"

    expected, actual = h5_arrays(ref_dir / "model.weights.h5"), h5_arrays(run_dir / "model.weights.h5")
    assert expected.keys() == actual.keys() and len(expected) > 10
    max_abs_diff = max(float(np.max(np.abs(expected[k].astype(np.float64) - actual[k]))) for k in expected)
    print(f"kill seed {seed}, resumed from steps {resumed_from[1:]}, max abs weight difference {max_abs_diff}")
    assert max_abs_diff == 0.0, f"seed {seed}, resumed from {resumed_from}: max abs difference {max_abs_diff}"
    assert val_losses(run_dir) == val_losses(ref_dir)  # validation after each epoch: identical
