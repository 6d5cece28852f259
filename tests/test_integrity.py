"""Verified checkpoints on tf.train.CheckpointManager: manifest, corruption handling, async snapshot,
failed writes, and the exact resume of `fit` (mixed precision's loss scale included)."""

import dataclasses
import errno
import json
import logging
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_tf.training import checkpoints
from caption_tf.training.checkpoints import (
    MANIFEST_SUFFIX,
    QUARANTINE_DIR,
    REASON_FILE,
    CheckpointWriteError,
    VerifiedCheckpointManager,
    verify,
)
from caption_tf.config import load_config
from caption_tf.files import stable_hash
from caption_tf.run_folder import CheckpointMismatchError, RunIdentity, compat_config
from caption_tf.training.recovery import ExactBackupAndRestore, check_checkpoints, fit_from_position
from caption_tf.training.supervisor import is_disk_full


def make_state(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(1e-2)
    optimizer.build(model.trainable_variables)
    iterator = iter(tf.data.Dataset.range(100))
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, iterator=iterator, step=step)
    return model, iterator, step, ckpt


def weights_of(model):
    return [w.numpy().copy() for w in model.weights]


def set_weights_to(model, value):
    for w in model.weights:
        w.assign(np.full(w.shape, value, dtype=np.float32))


def names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def slow_manifest(monkeypatch):
    """Manifests are written 0.3 s late: the background write is still in flight meanwhile."""
    write = checkpoints.write_manifest

    def slow(*args):
        time.sleep(0.3)
        return write(*args)

    monkeypatch.setattr(checkpoints, "write_manifest", slow)


@pytest.fixture
def disk_full_after(monkeypatch):
    """`disk_full_after(n)`: the first n manifests are written, later ones fail like a full disk."""

    def arm(ok_writes):
        write, calls = checkpoints.write_manifest, []

        def failing(*args):
            calls.append(args)
            if len(calls) > ok_writes:
                raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
            return write(*args)

        monkeypatch.setattr(checkpoints, "write_manifest", failing)

    return arm


def test_publish_layout_manifest_and_retention(tmp_path):
    model, _, step, ckpt = make_state()
    manager = VerifiedCheckpointManager(ckpt, tmp_path / "ckpts", max_to_keep=2, async_save=False)
    for s, val_loss in zip([1, 2, 3, 4], [0.5, 0.9, 0.8, 0.7]):
        step.assign(s)
        manager.save(s, {"epoch": s, "val_loss": val_loss, "config_hash": "abc"})
    info = manager.close()
    assert info.step == 4
    files = ["ckpt-{}.data-00000-of-00001", "ckpt-{}.index", "ckpt-{}" + MANIFEST_SUFFIX]
    assert names(tmp_path / "ckpts") == ["checkpoint"] + sorted(f.format(s) for s in (3, 4) for f in files)  # max_to_keep=2
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpts")) == str(tmp_path / "ckpts" / "ckpt-4")  # the manager's own view
    manifest = json.loads((tmp_path / "ckpts" / f"ckpt-4{MANIFEST_SUFFIX}").read_text())
    assert manifest["metadata"]["config_hash"] == "abc" and "tensorflow" in manifest["metadata"]["library_versions"]
    for name, entry in manifest["files"].items():
        assert (tmp_path / "ckpts" / name).stat().st_size == entry["size"]
    assert any(name.endswith(".index") for name in manifest["files"])
    assert verify(tmp_path / "ckpts" / "ckpt-4").metadata["val_loss"] == 0.7
    assert info.total_bytes == sum(p.stat().st_size for p in (tmp_path / "ckpts").glob("ckpt-4*"))


def _truncate(ckpts):
    data = next(ckpts.glob("ckpt-2.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _bit_flip(ckpts):
    data = next(ckpts.glob("ckpt-2.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


def _zero_fill(ckpts):
    data = next(ckpts.glob("ckpt-2.data-*"))
    data.write_bytes(bytes(data.stat().st_size))


def _missing_index(ckpts):
    (ckpts / "ckpt-2.index").unlink()


def _missing_manifest(ckpts):
    (ckpts / f"ckpt-2{MANIFEST_SUFFIX}").unlink()


def _edited_manifest(ckpts):
    path = ckpts / f"ckpt-2{MANIFEST_SUFFIX}"
    path.write_text(path.read_text().replace('"epoch": 1', '"epoch": 7'))


def _interrupted_save(ckpts):  # a kill in the middle of TensorFlow's write: temp folder, no manifest
    for piece in ckpts.glob("ckpt-2*"):
        piece.unlink()
    (ckpts / "ckpt-2_temp").mkdir()
    (ckpts / "ckpt-2_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\x00" * 100)


@pytest.mark.parametrize(
    "damage, reason_words",
    [
        (_truncate, "truncated"),
        (_bit_flip, "SHA-256 mismatch"),
        (_zero_fill, "SHA-256 mismatch"),
        (_missing_index, "missing file"),
        (_missing_manifest, "missing manifest"),
        (_edited_manifest, "checksum mismatch"),
        (_interrupted_save, "missing manifest"),
    ],
)
def test_corrupt_newest_is_quarantined_and_previous_restored(tmp_path, caplog, damage, reason_words):
    model, iterator, step, ckpt = make_state()
    ckpts = tmp_path / "ckpts"
    manager = VerifiedCheckpointManager(ckpt, ckpts, max_to_keep=3, async_save=False)
    set_weights_to(model, 1.0)
    step.assign(1)
    next(iterator)  # the iterator's next element is now 1
    manager.save(1, {"epoch": 0})
    good = weights_of(model)
    set_weights_to(model, 2.0)
    step.assign(2)
    next(iterator)
    manager.save(2, {"epoch": 1})
    damage(ckpts)

    set_weights_to(model, -5.0)
    step.assign(99)
    fresh = VerifiedCheckpointManager(ckpt, ckpts, max_to_keep=3)
    with caplog.at_level(logging.WARNING):
        info = fresh.restore()
    assert info.step == 1
    for restored, expected in zip(weights_of(model), good):
        np.testing.assert_array_equal(restored, expected)
    assert int(step.numpy()) == 1
    assert int(next(iterator).numpy()) == 1  # the iterator resumed where ckpt-1 left it

    quarantined = list((ckpts / QUARANTINE_DIR).iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("ckpt-2-")
    assert reason_words in (quarantined[0] / REASON_FILE).read_text()
    assert any("ckpt-2" in r.getMessage() and reason_words in r.getMessage() for r in caplog.records)
    assert not list(ckpts.glob("ckpt-2*")) and QUARANTINE_DIR in names(ckpts)
    # The manager's state lists what is left, and it goes on numbering and keeping from there.
    assert tf.train.latest_checkpoint(str(ckpts)) == str(ckpts / "ckpt-1")
    fresh.save(3, {"epoch": 1})
    assert fresh.flush().step == 3 and tf.train.get_checkpoint_state(str(ckpts)).all_model_checkpoint_paths[:] == [
        str(ckpts / "ckpt-1"), str(ckpts / "ckpt-3")]


def test_a_damaged_state_file_loses_no_checkpoint(tmp_path):
    model, _, step, ckpt = make_state()
    ckpts = tmp_path / "ckpts"
    manager = VerifiedCheckpointManager(ckpt, ckpts, max_to_keep=3, async_save=False)
    for s in (1, 2):
        set_weights_to(model, float(s))
        manager.save(s, {"epoch": s})
    (ckpts / "checkpoint").write_bytes(b"\x00" * 40)  # zero-filled
    set_weights_to(model, 0.0)
    info = VerifiedCheckpointManager(ckpt, ckpts).restore()
    assert info.step == 2 and all(np.all(w == 2.0) for w in weights_of(model))
    assert tf.train.latest_checkpoint(str(ckpts)) == str(ckpts / "ckpt-2")  # rewritten from what verified


def test_no_valid_checkpoint_returns_none(tmp_path):
    _, _, _, ckpt = make_state()
    assert VerifiedCheckpointManager(ckpt, tmp_path / "ckpts").restore() is None


def test_async_save_publishes_the_snapshot_values(tmp_path, slow_manifest):
    model, _, step, _ = make_state()
    ckpt = tf.train.Checkpoint(model=[v.value for v in model.weights], step=step)
    manager = VerifiedCheckpointManager(ckpt, tmp_path / "ckpts", async_save=True)
    set_weights_to(model, 3.0)
    step.assign(7)
    snapshot = weights_of(model)
    started = time.perf_counter()
    manager.save(7, {"epoch": 0})
    assert time.perf_counter() - started < 0.3  # did not wait for the write
    # Training goes on while the checkpoint is still being written.
    set_weights_to(model, 4.0)
    step.assign(8)
    assert not (tmp_path / "ckpts" / f"ckpt-7{MANIFEST_SUFFIX}").exists()
    info = manager.flush()
    assert info.step == 7

    set_weights_to(model, 0.0)
    manager.restore()
    for restored, expected in zip(weights_of(model), snapshot):
        np.testing.assert_array_equal(restored, expected)
    assert int(step.numpy()) == 7
    manager.close()


def test_second_save_waits_for_the_first(tmp_path, slow_manifest):
    model, _, step, _ = make_state()
    manager = VerifiedCheckpointManager(tf.train.Checkpoint(model=[v.value for v in model.weights]), tmp_path / "ckpts")
    manager.save(1)
    assert not (tmp_path / "ckpts" / f"ckpt-1{MANIFEST_SUFFIX}").exists()
    manager.save(2)  # waits for ckpt-1 to be published first
    assert (tmp_path / "ckpts" / f"ckpt-1{MANIFEST_SUFFIX}").exists()
    manager.close()
    assert (tmp_path / "ckpts" / f"ckpt-2{MANIFEST_SUFFIX}").exists()


def test_background_error_surfaces_on_next_save_and_on_flush(tmp_path, disk_full_after):
    model, _, _, _ = make_state()
    disk_full_after(1)
    manager = VerifiedCheckpointManager(tf.train.Checkpoint(model=[v.value for v in model.weights]), tmp_path / "ckpts")
    manager.save(1)
    manager.flush()
    manager.save(2)  # returns: the failure happens on the background thread
    with pytest.raises(CheckpointWriteError) as excinfo:
        manager.save(3)
    assert excinfo.value.errno == errno.ENOSPC and is_disk_full(excinfo.value)
    assert "ckpt-2" in str(excinfo.value)
    manager.save(4)
    with pytest.raises(CheckpointWriteError, match="ckpt-4"):
        manager.flush()
    # No unverifiable files left behind; the last good one still verifies and is the manager's latest.
    assert [p.name for p in (tmp_path / "ckpts").glob("ckpt-*.index")] == ["ckpt-1.index"]
    assert manager.latest_valid().step == 1
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpts")).endswith("ckpt-1")
    manager.close()


def _regression_data(n=64, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def compiled_model(seed=1, dropout=0.0):  # seed 0: tf.data cannot take a tensor shuffle seed (TF get_seed)
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(dropout, seed=3), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def test_disk_full_during_fit_stops_cleanly_with_last_good_checkpoint(tmp_path, disk_full_after):
    disk_full_after(1)
    model = compiled_model()
    backup = ExactBackupAndRestore(tmp_path / "ckpts", model, steps_per_epoch=8, save_freq=2)
    model.fit(_regression_data(), epochs=3, callbacks=[backup], verbose=0)
    assert is_disk_full(backup.failure)
    assert backup.position["step"] < 3 * 8  # stopped early, cleanly (no exception)
    info = backup.store.latest_valid()
    assert info.step == 2 and info.metadata["batch"] == 2
    assert [p.name for p in (tmp_path / "ckpts").glob("ckpt-*.index")] == ["ckpt-2.index"]


class Crash(keras.callbacks.Callback):
    """Raises after `after` batches: the process 'dies' with its last checkpoint on disk."""

    def __init__(self, after):
        super().__init__()
        self.after, self.seen = after, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.after:
            raise KeyboardInterrupt


def test_exact_resume_mid_epoch_with_dropout_and_loss_scale(tmp_path):
    """An interrupted `fit` resumed by a new model from the checkpoint ends with the uninterrupted weights, bit for bit.

    Under mixed_float16 the checkpoint must hold the LossScaleOptimizer's scale and its step counter
    (float32 is covered through train() by test_kill_resume.py).
    """
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        def make_epoch(epoch):
            return _regression_data(n=80, seed=0).unbatch().shuffle(80, seed=7 + epoch).batch(8)

        def run(folder, crash_after=None):
            model = compiled_model(dropout=0.3)
            backup = ExactBackupAndRestore(tmp_path / folder, model, steps_per_epoch=10, save_freq=4, async_save=True)
            callbacks = [backup] + ([Crash(crash_after)] if crash_after else [])
            try:
                fit_from_position(model, make_epoch, backup, 3, None, callbacks, verbose=0)
            except KeyboardInterrupt:
                backup.store.flush()
            return model, backup

        reference, ref_backup = run("ref")
        run("killed", crash_after=15)  # checkpoint at step 12: 3 batches into epoch 2 lost
        resumed, backup = run("killed")
        assert backup.restored.step == 12 and backup.position["step"] == 30
        assert isinstance(resumed.optimizer, keras.optimizers.LossScaleOptimizer)
        scale = {v.path: float(v.numpy()) for v in resumed.optimizer.variables if "dynamic_scale" in v.path}
        assert scale and scale == {v.path: float(v.numpy()) for v in reference.optimizer.variables if "dynamic_scale" in v.path}
        for expected, actual in zip(reference.weights + reference.optimizer.variables, resumed.weights + resumed.optimizer.variables):
            np.testing.assert_array_equal(np.asarray(expected), np.asarray(actual))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_identity_check_names_what_differs():
    saved = RunIdentity("a", "v1", "f", {"model": {"units": 32}})
    saved.check(saved.metadata(), "ckpt")
    with pytest.raises(CheckpointMismatchError, match="vocab_hash: checkpoint has 'v1', this run has 'v2'"):
        RunIdentity("a", "v2", "f", {"model": {"units": 32}}).check(saved.metadata(), "ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"feature_fingerprint.*--units 32 -> 48"):
        RunIdentity("b", "v1", "g", {"model": {"units": 48}}).check(saved.metadata(), "ckpt")


def test_checkpoint_from_before_the_grid_width_was_saved_resumes_with_that_width():
    # Before 2026-11-29 a run saved `feature_units: null`, which meant `units` (now: embedding_dim),
    # and hashed it so. Such a checkpoint resumes when the run asks for `--feature-units <units>`, and
    # the refusal under today's default says so.
    cfg = load_config("minimal", {"decoder": "lstm", "embedding_dim": 16, "units": 32})
    resolved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, feature_units=cfg.model.grid_width))
    saved = RunIdentity.of(cfg, "v", "f").metadata()  # what the old code wrote: `feature_units` None
    assert saved["compat_config"]["model"]["feature_units"] is None and resolved.model.feature_units == 16
    assert saved["config_hash"] == stable_hash(compat_config(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"--feature-units None -> 16.*To resume it, add its settings: --feature-units 32\."):
        RunIdentity.of(resolved, "v", "f").check(saved, "ckpt")
    as_before = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, feature_units=32))
    RunIdentity.of(as_before, "v", "f").check(saved, "ckpt")  # accepted
    with pytest.raises(CheckpointMismatchError):  # the legacy hash is of that width only
        RunIdentity.of(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, feature_units=24)), "v", "f").check(saved, "ckpt")


def test_no_valid_checkpoint_left_is_said_plainly(tmp_path, capsys):
    model, _, _, ckpt = make_state()
    identity = RunIdentity("a", "v", "f", {})
    manager = VerifiedCheckpointManager(ckpt, tmp_path / "ckpts", async_save=False)
    manager.save(1, identity.metadata())
    assert check_checkpoints(tmp_path / "ckpts", identity).step == 1
    _bit_flip_step(tmp_path / "ckpts", 1)
    assert check_checkpoints(tmp_path / "ckpts", identity) is None
    out = capsys.readouterr().out
    assert "Checkpoint quarantined" in out and "No valid checkpoint is left: training starts from the beginning" in out
    assert "older checkpoint" not in out


def _bit_flip_step(ckpts, step):
    data = next(ckpts.glob(f"ckpt-{step}.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


class SaveNowEveryBatch(keras.callbacks.Callback):
    """Asks for a save after every batch, as the health monitor's final save may right after a scheduled one."""

    def __init__(self, backup):
        super().__init__()
        self.backup = backup

    def on_train_batch_end(self, batch, logs=None):
        self.backup.save_now()


def recorded_saves(backup, delay_s=0.0):
    """The steps `backup` saves, in order; each real save is held up `delay_s` first (a slow disk)."""
    steps, save = [], backup.store.save

    def recording(step, metadata=None):
        steps.append(step)
        time.sleep(delay_s)
        return save(step, metadata)

    backup.store.save = recording
    return steps


def test_each_step_is_saved_once_when_the_interval_divides_the_epoch(tmp_path):
    model = compiled_model()
    backup = ExactBackupAndRestore(tmp_path / "every2", model, steps_per_epoch=8, save_freq=2, async_save=False)
    saves = recorded_saves(backup)
    model.fit(_regression_data(), epochs=2, callbacks=[backup], verbose=0)
    assert saves == [2, 4, 6, 8, 10, 12, 14, 16]  # steps 8 and 16 once, at their epoch's end (after validation)

    model = compiled_model()
    backup = ExactBackupAndRestore(tmp_path / "asked", model, steps_per_epoch=8, save_freq=2, async_save=False)
    saves = recorded_saves(backup)
    model.fit(_regression_data(), epochs=2, callbacks=[backup, SaveNowEveryBatch(backup)], verbose=0)
    assert saves == list(range(1, 17))


def test_epoch_rows_and_the_run_total_count_every_save_and_the_final_wait(tmp_path):
    from caption_tf.training.recovery import CHECKPOINT_SECONDS_KEY, EPOCH_SECONDS_KEY, EpochTimer

    delay = 0.2
    model = compiled_model()
    backup = ExactBackupAndRestore(tmp_path / "ckpts", model, steps_per_epoch=8, save_freq="epoch", async_save=True)
    saves = recorded_saves(backup, delay_s=delay)
    history = model.fit(_regression_data(), epochs=3, callbacks=[EpochTimer(backup), backup], verbose=0).history
    assert saves == [8, 16, 24]  # epoch ends only
    rows = history[CHECKPOINT_SECONDS_KEY]
    # Each epoch-end save is written after the epoch's row: the next row counts it; the last is in the total only.
    assert rows[0] < delay <= rows[1] and delay <= rows[2]
    assert all(e >= c for e, c in zip(history[EPOCH_SECONDS_KEY], rows))
    assert backup.blocking_seconds >= sum(rows) + delay  # the total has the last save and the wait for its write
