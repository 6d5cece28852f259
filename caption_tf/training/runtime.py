"""Runtime setup: seeds, precision policy, XLA, distribution strategy, memory.

Under `mixed_float16`, `model.compile` wraps the optimizer in a Keras
`LossScaleOptimizer` (the decoder's dtype policy is the global one), and
`CaptionDecoder.train_step` scales the loss with `optimizer.scale_loss`.
Attention scores, softmax, logits and the loss stay float32.

Example:

```python
runtime = setup_runtime(TrainConfig(precision="auto", jit="auto"))
runtime.precision  # float32 on a CPU, mixed_float16 on a GPU with compute capability >= 7.0
```
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import keras
import psutil
import tensorflow as tf

from caption_tf.config import TrainConfig

MIN_FP16_COMPUTE_CAPABILITY = (7, 0)  # tensor cores: Volta and newer
# Keep cached features below this share of the RAM available when the pipeline is built:
# the rest is for the model, the shuffle buffer, prefetching and the other processes.
MEMORY_CACHE_FRACTION = 0.5
FEATURE_BYTES = 2  # the cache stores float16 grids


@dataclass
class Runtime:
    strategy: tf.distribute.Strategy
    precision: str
    jit_compile: bool

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def global_batch_size(self, per_replica: int) -> int:
        """Examples per optimizer step: each replica takes `per_replica` of them."""
        return per_replica * self.replicas


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        if "compute_capability" in details:
            caps.append(tuple(details["compute_capability"]))
    return caps


def resolve_precision(requested: str) -> str:
    """auto: mixed_float16 when every GPU has tensor cores, float32 otherwise (CPU included)."""
    if requested != "auto":
        return requested
    caps = gpu_compute_capabilities()
    return "mixed_float16" if caps and min(caps) >= MIN_FP16_COMPUTE_CAPABILITY else "float32"


def _replicas_on_cpu(strategy: tf.distribute.Strategy) -> bool:
    if strategy.num_replicas_in_sync <= 1:  # the default strategy has no worker_devices
        return False
    return any("CPU" in device.upper() for device in strategy.extended.worker_devices)


def resolve_jit(requested: str, strategy: tf.distribute.Strategy) -> bool:
    """Whether to XLA-compile the train step and decoding loops.

    auto: on with GPUs, off on CPU (no consistent gain measured there). on/off are
    obeyed, except that XLA under a multi-replica strategy on CPU devices fails
    ("Trying to access resource ... located in device CPU:1", an XLA limitation),
    so it is turned off there with a warning.

    Example:

    ```python
    resolve_jit("auto", tf.distribute.get_strategy())  # False on a CPU-only machine
    ```
    """
    if requested not in ("auto", "on", "off"):
        raise ValueError(f"--jit must be auto, on or off, got {requested!r}")
    if requested == "off":
        return False
    if _replicas_on_cpu(strategy):
        if requested == "on":
            warnings.warn("--jit on ignored: XLA fails under a multi-replica strategy on CPU devices; running without XLA")
        return False
    return requested == "on" or bool(tf.config.list_physical_devices("GPU"))


def per_replica_clipnorm(clipnorm: float | None, replicas: int) -> float | None:
    """Clip norm to give the optimizer so clipping means the same on any number of replicas.

    Keras clips each replica's gradient before the cross-replica sum, and each replica's
    loss is divided by the replica count; clipping that share at clipnorm / replicas
    clips every replica's own mean gradient at `clipnorm`.

    Example:

    >>> per_replica_clipnorm(5.0, 4)
    1.25
    """
    return None if clipnorm is None else clipnorm / replicas


def feature_bytes(num_images: int, grid_shape: tuple[int, int]) -> int:
    """Bytes the float16 feature grids of `num_images` images take in memory."""
    cells, dim = grid_shape
    return num_images * cells * dim * FEATURE_BYTES


def fits_in_memory(num_bytes: int, fraction: float = MEMORY_CACHE_FRACTION) -> bool:
    """Whether `num_bytes` fit in `fraction` of the RAM available now (psutil).

    Example:

    >>> fits_in_memory(feature_bytes(1000, (64, 2048)))   # 262 MB
    True
    """
    return num_bytes <= fraction * psutil.virtual_memory().available


def dataset_options(strategy: tf.distribute.Strategy) -> tf.data.Options:
    """tf.data options for `strategy`: multi-worker runs shard by data, not by file.

    The feature cache may have fewer shard files than workers (and the pipeline caches
    and expands images into caption pairs), so each worker keeps every N-th batch.
    """
    options = tf.data.Options()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes the run's files: the chief of a multi-worker cluster, else always.

    Other workers write what every worker must write (checkpoints) to a temporary folder of
    their own, as Keras' BackupAndRestore and ModelCheckpoint do.
    """
    return bool(strategy.extended.should_checkpoint)


def select_strategy(requested: str) -> tf.distribute.Strategy:
    """auto: MultiWorkerMirrored when TF_CONFIG names workers, Mirrored on >1 GPU, else the default."""
    if requested == "auto":
        if "TF_CONFIG" in os.environ and json.loads(os.environ["TF_CONFIG"]).get("cluster", {}).get("worker"):
            requested = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            requested = "mirrored"
        else:
            requested = "default"
    if requested == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if requested == "mirrored":
        return tf.distribute.MirroredStrategy()
    if requested == "default":
        return tf.distribute.get_strategy()
    raise ValueError(f"--distribute must be auto, default, mirrored or multiworker, got {requested!r}")


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Seeds, global dtype policy and strategy; call before building any model.

    The strategy is created first: MultiWorkerMirroredStrategy must exist before
    TensorFlow initialises its devices.
    """
    strategy = select_strategy(cfg.distribute)
    keras.utils.set_random_seed(cfg.seed)
    precision = resolve_precision(cfg.precision)
    keras.mixed_precision.set_global_policy(precision)
    return Runtime(strategy=strategy, precision=precision, jit_compile=resolve_jit(cfg.jit, strategy))
