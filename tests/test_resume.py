"""Resume behaviour of real training runs: --resume never, completed runs, mismatches,
corrupt checkpoints, NaN stop, --max-restarts supervision, health metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from caption_tf.cli import evaluate_main, train_main
from caption_tf.config import load_config
from caption_tf.files import file_sha256
from caption_tf.training import faults, supervisor
from caption_tf.training.checkpoints import latest_valid
from caption_tf.run_folder import CheckpointMismatchError, load_run
from caption_tf.training.trainer import train
from conftest import REPO_ROOT, read_scalars, tiny_overrides, cli_flags

# 32 training images x 5 captions / batch 16 = 10 batches per epoch.
STEPS_PER_EPOCH = 10


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tmp folder whose data and feature cache every test reuses, and one completed 1-epoch run."""
    tmp = tmp_path_factory.mktemp("resume")
    cfg = load_config("minimal", tiny_overrides(tmp, checkpoint_every=3))
    return tmp, train(cfg)


def config_for(shared_tmp, runs, **extra):
    overrides = tiny_overrides(shared_tmp, checkpoint_every=3, **extra)
    overrides["runs_dir"] = str(runs)
    return load_config("minimal", overrides)


def copy_run(run_dir, runs):
    target = runs / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def checkpoint_steps(run_dir):
    return sorted(int(p.name[5:].split(".")[0]) for p in (run_dir / "checkpoints").glob("ckpt-*.index"))


def history_epochs(run_dir):
    lines = (run_dir / "history.csv").read_text().splitlines()
    return [int(line.split(",")[0]) for line in lines[1:]]


def test_completed_run_is_not_retrained_and_more_epochs_resume(shared, tmp_path, capsys):
    shared_tmp, finished = shared
    run_dir = copy_run(finished, tmp_path / "runs")
    weights_hash = file_sha256(run_dir / "model.weights.h5")
    capsys.readouterr()

    assert train(config_for(shared_tmp, tmp_path / "runs")) == run_dir
    out = capsys.readouterr().out
    assert "already complete" in out and "--resume never" in out and "--epochs" in out
    assert file_sha256(run_dir / "model.weights.h5") == weights_hash  # not retrained

    train(config_for(shared_tmp, tmp_path / "runs", epochs=2))  # train longer: resumes at epoch 2
    out = capsys.readouterr().out
    assert f"ckpt-{STEPS_PER_EPOCH}: epoch 1, {STEPS_PER_EPOCH} batch(es) done" in out
    assert history_epochs(run_dir) == [0, 1]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["epochs_run"] == 2
    assert checkpoint_steps(run_dir)[-1] == 2 * STEPS_PER_EPOCH


def test_resume_never_moves_the_old_run_aside(shared, tmp_path, capsys):
    shared_tmp, finished = shared
    run_dir = copy_run(finished, tmp_path / "runs")
    old_hash = file_sha256(run_dir / "model.weights.h5")

    train(config_for(shared_tmp, tmp_path / "runs", resume="never"))
    moved = list((tmp_path / "runs").glob(f"{run_dir.name}.old-*"))
    assert len(moved) == 1 and f"moved the existing run to {moved[0]}" in capsys.readouterr().out
    assert file_sha256(moved[0] / "model.weights.h5") == old_hash  # the old run is intact
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    assert history_epochs(run_dir) == [0]


def test_changed_settings_refuse_to_resume_and_say_what_differs(shared, tmp_path):
    shared_tmp, finished = shared
    run_dir = copy_run(finished, tmp_path / "runs")
    config_before = (run_dir / "config.yaml").read_text()
    with pytest.raises(CheckpointMismatchError) as err:
        train(config_for(shared_tmp, tmp_path / "runs", vocab_size=20, units=48))
    message = str(err.value)
    for expected in ("Refusing to resume", "config_hash", "vocab_hash", "--units 32 -> 48", "--vocab-size 100 -> 20", "--resume never"):
        assert expected in message
    assert "To resume it, add its settings: --units 32 --vocab-size 100." in message  # the way back, as flags
    assert (run_dir / "config.yaml").read_text() == config_before  # nothing was overwritten


def test_a_run_saved_before_the_grid_width_was_written_loads_as_trained(shared, tmp_path):
    # Until 2026-11-29 config.yaml said `feature_units: null`, meaning `units` (32 here); today's
    # default is embedding_dim (16). Such a run must still load, at the width it was trained at.
    shared_tmp, _ = shared
    run_dir = train(config_for(shared_tmp, tmp_path / "runs", feature_units=32))
    config = run_dir / "config.yaml"
    assert "feature_units: 32" in config.read_text()  # new runs write the width out
    before = load_run(run_dir)
    grid = np.random.default_rng(0).random((2, *before.info["grid_shape"]), dtype=np.float32)
    tokens = np.full((2, 5), 4, dtype="int32")
    expected = np.asarray(before.model((grid, tokens)))

    def evaluated(name):  # `evaluate.py --run R`, as a user runs it: the report's scores
        flags = ["--no-meteor", "--no-retrieval", "--no-resources", "--no-embeddings", "--out", str(tmp_path / name)]
        assert evaluate_main(["--run", str(run_dir), *flags]) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())["comparison"]

    scores = evaluated("before")
    config.write_text(config.read_text().replace("feature_units: 32", "feature_units: null"))
    legacy = load_run(run_dir)
    assert legacy.model.feature_units == 32
    np.testing.assert_array_equal(np.asarray(legacy.model((grid, tokens))), expected)
    assert evaluated("legacy") == scores


def test_corrupt_newest_checkpoint_is_quarantined_and_the_previous_one_used(shared, tmp_path, capsys):
    shared_tmp, finished = shared
    run_dir = copy_run(finished, tmp_path / "runs")
    assert checkpoint_steps(run_dir) == [6, 9, 10]
    data_file = next((run_dir / "checkpoints").glob("ckpt-10.data-*"))
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit pattern in the middle of the weights
    data_file.write_bytes(bytes(raw))
    capsys.readouterr()

    train(config_for(shared_tmp, tmp_path / "runs", epochs=2))
    out = capsys.readouterr().out
    assert "Checkpoint quarantined" in out and "SHA-256 mismatch" in out
    assert "ckpt-9: epoch 1, 9 batch(es) done" in out  # the previous checkpoint was used
    quarantined = list((run_dir / "checkpoints" / "quarantine").glob("ckpt-10-*"))
    assert len(quarantined) == 1 and "SHA-256" in (quarantined[0] / "REASON.txt").read_text()
    assert history_epochs(run_dir) == [0, 1]  # epoch 0 was finished again, then epoch 1
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_nan_loss_stops_cleanly_then_a_lower_learning_rate_resumes(shared, tmp_path, monkeypatch, capsys):
    shared_tmp, _ = shared
    overrides = tiny_overrides(shared_tmp, checkpoint_every=3, epochs=2)
    overrides["runs_dir"] = str(tmp_path / "runs")
    monkeypatch.setenv(faults.NAN_AT_STEP_ENV, "7")  # weights become NaN after step 7: step 8's loss is NaN

    code = train_main(cli_flags(overrides))
    assert code == supervisor.EXIT_NON_FINITE
    out, err = capsys.readouterr()
    assert "became nan at epoch 1, batch 8" in err and "Last good checkpoint" in err and "ckpt-6" in err
    assert (out + err).count("became nan") == 1  # one report, not three
    assert "--learning-rate" in err and "resumes from that checkpoint" in err
    run_dir = next((tmp_path / "runs").iterdir())
    assert latest_valid(run_dir / "checkpoints")[0].step == 6 and checkpoint_steps(run_dir) == [3, 6]
    assert not (run_dir / "model.weights.h5").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped: non-finite loss"

    # The advice is true: the same command with a lower learning rate resumes from ckpt-6 and finishes.
    monkeypatch.delenv(faults.NAN_AT_STEP_ENV)
    assert train_main(cli_flags({**overrides, "learning_rate": 0.0005})) == 0
    out = capsys.readouterr().out
    assert "ckpt-6: epoch 1, 6 batch(es) done" in out and "Resuming with changed settings: --learning-rate 0.002 -> 0.0005" in out
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["resume_overrides"] == [{"step": 6, "learning_rate": [0.002, 0.0005]}]
    assert load_config(str(run_dir / "config.yaml")).train.learning_rate == 0.0005


def test_supervisor_restarts_a_crashing_training_child_until_it_finishes(shared, tmp_path, monkeypatch, capsys):
    shared_tmp, _ = shared
    # Synchronous saves: a checkpoint is published before the next batch, so the crashes below
    # below always leave the checkpoint they just made (asynchronous ones may still be in flight).
    overrides = tiny_overrides(shared_tmp, checkpoint_every=3, epochs=2, async_checkpoint=False)
    overrides["runs_dir"] = str(tmp_path / "runs")
    child = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from caption_tf.config import load_config; from caption_tf.training.trainer import train;"
        "train(load_config('minimal', json.loads(sys.argv[2])))"
    )
    # A child SIGKILLs itself after 14 of its own batches (step 14, ckpt-12 saved): the restarted
    # child resumes from step 12 and finishes the 20 batches in 8.
    monkeypatch.setenv(faults.CRASH_AFTER_BATCHES_ENV, "14")
    command = lambda argv: [sys.executable, "-c", child, str(REPO_ROOT), json.dumps(overrides)]  # noqa: E731
    assert supervisor.supervise([], max_restarts=2, command=command) == 0
    out = capsys.readouterr().out
    assert "killed by SIGKILL); restart 1/2" in out and "restart 2/2" not in out
    run_dir = next((tmp_path / "runs").iterdir())
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["epochs_run"] == 2


def test_supervisor_gives_up_after_max_restarts_and_never_restarts_a_clean_stop(capsys):
    crash = lambda argv: [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]  # noqa: E731
    assert supervisor.supervise([], max_restarts=1, command=crash) == 128 + 9
    out = capsys.readouterr().out
    assert out.count("restart 1/1") == 1 and "no restarts left (--max-restarts 1)" in out
    nan_stop = lambda argv: [sys.executable, "-c", f"raise SystemExit({supervisor.EXIT_NON_FINITE})"]  # noqa: E731
    assert supervisor.supervise([], max_restarts=3, command=nan_stop) == supervisor.EXIT_NON_FINITE
    assert "restart" not in capsys.readouterr().out


def test_supervised_child_command_runs_the_training_cli():
    env = {**os.environ, supervisor.SUPERVISED_ENV: "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(supervisor.child_command(["--help"]), env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--max-restarts" in result.stdout and "--checkpoint-every" in result.stdout


def test_run_json_records_how_long_checkpoints_held_training_up(shared):
    _, run_dir = shared
    info = json.loads((run_dir / "run.json").read_text())
    assert 0 < info["checkpoint_seconds"] < info["train_seconds"]
    assert len(checkpoint_steps(run_dir)) == 3  # steps 3, 6, 9 and the epoch end (10), 3 kept


def test_health_monitor_records_ram_and_disk_of_a_real_run(shared):
    _, finished = shared
    scalars = read_scalars(finished / "logs")
    assert 0 < scalars["health/ram_percent"][-1] <= 100
    assert scalars["health/disk_free_gb"][-1] > 0 and scalars["health/process_rss_gb"][-1] > 0
