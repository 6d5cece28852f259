"""Resource usage of a trained captioner: parameters, peak memory, latency, throughput.

The full inference path is timed: raw images -> backbone -> greedy decoder,
at several batch sizes, after one warm-up call per batch size (tracing and
allocation are not inference cost). Peak memory is the process RSS sampled by
psutil during the timed calls on CPU, and TensorFlow's peak device memory
(`tf.config.experimental.get_memory_info`) on GPU.

Example:

```python
usage = measure_resources(run, batch_sizes=(1, 8))
usage["throughput"]["8"]["images_per_second"]
```
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np
import psutil
import tensorflow as tf
from tqdm.auto import tqdm

RESOURCE_BATCH_SIZES = (1, 8, 32)
TIMED_REPEATS = 3
RSS_SAMPLE_INTERVAL_S = 0.01
BYTES_PER_MB = 1024.0 * 1024.0


class PeakRSS:
    """Context manager sampling this process's resident memory in a thread: `.start` and `.peak` (bytes), `.peak_mb`.

    psutil has no portable "peak RSS since X", so a short-interval sampler is the
    honest measurement; it can miss spikes shorter than `interval_s`.

    Example:

    >>> with PeakRSS() as rss:
    ...     block = np.ones(50_000_000, np.uint8)  # 50 MB, touched
    >>> rss.peak - rss.start >= 40 * 2**20
    True
    """

    def __init__(self, interval_s: float = RSS_SAMPLE_INTERVAL_S):
        self.interval_s, self.start, self.peak = interval_s, 0, 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakRSS":
        self.start = self._process.memory_info().rss
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float:
        return self.peak / BYTES_PER_MB


def gpu_device() -> str | None:
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else None


def _time_batches(infer, images: np.ndarray, repeats: int) -> list[float]:
    infer(images)  # warm-up: tracing and first allocations
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        infer(images)
        seconds.append(time.perf_counter() - started)
    return seconds


def measure_resources(run, encoder=None, batch_sizes: Sequence[int] = RESOURCE_BATCH_SIZES, repeats: int = TIMED_REPEATS, seed: int = 0,
                      progress: bool = False) -> dict:
    """Parameters, peak memory and latency/throughput of backbone + standardisation + greedy decoding.

    `run` is a loaded `Run`; `encoder` its `features.encoder.ImageEncoder`
    (`evaluation.captioner.run_encoder(run)` when not given). Latency is the
    median over `repeats` timed calls divided by the batch size; throughput its inverse.
    """
    from caption_tf.evaluation.captioner import run_encoder
    from caption_tf.features.encoder import compiled_extractor

    encoder = encoder or run_encoder(run)
    extractor = encoder.extractor
    generator = run.generator()
    infer_images = compiled_extractor(extractor)

    def infer(images):
        grid, _ = infer_images(images)
        tokens, _ = generator.greedy(encoder.standardise(grid.numpy()))
        return tokens.numpy()

    rng = np.random.default_rng(seed)
    device = gpu_device()
    if device:
        tf.config.experimental.reset_memory_stats(device)
    throughput = {}
    with PeakRSS() as rss:
        for batch in tqdm(batch_sizes, desc="resources: timing batch sizes", unit="batch size", disable=not progress):
            images = rng.integers(0, 256, size=(batch, extractor.input_size, extractor.input_size, 3)).astype(np.uint8)
            seconds = float(np.median(_time_batches(infer, images, repeats)))
            throughput[str(batch)] = {
                "batch_size": int(batch),
                "seconds_per_batch": seconds,
                "latency_ms_per_image": 1000.0 * seconds / batch,
                "images_per_second": batch / seconds,
            }
    usage = {
        "device": device or "CPU",
        "backbone": encoder.spec.backbone,
        "input_size": int(extractor.input_size),
        "decoder_parameters": run.model.count_params(),
        "backbone_parameters": extractor.backbone.count_params(),
        "peak_rss_mb": rss.peak_mb,
        "throughput": throughput,
        "repeats": repeats,
    }
    usage["total_parameters"] = usage["decoder_parameters"] + usage["backbone_parameters"]
    if device:
        usage["peak_device_memory_mb"] = tf.config.experimental.get_memory_info(device)["peak"] / BYTES_PER_MB
    return usage
