"""Training health: system/GPU monitoring, alerts, and a NaN/Inf loss guard.

`HealthMonitor` samples RAM, process RSS, free disk and (when an NVIDIA
driver is present) GPU utilisation/memory/temperature every N batches or
seconds, writes them to TensorBoard under `health/...`, prints one compact
line per epoch, and appends threshold crossings to `<run_dir>/alerts.jsonl`
(and to TensorBoard's text dashboard, `health/alerts`).
When free disk falls below what the next checkpoint needs, it asks for a
final save (if that still fits) and stops training cleanly.

`NonFiniteLossGuard` stops training on a NaN/Inf loss and makes sure those
weights are never saved.

Example:

```python
monitor = HealthMonitor(run_dir, log_dir=run_dir / "logs",
                        checkpoint_bytes=lambda: store.last_published.total_bytes if store.last_published else None,
                        final_save=backup.save_now)
guard = NonFiniteLossGuard(store)
model.fit(ds, epochs=3, callbacks=[guard, backup, monitor])
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import keras
import numpy as np
import psutil
import tensorflow as tf

from caption_tf.run_folder import ALERTS_FILE

logger = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2
DEFAULT_EVERY_N_BATCHES = 50
DEFAULT_EVERY_SECONDS = 60.0
DEFAULT_RAM_PERCENT_MAX = 90.0
DEFAULT_GPU_MEMORY_PERCENT_MAX = 95.0
DEFAULT_GPU_TEMP_C_MAX = 85.0
DEFAULT_MIN_FREE_DISK_GB = 2.0
DEFAULT_DISK_SAFETY_FACTOR = 2.0
ALERTS_TAG = "health/alerts"


def system_health(path: str | Path) -> dict[str, float]:
    """RAM, process RSS and free disk at `path`, as plain floats.

    Example:

    >>> sorted(system_health("."))
    ['disk_free_gb', 'process_rss_gb', 'ram_percent', 'ram_used_gb']
    """
    memory = psutil.virtual_memory()
    return {
        "ram_percent": float(memory.percent),
        "ram_used_gb": (memory.total - memory.available) / GIB,
        "process_rss_gb": psutil.Process().memory_info().rss / GIB,
        "disk_free_gb": shutil.disk_usage(path).free / GIB,
    }


class GpuProbe:
    """Reads NVIDIA GPU utilisation, memory and temperature per device via NVML (`nvidia-ml-py`).

    Without a driver or without `nvidia-ml-py`, `available` is False, one info line says
    why, and `read()` returns an empty list. A driver that is there but fails (at start or
    on a later reading) is a broken probe, not "no GPU": it is logged as a warning, once per
    device, metric and error, and the other readings go on. Devices hidden by
    `CUDA_VISIBLE_DEVICES` (a list of indices) are not read; tags keep the NVML index.

    Args:
        nvml: the NVML module (default: `pynvml`); tests pass one fed fixed values.

    Example (on a machine without an NVIDIA driver):

    ```python
    probe = GpuProbe()
    probe.available, probe.reason  # False, 'NVMLError_LibraryNotFound: NVML Shared Library Not Found'
    probe.read()  # []
    ```
    """

    # NVML's "there is no NVIDIA driver here" errors: the normal state of a CPU machine.
    NO_DRIVER_ERRORS = ("NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED")

    def __init__(self, nvml=None):
        self.available, self.reason = False, ""  # reason: why there are no readings
        self.errors: dict[tuple, str] = {}  # (device, metric, error type) -> message, each logged once
        self._devices: list[tuple[int, object]] = []
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            self._nvml = nvml
            count = nvml.nvmlDeviceGetCount()
            self._devices = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in visible_gpu_indices(count)]
            self.available = bool(self._devices)
            self.reason = "" if self._devices else ("CUDA_VISIBLE_DEVICES hides every GPU" if count else "NVML sees no GPU")
            if count and not self._devices:
                logger.info("GPU health metrics skipped: CUDA_VISIBLE_DEVICES hides all %d GPUs.", count)
        except ImportError as err:
            self.reason = f"{type(err).__name__}: {err}"
            logger.info("GPU health metrics skipped: nvidia-ml-py is not installed (%s).", err)
        except Exception as err:  # noqa: BLE001 - NVML raises its own error classes
            self.reason = f"{type(err).__name__}: {err}"
            if getattr(err, "value", None) in [getattr(nvml, name, None) for name in self.NO_DRIVER_ERRORS]:
                logger.info("GPU health metrics skipped: no NVIDIA driver (%s).", err)
            else:
                self._error(None, "init", err)

    def read(self) -> list[dict[str, float]]:
        """One dict per visible device: index, util_percent, memory_percent, memory_used_gb, temp_c (what could be read)."""
        readings = []
        for index, handle in self._devices:
            reading: dict[str, float] = {"index": index}
            for metric, read in (("util_percent", self._utilisation), ("memory", self._memory), ("temp_c", self._temperature)):
                try:
                    reading.update(read(handle))
                except Exception as err:  # noqa: BLE001 - one failing metric must not stop training or the others
                    self._error(index, metric, err)
            readings.append(reading)
        return readings

    def _utilisation(self, handle) -> dict:
        return {"util_percent": float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)}

    def _memory(self, handle) -> dict:
        memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        return {"memory_percent": 100.0 * memory.used / memory.total, "memory_used_gb": memory.used / GIB}

    def _temperature(self, handle) -> dict:
        return {"temp_c": float(self._nvml.nvmlDeviceGetTemperature(handle, self._nvml.NVML_TEMPERATURE_GPU))}

    def _error(self, device: Optional[int], metric: str, err: BaseException) -> None:
        key = (device, metric, type(err).__name__)
        if key in self.errors:
            return
        self.errors[key] = f"{type(err).__name__}: {err}"
        where = "NVML failed to start" if device is None else f"reading GPU{device} {metric} failed"
        logger.warning("GPU health probe: %s (%s: %s); logged once, the other readings go on.", where, type(err).__name__, err)


def visible_gpu_indices(count: int, visible: Optional[str] = None) -> list[int]:
    """NVML indices of the GPUs this process may use: `CUDA_VISIBLE_DEVICES` when it lists indices, else all.

    Example:

    >>> visible_gpu_indices(4, "2,0"), visible_gpu_indices(2, "GPU-5e1b..."), visible_gpu_indices(2, "")
    ([2, 0], [0, 1], [])
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible is None:
        return list(range(count))
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(v.isdigit() for v in entries):  # GPU UUIDs or MIG names: NVML order is unknown, read all
        return list(range(count))
    indices = []
    for v in entries:
        if int(v) >= count or int(v) < 0:
            break  # CUDA ignores the entries from the first invalid one
        indices.append(int(v))
    return indices


class HealthMonitor(keras.callbacks.Callback):
    """Samples machine health during `fit`, logs it, alerts, guards the disk.

    Args:
        run_dir: run folder; `alerts.jsonl` goes here and free disk is measured here.
        log_dir: TensorBoard log dir for `health/...` scalars (None: no TensorBoard).
        every_n_batches / every_seconds: sample when either period has passed.
        ram_percent_max, gpu_memory_percent_max, gpu_temp_c_max,
        min_free_disk_gb: alert thresholds.
        checkpoint_bytes: returns the size of the last checkpoint (or None).
        disk_safety_factor: stop when free disk < checkpoint size x this.
        final_save: called once before stopping for low disk, if one more
            checkpoint still fits.
        gpu_probe: a `GpuProbe` (default: a new one).
        step: returns the global step to log at (default: batches seen by this callback);
            the trainer passes the checkpointed position, so a resumed run continues the curves.

    Example:

    ```python
    monitor = HealthMonitor("runs/x", log_dir="runs/x/logs", every_n_batches=20)
    model.fit(ds, callbacks=[monitor])
    monitor.last_sample["ram_percent"]
    ```
    """

    def __init__(
        self,
        run_dir: str | Path,
        log_dir: Optional[str | Path] = None,
        every_n_batches: int = DEFAULT_EVERY_N_BATCHES,
        every_seconds: float = DEFAULT_EVERY_SECONDS,
        ram_percent_max: float = DEFAULT_RAM_PERCENT_MAX,
        gpu_memory_percent_max: float = DEFAULT_GPU_MEMORY_PERCENT_MAX,
        gpu_temp_c_max: float = DEFAULT_GPU_TEMP_C_MAX,
        min_free_disk_gb: float = DEFAULT_MIN_FREE_DISK_GB,
        checkpoint_bytes: Optional[Callable[[], Optional[int]]] = None,
        disk_safety_factor: float = DEFAULT_DISK_SAFETY_FACTOR,
        final_save: Optional[Callable[[], Any]] = None,
        gpu_probe: Optional[GpuProbe] = None,
        step: Optional[Callable[[], int]] = None,
    ):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(log_dir) if log_dir else None
        self.every_n_batches = every_n_batches
        self.every_seconds = every_seconds
        self.ram_percent_max = ram_percent_max
        self.gpu_memory_percent_max = gpu_memory_percent_max
        self.gpu_temp_c_max = gpu_temp_c_max
        self.min_free_disk_gb = min_free_disk_gb
        self.checkpoint_bytes = checkpoint_bytes
        self.disk_safety_factor = disk_safety_factor
        self.final_save = final_save
        self.gpu_probe = gpu_probe
        self.step = step or (lambda: self._step)
        self.alerts_path = self.run_dir / ALERTS_FILE
        self.last_sample: dict[str, float] = {}
        self.stopped_for_disk = False
        self._active_alerts: set[str] = set()
        self._writer = None
        self._step = 0
        self._epoch = 0
        self._last_sample_step = 0
        self._last_sample_time = 0.0
        self._last_logged_step: Optional[int] = None

    # -- keras hooks

    def on_train_begin(self, logs=None):
        if self.gpu_probe is None:
            self.gpu_probe = GpuProbe()
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        # Past step 0 (a resumed process, phase 2, the next fit), the point at this step is the one logged before.
        step = int(self.step())
        self._last_logged_step = step if step > 0 else self._last_logged_step
        self.sample()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        self._batch = batch
        due_batches = self.every_n_batches and self._step - self._last_sample_step >= self.every_n_batches
        due_time = self.every_seconds and time.monotonic() - self._last_sample_time >= self.every_seconds
        if due_batches or due_time:
            self.sample()

    def on_epoch_end(self, epoch, logs=None):
        sample = self.sample()
        print(f"health epoch {epoch + 1}: {format_sample(sample)}", flush=True)
        if self._writer is not None:
            self._writer.flush()  # the epoch's health is on the dashboard now, not minutes later

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # -- sampling

    def sample(self) -> dict[str, float]:
        """Take one sample now: log it, check thresholds, guard the disk."""
        sample = system_health(self.run_dir)
        for gpu in self.gpu_probe.read() if self.gpu_probe else []:
            for key, value in gpu.items():
                if key != "index":
                    sample[f"gpu{gpu['index']}_{key}"] = value
        self.last_sample = sample
        self._last_sample_step = self._step
        self._last_sample_time = time.monotonic()
        step = int(self.step())
        # One sample per step on the curves (an epoch end and the next fit's start share a step).
        if self._writer is not None and step != self._last_logged_step:
            self._last_logged_step = step
            with self._writer.as_default(step=step):
                for key, value in sample.items():
                    tf.summary.scalar(f"health/{key}", value)
        self._check_thresholds(sample)
        self._guard_disk(sample)
        return sample

    def _check_thresholds(self, sample: dict[str, float]) -> None:
        limits = {"ram_percent": (self.ram_percent_max, "above")}
        limits["disk_free_gb"] = (self.min_free_disk_gb, "below")
        for key in sample:
            if key.endswith("_memory_percent"):
                limits[key] = (self.gpu_memory_percent_max, "above")
            elif key.endswith("_temp_c"):
                limits[key] = (self.gpu_temp_c_max, "above")
        for key, (limit, direction) in limits.items():
            value = sample[key]
            crossed = value > limit if direction == "above" else value < limit
            if crossed and key not in self._active_alerts:
                self._active_alerts.add(key)  # alert once per crossing, not every sample
                self.alert(key, value, limit, f"{key} = {readable(value)} is {direction} the threshold {limit}")
            elif not crossed:
                self._active_alerts.discard(key)

    def _guard_disk(self, sample: dict[str, float]) -> None:
        ckpt_bytes = self.checkpoint_bytes() if self.checkpoint_bytes else None
        if self.stopped_for_disk or not ckpt_bytes or self.model is None:
            return
        free_bytes = sample["disk_free_gb"] * GIB
        needed = ckpt_bytes * self.disk_safety_factor
        if free_bytes >= needed:
            return
        self.stopped_for_disk = True
        saved = "no final save was requested"
        if self.final_save is not None and free_bytes >= ckpt_bytes:
            try:
                self.final_save()
                saved = "a final checkpoint was requested"
            except Exception as err:  # noqa: BLE001 - stopping cleanly matters more
                saved = f"the final save failed ({err})"
        elif self.final_save is not None:
            saved = "there is no room for a final save; the last checkpoint is kept"
        self.alert(
            "disk_checkpoint",
            free_bytes / GIB,
            needed / GIB,
            f"Free disk at {self.run_dir} is {free_bytes / MIB:.0f} MiB, below the {needed / MIB:.0f} MiB "
            f"the next checkpoint needs ({ckpt_bytes / MIB:.1f} MiB x {self.disk_safety_factor}): "
            f"stopping training; {saved}. Free some space and resume.",
        )
        self.model.stop_training = True

    def alert(self, kind: str, value: float, threshold: float, message: str) -> None:
        """Log a warning, append a JSON line to `alerts.jsonl`, and show it in TensorBoard (text `health/alerts`)."""
        logger.warning("HEALTH ALERT: %s", message)
        if self._writer is not None:
            with self._writer.as_default(step=int(self.step())):
                tf.summary.text(ALERTS_TAG, f"**{kind}** (epoch {self._epoch + 1}): {message}")
            self._writer.flush()
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": kind,
            "value": value,
            "threshold": threshold,
            "epoch": self._epoch,
            "step": int(self.step()),
            "message": message,
        }
        with open(self.alerts_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def readable(value: float) -> str:
    """Three significant digits below 100, so 0.029 GB is not printed as 0.0.

    Example:

    >>> readable(0.029), readable(70.14), readable(1234.5)
    ('0.029', '70.1', '1234')
    """
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_sample(sample: dict[str, float]) -> str:
    """One compact console line.

    Example:

    >>> format_sample({"ram_percent": 41.0, "process_rss_gb": 1.2, "disk_free_gb": 70.0})
    'RAM 41% (process 1.20 GB) | disk 70 GB free'
    """
    parts = [
        f"RAM {sample.get('ram_percent', float('nan')):.0f}% (process {sample.get('process_rss_gb', float('nan')):.2f} GB)",
        f"disk {readable(sample.get('disk_free_gb', float('nan')))} GB free",
    ]
    gpus = sorted({int(key[3:].split("_")[0]) for key in sample if key.startswith("gpu")})
    for index in gpus:
        value = lambda name: sample.get(f"gpu{index}_{name}", float("nan"))  # noqa: E731 - a metric NVML could not read: nan
        parts.append(f"GPU{index} {value('util_percent'):.0f}% util, mem {value('memory_percent'):.0f}%, {value('temp_c'):.0f}C")
    return " | ".join(parts)


def read_alerts(run_dir: str | Path) -> list[dict]:
    """The alerts of a run, oldest first (empty if none).

    Example:

    ```python
    [a["kind"] for a in read_alerts("runs/x")]
    ```
    """
    path = Path(run_dir) / ALERTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops training on a NaN/Inf loss; those weights are never saved.

    Unlike `keras.callbacks.TerminateOnNaN`, it also makes the checkpoint store
    refuse every later save, so no epoch-end or final save can write the broken
    weights. `message` says where it happened; the trainer reports it once.

    Args:
        store: optional object with `refuse_saves(reason)` (a `VerifiedCheckpointManager`).
        monitor: the log key to check.

    Example:

    ```python
    guard = NonFiniteLossGuard(store)
    model.fit(ds, callbacks=[guard, backup])
    guard.tripped_at   # (epoch, batch) or None
    ```
    """

    def __init__(self, store: Any = None, monitor: str = "loss"):
        super().__init__()
        self.store = store
        self.monitor = monitor
        self.tripped_at: Optional[tuple[int, int]] = None
        self.message = ""
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or self.tripped_at is not None:
            return
        value = float(np.asarray(value))
        if math.isfinite(value):
            return
        self.tripped_at = (self._epoch, batch)
        self.model.stop_training = True
        if self.store is not None:
            self.store.refuse_saves(f"the {self.monitor} became {value} at epoch {self._epoch}, batch {batch}")
        self.message = (
            f"Training stopped: {self.monitor} became {value} at epoch {self._epoch + 1}, batch {batch + 1}. "
            "These weights were NOT saved."
        )
