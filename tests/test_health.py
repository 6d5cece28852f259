"""Health monitor and NaN guard, inside real (tiny) `model.fit` runs."""

import logging
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from pathlib import Path

from conftest import read_scalars

from caption_tf.training.health import (
    GpuProbe,
    HealthMonitor,
    NonFiniteLossGuard,
    format_sample,
    read_alerts,
    system_health,
)
from caption_tf.training.checkpoints import SaveRefusedError
from caption_tf.training.recovery import ExactBackupAndRestore

BATCHES_PER_EPOCH = 8


def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def data(inf_batch=None, batch=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * BATCHES_PER_EPOCH, 4)).astype("float32")
    if inf_batch is not None:
        x[inf_batch * batch] = np.inf  # one poisoned sample makes that batch's loss NaN
    y = x.sum(axis=1, keepdims=True)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_system_health_reads_real_values(tmp_path):
    sample = system_health(tmp_path)
    assert 0 < sample["ram_percent"] <= 100
    assert sample["process_rss_gb"] > 0
    assert sample["disk_free_gb"] == pytest.approx(shutil.disk_usage(tmp_path).free / 1024**3, rel=0.05)
    assert "RAM" in format_sample(sample) and "disk" in format_sample(sample)


def test_monitor_logs_ram_and_disk_to_tensorboard_and_alerts(tmp_path, caplog):
    probe = GpuProbe()
    monitor = HealthMonitor(
        tmp_path,
        log_dir=tmp_path / "logs",
        every_n_batches=2,
        ram_percent_max=0.0,  # always crossed: must alert once, not every sample
        min_free_disk_gb=1e9,  # always crossed
        gpu_probe=probe,
    )
    model = tiny_model()
    with caplog.at_level(logging.WARNING):
        model.fit(data(), epochs=2, callbacks=[monitor], verbose=0)

    scalars = read_scalars(tmp_path / "logs")
    # train begin + every 2 of 16 batches; the 2 epoch ends share their step with a periodic sample: one point per step
    assert len(scalars["health/ram_percent"]) == 1 + 16 // 2
    assert all(0 < v <= 100 for v in scalars["health/ram_percent"])
    assert all(v > 0 for v in scalars["health/disk_free_gb"])
    assert all(v > 0 for v in scalars["health/process_rss_gb"])
    assert any(tag.startswith("health/gpu") for tag in scalars) == probe.available  # GPU scalars: test_gpu_readings_*

    alerts = read_alerts(tmp_path)
    assert sorted(a["kind"] for a in alerts) == ["disk_free_gb", "ram_percent"]
    ram = next(a for a in alerts if a["kind"] == "ram_percent")
    assert ram["threshold"] == 0.0 and 0 < ram["value"] <= 100
    assert any("HEALTH ALERT" in r.getMessage() for r in caplog.records)
    assert not monitor.stopped_for_disk


def test_gpu_probe_reads_every_gpu_or_says_why_there_is_none():
    import pynvml  # nvidia-ml-py is a pinned requirement: its absence fails here

    probe = GpuProbe()
    if Path("/proc/driver/nvidia/version").exists():  # an NVIDIA driver is loaded: NVML must work
        assert probe.available, probe.reason
        readings = probe.read()
        assert [r["index"] for r in readings] == list(range(pynvml.nvmlDeviceGetCount()))
        for reading in readings:
            assert 0 <= reading["util_percent"] <= 100 and 0 < reading["memory_percent"] <= 100
            assert reading["memory_used_gb"] > 0 and 0 < reading["temp_c"] < 120
    else:  # no driver: the one acceptable reason, not any NVML error swallowed
        assert not probe.available and probe.read() == []
        assert probe.reason.startswith(("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")), probe.reason


class FixedGpuProbe(GpuProbe):
    """A probe that returns the given readings, one list per sample, instead of asking NVML."""

    def __init__(self, samples):
        self.available, self.reason, self._samples = True, "", iter(samples)

    def read(self):
        return next(self._samples)


def gpu(index, memory_percent, temp_c, util_percent=50.0):
    return {"index": index, "util_percent": util_percent, "memory_percent": memory_percent, "memory_used_gb": memory_percent / 10, "temp_c": temp_c}


def test_gpu_readings_go_to_tensorboard_and_alert_once_per_crossing(tmp_path):
    memory = [50.0, 96.0, 99.0, 60.0, 97.0]  # crosses 95% at samples 2 and 5 (back below at 4)
    temps = [70.0, 70.0, 86.0, 86.0, 84.0]  # crosses 85 C at sample 3, once
    samples = [[gpu(0, m, t), gpu(1, 10.0, 40.0)] for m, t in zip(memory, temps)]
    steps = iter(range(100))  # one health point per global step: each sample at the next step
    monitor = HealthMonitor(tmp_path, log_dir=tmp_path / "logs", gpu_probe=FixedGpuProbe(samples), every_n_batches=0, every_seconds=0,
                            ram_percent_max=100.0, min_free_disk_gb=0.0, gpu_memory_percent_max=95.0, gpu_temp_c_max=85.0,
                            step=lambda: current[0])
    current = [next(steps)]
    monitor.on_train_begin()  # sample 1
    for _ in range(len(samples) - 1):
        current[0] = next(steps)
        monitor.sample()
    monitor.on_train_end()

    scalars = read_scalars(tmp_path / "logs")
    assert scalars["health/gpu0_memory_percent"] == memory and scalars["health/gpu0_temp_c"] == temps
    assert scalars["health/gpu1_memory_percent"] == [10.0] * 5 and scalars["health/gpu0_util_percent"] == [50.0] * 5
    alerts = [(a["kind"], a["value"], a["threshold"]) for a in read_alerts(tmp_path)]
    assert alerts == [("gpu0_memory_percent", 96.0, 95.0), ("gpu0_temp_c", 86.0, 85.0), ("gpu0_memory_percent", 97.0, 95.0)]
    assert format_sample(monitor.last_sample).endswith("GPU0 50% util, mem 97%, 84C | GPU1 50% util, mem 10%, 40C")


def all_finite(variables):
    return all(bool(np.all(np.isfinite(np.asarray(v)))) for v in variables)


def test_low_disk_for_next_checkpoint_saves_once_more_and_stops(tmp_path):
    model = tiny_model()
    backup = ExactBackupAndRestore(tmp_path / "ckpts", model, steps_per_epoch=BATCHES_PER_EPOCH, save_freq=3, async_save=False)
    free = shutil.disk_usage(tmp_path).free
    monitor = HealthMonitor(
        tmp_path,
        every_n_batches=1,
        min_free_disk_gb=0.0,
        checkpoint_bytes=lambda: backup.store.last_published and backup.store.last_published.total_bytes,
        # Scale the safety margin so the real free space is "too little" once a
        # checkpoint exists, while one more checkpoint still fits.
        disk_safety_factor=10.0 * free / 1000,
        final_save=backup.save_now,
    )
    # Checkpoints are a few KB here, so "needed" is far above the free space.
    model.fit(data(), epochs=3, callbacks=[backup, monitor], verbose=0)
    backup.store.close()

    assert monitor.stopped_for_disk
    assert backup.position["step"] == 3  # stopped right after the first checkpoint made sizes known
    alerts = read_alerts(tmp_path)
    assert [a["kind"] for a in alerts] == ["disk_checkpoint"]
    assert "stopping training" in alerts[0]["message"] and "final checkpoint was requested" in alerts[0]["message"]
    assert backup.store.latest_valid().step == 3


def test_disk_sizes_below_one_gigabyte_keep_their_digits():
    assert format_sample({"ram_percent": 41.0, "process_rss_gb": 1.2, "disk_free_gb": 0.029}).endswith("disk 0.029 GB free")


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path, capsys):
    model = tiny_model()
    backup = ExactBackupAndRestore(tmp_path / "ckpts", model, steps_per_epoch=BATCHES_PER_EPOCH, save_freq=1, max_to_keep=2)
    guard = NonFiniteLossGuard(backup.store)
    # The backup runs BEFORE the guard on each batch, so it must refuse the NaN state by
    # itself; the guard then blocks the epoch-end save.
    model.fit(data(inf_batch=4), epochs=2, callbacks=[backup, guard], verbose=0)
    backup.store.close()

    assert guard.tripped_at == (0, 4)
    assert not all_finite(model.weights)  # the in-memory weights really are broken
    assert "NOT saved" in guard.message and "epoch 1, batch 5" in guard.message
    assert capsys.readouterr().out == ""  # reported once, by the trainer, not here
    assert sorted(p.name for p in (tmp_path / "ckpts").glob("*.index")) == ["ckpt-3.index", "ckpt-4.index"]
    with pytest.raises(SaveRefusedError):
        backup.store.save(99)

    fresh = ExactBackupAndRestore(tmp_path / "ckpts", tiny_model(), steps_per_epoch=BATCHES_PER_EPOCH)
    assert fresh.restore() == (0, 4) and fresh.restored.step == 4
    assert all_finite(fresh._model_ref.weights) and all_finite(fresh._model_ref.optimizer.variables)


class FixedNvml:
    """The `pynvml` calls `GpuProbe` makes, answering fixed values: two GPUs, GPU1's temperature sensor broken."""

    NVML_TEMPERATURE_GPU = 0
    NVML_ERROR_LIBRARY_NOT_FOUND, NVML_ERROR_DRIVER_NOT_LOADED, NVML_ERROR_UNKNOWN = 12, 9, 999

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, init_error=None):
        self.init_error = init_error
        self.temperature_reads = 0

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"handle{index}"

    def nvmlDeviceGetUtilizationRates(self, handle):
        return type("Utilization", (), {"gpu": {"handle0": 87, "handle1": 12}[handle]})()

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"used": 6 * 1024**3, "total": 8 * 1024**3})()

    def nvmlDeviceGetTemperature(self, handle, sensor):
        self.temperature_reads += 1
        if handle == "handle1":
            raise self.NVMLError(self.NVML_ERROR_UNKNOWN)
        return 91


def test_gpu_probe_reads_every_device_and_logs_a_failing_metric_once(caplog, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FixedNvml()
    probe = GpuProbe(nvml=nvml)
    with caplog.at_level(logging.INFO):
        readings = [probe.read() for _ in range(3)]
    assert probe.available and nvml.temperature_reads == 6
    assert readings[-1] == [
        {"index": 0, "util_percent": 87.0, "memory_percent": 75.0, "memory_used_gb": 6.0, "temp_c": 91.0},
        {"index": 1, "util_percent": 12.0, "memory_percent": 75.0, "memory_used_gb": 6.0},  # no temperature, the rest read
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "GPU1 temp_c" in warnings[0] and "NVML error 999" in warnings[0]
    assert format_sample({"ram_percent": 1.0, "process_rss_gb": 1.0, "disk_free_gb": 1.0, **{f"gpu1_{k}": v for k, v in readings[-1][1].items()}}).endswith("GPU1 12% util, mem 75%, nanC")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [r["index"] for r in GpuProbe(nvml=FixedNvml()).read()] == [1]


def test_gpu_probe_tells_no_driver_from_a_broken_one(caplog):
    with caplog.at_level(logging.INFO):
        absent = GpuProbe(nvml=FixedNvml(init_error=FixedNvml.NVML_ERROR_LIBRARY_NOT_FOUND))
        broken = GpuProbe(nvml=FixedNvml(init_error=FixedNvml.NVML_ERROR_UNKNOWN))
    assert not absent.available and not broken.available and absent.read() == [] == broken.read()
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if "GPU" in r.getMessage()]
    assert levels[0][0] == logging.INFO and "no NVIDIA driver" in levels[0][1]
    assert levels[1][0] == logging.WARNING and "NVML failed to start" in levels[1][1]


def test_monitor_writes_gpu_scalars_and_alerts_as_text_to_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing import event_accumulator

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monitor = HealthMonitor(tmp_path, log_dir=tmp_path / "logs", every_n_batches=4, gpu_temp_c_max=85.0, gpu_probe=GpuProbe(nvml=FixedNvml()))
    tiny_model().fit(data(), epochs=2, callbacks=[monitor], verbose=0)

    scalars = read_scalars(tmp_path / "logs")
    samples = 1 + 16 // 4 + 2 - 2  # begin, every 4 batches, epoch ends; an epoch end shares its step with a periodic sample
    assert scalars["health/gpu0_util_percent"] == [87.0] * samples and scalars["health/gpu1_util_percent"] == [12.0] * samples
    assert scalars["health/gpu0_memory_percent"] == [75.0] * samples and scalars["health/gpu0_temp_c"] == [91.0] * samples
    assert "health/gpu1_temp_c" not in scalars
    assert [a["kind"] for a in read_alerts(tmp_path)] == ["gpu0_temp_c"]  # once, not at every sample
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "logs"), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    alerts = accumulator.Tensors("health/alerts")
    assert len(alerts) == 1 and alerts[0].step == 0
    text = tf.make_ndarray(alerts[0].tensor_proto).item().decode()
    assert "gpu0_temp_c" in text and "91" in text and "85" in text
