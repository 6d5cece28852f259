"""Runtime setup: seeds, precision policy, XLA, distribution strategy.

Example:

>>> runtime = setup_runtime(TrainConfig(precision="auto", jit="auto"))
>>> runtime.precision   # float32 on a CPU, mixed_float16 on a GPU with compute capability >= 7.0
'float32'
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import keras
import tensorflow as tf

from caption_tf.config import TrainConfig

MIN_FP16_COMPUTE_CAPABILITY = (7, 0)  # tensor cores: Volta and newer


@dataclass
class Runtime:
    strategy: tf.distribute.Strategy
    precision: str
    jit_compile: bool

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


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


def resolve_jit(requested: str, strategy: tf.distribute.Strategy) -> bool:
    """auto: XLA on GPUs; off on CPU, where it gave no consistent gain and fails under MirroredStrategy."""
    if requested == "on":
        return True
    if requested == "off":
        return False
    return bool(tf.config.list_physical_devices("GPU"))


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
    return tf.distribute.get_strategy()


def setup_runtime(cfg: TrainConfig) -> Runtime:
    keras.utils.set_random_seed(cfg.seed)
    precision = resolve_precision(cfg.precision)
    keras.mixed_precision.set_global_policy(precision)
    strategy = select_strategy(cfg.distribute)
    return Runtime(strategy=strategy, precision=precision, jit_compile=resolve_jit(cfg.jit, strategy))
