"""Verified checkpoints: atomic publish, corruption handling, async snapshot, disk full."""

import errno
import json
import logging
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_tf.training.integrity import (
    MANIFEST_NAME,
    QUARANTINE_DIR,
    REASON_FILE,
    CheckpointCallback,
    CheckpointMismatchError,
    CheckpointWriteError,
    DurableFileWriter,
    TrainingPosition,
    VerifiedCheckpointStore,
    all_finite,
    check_compatible,
    is_disk_full,
)


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


class SlowWriter(DurableFileWriter):
    """Real writes, slowed so the test can change variables mid-write."""

    def __init__(self, delay):
        self.delay = delay

    def write(self, path, chunks):
        time.sleep(self.delay)
        return super().write(path, chunks)


class FullDiskWriter(DurableFileWriter):
    """Writes normally for `ok_writes` files, then fails like a full disk."""

    def __init__(self, ok_writes):
        self.ok_writes = ok_writes

    def write(self, path, chunks):
        if self.ok_writes <= 0:
            with open(path, "wb") as fh:  # a partial file, as a real ENOSPC leaves
                fh.write(next(iter(chunks))[:10])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        self.ok_writes -= 1
        return super().write(path, chunks)


def test_publish_layout_manifest_and_retention(tmp_path):
    model, _, step, ckpt = make_state()
    store = VerifiedCheckpointStore(tmp_path / "ckpts", ckpt, keep=2, best_metric="val_loss")
    for s, val_loss in zip([1, 2, 3, 4], [0.5, 0.9, 0.8, 0.7]):
        step.assign(s)
        store.save(s, {"epoch": s, "val_loss": val_loss, "config_hash": "abc"})
    info = store.close()
    assert info.step == 4
    names = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert names == ["ckpt-1", "ckpt-3", "ckpt-4"]  # last two + best (val_loss 0.5)
    manifest = json.loads((tmp_path / "ckpts" / "ckpt-4" / MANIFEST_NAME).read_text())
    assert manifest["metadata"]["config_hash"] == "abc"
    assert "tensorflow" in manifest["metadata"]["library_versions"]
    for name, entry in manifest["files"].items():
        assert (tmp_path / "ckpts" / "ckpt-4" / name).stat().st_size == entry["size"]
    assert any(name.endswith(".index") for name in manifest["files"])
    assert store.verify(tmp_path / "ckpts" / "ckpt-4").metadata["val_loss"] == 0.7
    assert info.total_bytes == sum(p.stat().st_size for p in (tmp_path / "ckpts" / "ckpt-4").iterdir())


def _truncate(folder):
    data = next(folder.glob("*.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _bit_flip(folder):
    data = next(folder.glob("*.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


def _missing_index(folder):
    next(folder.glob("*.index")).unlink()


def _missing_manifest(folder):
    (folder / MANIFEST_NAME).unlink()


def _half_written(folder):
    folder.rename(folder.with_name(folder.name + ".tmp"))


@pytest.mark.parametrize(
    "damage, reason_words",
    [
        (_truncate, "truncated"),
        (_bit_flip, "SHA-256 mismatch"),
        (_missing_index, "missing file"),
        (_missing_manifest, "missing manifest"),
        (_half_written, "half-written"),
    ],
)
def test_corrupt_newest_is_quarantined_and_previous_restored(tmp_path, caplog, damage, reason_words):
    model, iterator, step, ckpt = make_state()
    store = VerifiedCheckpointStore(tmp_path / "ckpts", ckpt, keep=3, async_save=False)
    set_weights_to(model, 1.0)
    step.assign(1)
    next(iterator)  # the iterator's next element is now 1
    store.save(1, {"epoch": 0})
    good = weights_of(model)
    set_weights_to(model, 2.0)
    step.assign(2)
    next(iterator)
    store.save(2, {"epoch": 1})
    damage(tmp_path / "ckpts" / "ckpt-2")

    set_weights_to(model, -5.0)
    step.assign(99)
    fresh = VerifiedCheckpointStore(tmp_path / "ckpts", ckpt, keep=3)
    with caplog.at_level(logging.WARNING):
        info = fresh.restore()
    assert info.step == 1
    for restored, expected in zip(weights_of(model), good):
        np.testing.assert_array_equal(restored, expected)
    assert int(step.numpy()) == 1
    assert int(next(iterator).numpy()) == 1  # the iterator resumed where ckpt-1 left it

    quarantined = list((tmp_path / "ckpts" / QUARANTINE_DIR).iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("ckpt-2")
    reason = (quarantined[0] / REASON_FILE).read_text()
    assert reason_words in reason
    assert any("ckpt-2" in r.getMessage() and reason_words in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["ckpt-1", QUARANTINE_DIR]


def test_no_valid_checkpoint_returns_none(tmp_path):
    _, _, _, ckpt = make_state()
    store = VerifiedCheckpointStore(tmp_path / "ckpts", ckpt)
    assert store.restore() is None


def test_async_save_publishes_the_snapshot_values(tmp_path):
    model, iterator, step, ckpt = make_state()
    store = VerifiedCheckpointStore(tmp_path / "ckpts", ckpt, async_save=True, writer=SlowWriter(0.3))
    set_weights_to(model, 3.0)
    step.assign(7)
    snapshot = weights_of(model)
    store.save(7, {"epoch": 0})
    # Training goes on while the checkpoint is still being written.
    assert store._background.busy
    set_weights_to(model, 4.0)
    step.assign(8)
    next(iterator)
    assert not (tmp_path / "ckpts" / "ckpt-7").exists()
    info = store.flush()
    assert info.step == 7 and not store._background.busy

    set_weights_to(model, 0.0)
    store.restore()
    for restored, expected in zip(weights_of(model), snapshot):
        np.testing.assert_array_equal(restored, expected)
    assert int(step.numpy()) == 7
    assert int(next(iterator).numpy()) == 0  # snapshot taken before next() was called
    store.close()


def test_second_save_waits_for_the_first(tmp_path):
    _, _, step, ckpt = make_state()
    store = VerifiedCheckpointStore(tmp_path / "ckpts", ckpt, writer=SlowWriter(0.2))
    store.save(1)
    assert store._background.busy
    store.save(2)  # must wait for ckpt-1 to be published first
    assert (tmp_path / "ckpts" / "ckpt-1" / MANIFEST_NAME).exists()
    store.close()
    assert (tmp_path / "ckpts" / "ckpt-2" / MANIFEST_NAME).exists()


def test_background_error_surfaces_on_next_save_and_on_flush(tmp_path):
    model, _, _, ckpt = make_state()
    writer = FullDiskWriter(ok_writes=3)  # ckpt-1: index + data + manifest
    store = VerifiedCheckpointStore(tmp_path / "ckpts", ckpt, writer=writer)
    store.save(1)
    store.flush()
    store.save(2)  # returns: the failure happens on the background thread
    with pytest.raises(CheckpointWriteError) as excinfo:
        store.save(3)
    assert excinfo.value.errno == errno.ENOSPC and is_disk_full(excinfo.value)
    assert "ckpt-2" in str(excinfo.value)
    store.save(4)
    with pytest.raises(CheckpointWriteError):
        store.flush()
    # No partial folder left behind; the last good one still verifies.
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["ckpt-1"]
    assert store.latest_valid().step == 1
    store.close()


def _regression_data(n=64, batch=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_disk_full_during_fit_stops_cleanly_with_last_good_checkpoint(tmp_path, caplog):
    model, _, _, _ = make_state()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.optimizer.build(model.trainable_variables)
    position = TrainingPosition()
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer, position=position)
    store = VerifiedCheckpointStore(tmp_path / "ckpts", ckpt, keep=3, writer=FullDiskWriter(ok_writes=3))
    callback = CheckpointCallback(store, position, every_n_batches=2, save_at_epoch_end=False)
    with caplog.at_level(logging.ERROR):
        model.fit(_regression_data(), epochs=3, callbacks=[callback], verbose=0)
    assert is_disk_full(callback.failure)
    assert int(position.step) < 3 * 8  # stopped early, cleanly (no exception)
    assert any("disk is full" in r.getMessage() for r in caplog.records)
    info = store.latest_valid()
    assert info.step == 2 and info.metadata["batch"] == 2
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["ckpt-2"]
    store.restore(info)
    assert all_finite(model.weights) and int(position.step) == 2


def test_check_compatible_names_what_differs():
    saved = {"config_hash": "a", "vocab_hash": "v1", "feature_fingerprint": "f"}
    check_compatible(saved, dict(saved))
    with pytest.raises(CheckpointMismatchError, match="vocab_hash: checkpoint has 'v1', this run has 'v2'"):
        check_compatible(saved, {**saved, "vocab_hash": "v2"})
    with pytest.raises(CheckpointMismatchError, match="feature_fingerprint"):
        check_compatible(saved, {"config_hash": "a", "vocab_hash": "v1"})
