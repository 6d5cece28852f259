"""Runtime setup: seeds, precision policy, XLA, distribution strategy, memory.

The strategy is one device, MirroredStrategy over GPUs or logical CPU devices
(`--cpu-replicas`), or MultiWorkerMirroredStrategy from `TF_CONFIG`. In a
multi-worker job `is_chief` decides who writes the run folder, `worker_write_dir`
is where the others write, `broadcast_from_chief` makes them follow the chief's
decisions, and a worker that dies or never starts ends the job in bounded time
with one clear message (docs/distributed.md).

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

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import psutil
import tensorflow as tf
from tensorflow.python.distribute import multi_worker_util  # TF's own chief rule, not re-derived here

from caption_tf.config import TrainConfig
from caption_tf.training.supervisor import TrainingStopped

EXIT_WORKER_LOST = 5  # train.py's exit code when another worker of a multi-worker job died
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

    auto: on with GPUs, off on CPU: there every decoder family's XLA speed-up straddled 1
    (0.73-1.28x medians, parallel families slower) and compiling took 16-61 s more
    (benchmarks/RESULTS.md, "Decoders vs the classic tutorial loop"). on/off are
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


_PROCESS_CLUSTER: tf.distribute.Strategy | None = None  # this process's MultiWorkerMirroredStrategy, once made


def configure_cpu_replicas(replicas: int) -> None:
    """Split the CPU into `replicas` logical devices, so MirroredStrategy can run that many replicas.

    This is how the multi-GPU code path runs on a machine without GPUs: the same
    strategy selection, the same per-replica batches and cross-replica sums, only
    the devices are slices of one CPU. TensorFlow fixes its devices when it first
    uses them, so this must run before any TensorFlow op (`train.py --cpu-replicas N`
    calls it right after reading the flags). Calling it again with the same count is
    a no-op.

    Args:
        replicas: logical CPU devices wanted (1: leave the device setup as it is).

    Raises:
        ValueError: for `replicas < 1`, or when GPUs are visible (mixing CPU and GPU
            replicas would make the GPUs wait for the CPU).
        RuntimeError: when TensorFlow's devices are already initialised with another count.
    """
    if replicas < 1:
        raise ValueError(f"--cpu-replicas must be >= 1, got {replicas}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    if replicas == 1 or len(tf.config.get_logical_device_configuration(cpu) or []) == replicas:
        return
    if tf.config.list_physical_devices("GPU"):
        raise ValueError(
            f"--cpu-replicas {replicas} is for machines without GPUs; this one has GPUs "
            "(--distribute auto already mirrors over them). To try it anyway, hide them: CUDA_VISIBLE_DEVICES= python train.py ..."
        )
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError as err:
        raise RuntimeError(
            f"--cpu-replicas {replicas}: TensorFlow's devices are already initialised ({err}). "
            "Split the CPU before any TensorFlow op runs: pass --cpu-replicas to train.py, or call "
            "configure_cpu_replicas() first thing in a fresh process."
        ) from None


def cluster_workers() -> list[str]:
    """The worker addresses named by the `TF_CONFIG` environment variable ([] when unset)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return []
    try:
        cluster = json.loads(raw).get("cluster", {})
    except (ValueError, AttributeError):
        raise ValueError(f"TF_CONFIG is not a JSON object: {raw!r}") from None
    return list(cluster.get("chief", [])) + list(cluster.get("worker", []))


def select_strategy(requested: str, cpu_replicas: int = 1, cluster_start_timeout: float = 600) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy for `--distribute` (and `--cpu-replicas`).

    auto: MultiWorkerMirrored when `TF_CONFIG` names workers; Mirrored when there are
    several GPUs, or several logical CPU devices (`--cpu-replicas N`); else the default
    (one device). Mirrored runs over every GPU, or over every logical CPU device when
    there is no GPU. The multi-worker strategy waits for every worker of `TF_CONFIG`
    to start; after `cluster_start_timeout` seconds this process is ended with a
    message saying so (TensorFlow would wait forever).
    """
    if requested not in ("auto", "default", "mirrored", "multiworker"):
        raise ValueError(f"--distribute must be auto, default, mirrored or multiworker, got {requested!r}")
    if requested == "auto" and cluster_workers():
        requested = "multiworker"
    if requested == "multiworker" and cpu_replicas > 1:
        raise ValueError(
            f"--cpu-replicas {cpu_replicas} with MultiWorkerMirroredStrategy: TensorFlow runs one replica per "
            "CPU-only worker. Start one train.py process per replica instead (see docs/distributed.md)."
        )
    configure_cpu_replicas(cpu_replicas)
    if requested == "auto":
        several = len(tf.config.list_logical_devices("GPU")) > 1 or len(tf.config.list_logical_devices("CPU")) > 1
        requested = "mirrored" if several else "default"
    if requested == "multiworker":
        global _PROCESS_CLUSTER
        if _PROCESS_CLUSTER is None:  # once per process: it starts TensorFlow's collective runtime
            with give_up_after(cluster_start_timeout, _cluster_did_not_form(cluster_start_timeout)):
                _PROCESS_CLUSTER = tf.distribute.MultiWorkerMirroredStrategy()  # waits for every worker
        return _PROCESS_CLUSTER
    if requested == "mirrored":
        return tf.distribute.MirroredStrategy()  # all GPUs, else all logical CPU devices
    return tf.distribute.get_strategy()


# ------------------------------------------------------------------ who writes what (multi-worker)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans several processes (MultiWorkerMirroredStrategy with a cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is not None and resolver.task_type is not None


def worker_id(strategy: tf.distribute.Strategy) -> int:
    """This process's index in the cluster (0 outside multi-worker training)."""
    if not is_multi_worker(strategy):
        return 0
    resolver = strategy.cluster_resolver
    return multi_worker_util.id_in_cluster(resolver.cluster_spec(), resolver.task_type, resolver.task_id)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the shared outputs: run folder, checkpoints, TensorBoard, CSV.

    True for one device, MirroredStrategy (one process) and the chief of a
    multi-worker cluster (task `chief`, or `worker` 0 when there is no `chief` task).
    The other workers compute the same steps and write only into `worker_write_dir`.

    Example:

    >>> is_chief(tf.distribute.get_strategy())
    True
    """
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    return multi_worker_util.is_chief(resolver.cluster_spec(), resolver.task_type, resolver.task_id)


def process_is_chief() -> bool:
    """`is_chief` for code that holds no strategy (the CLI, phase bookkeeping after `train`).

    False only in a non-chief worker of the multi-worker strategy this process created.
    """
    return _PROCESS_CLUSTER is None or is_chief(_PROCESS_CLUSTER)


WORKER_DIR_PATTERN = "worker-{}.tmp"  # inside the run folder, one per non-chief worker


def worker_write_dir(path: str | Path, strategy: tf.distribute.Strategy) -> Path:
    """Where this process writes what would go under `path`: `path` itself on the chief.

    A non-chief worker gets `path/worker-<id>.tmp/`, its own folder, so no two
    processes write the same file. It holds the worker's checkpoint snapshots (every
    worker must take part in a save: reading some variables is a collective),
    TensorBoard events and health log, and is deleted when the worker ends
    (`remove_worker_dir`). A crash leaves it; the next start of that worker clears it.

    Example:

    >>> worker_write_dir("runs/x", tf.distribute.get_strategy())
    PosixPath('runs/x')
    """
    path = Path(path)
    return path if is_chief(strategy) else path / WORKER_DIR_PATTERN.format(worker_id(strategy))


def remove_worker_dir(path: str | Path, strategy: tf.distribute.Strategy) -> None:
    """Delete this worker's `worker_write_dir(path)` (nothing on the chief)."""
    if not is_chief(strategy):
        shutil.rmtree(worker_write_dir(path, strategy), ignore_errors=True)


def broadcast_from_chief(strategy: tf.distribute.Strategy, value: int) -> int:
    """The chief's `value` on every worker; also a barrier (a collective every worker joins).

    Outside multi-worker training it returns `value`. Workers use it to follow
    decisions only the chief makes (resume or not, which checkpoint), after the
    chief has made them.

    Example:

    >>> broadcast_from_chief(tf.distribute.get_strategy(), 7)
    7
    """
    if not is_multi_worker(strategy):  # one process: nothing to agree on
        return value
    mine = tf.constant(value if is_chief(strategy) else 0, tf.int64)

    @tf.function
    def sum_of_chief_value():
        def chief_replica_only():  # the chief's first device contributes, every other replica 0
            first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
            return tf.where(first, mine, tf.constant(0, tf.int64))

        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(chief_replica_only), axis=None)

    return int(sum_of_chief_value().numpy())


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Seeds, global dtype policy and strategy; call before building any model.

    The strategy is created first: MultiWorkerMirroredStrategy must exist before
    TensorFlow initialises its devices.
    """
    strategy = select_strategy(cfg.distribute, cfg.cpu_replicas, cfg.cluster_start_timeout)
    keras.utils.set_random_seed(cfg.seed)
    precision = resolve_precision(cfg.precision)
    keras.mixed_precision.set_global_policy(precision)
    return Runtime(strategy=strategy, precision=precision, jit_compile=resolve_jit(cfg.jit, strategy))


# Keras 3.15's `fit` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585,
# tensorflow/tensorflow#72388). Two places fail; `keras_multi_worker_fixes` mends both,
# only when this process trains multi-worker.


def _reduce_per_replica_scalars_too(reduce_per_replica):
    """Keras' `reduce_per_replica`, except that multi-worker "mean" also reduces scalars.

    Keras reduces each per-replica train/test log with `strategy.reduce("MEAN", v, axis=0)`
    under the multi-worker strategy, which fails for a scalar ("Invalid reduction dimension
    0 for input with 0 dimensions"); a scalar's mean over the replicas is `axis=None`.
    """

    def reduce(values, strategy, reduction):
        if reduction in ("auto", "mean") and is_multi_worker(strategy):

            def mean(value):
                rank = strategy.experimental_local_results(value)[0].shape.rank
                return strategy.reduce("MEAN", value, axis=0 if rank else None)

            return tf.nest.map_structure(mean, values)
        return reduce_per_replica(values, strategy, reduction)

    reduce.patched_for_multi_worker = True
    return reduce


def keras_multi_worker_fixes(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Let Keras 3 `fit`/`evaluate` run `model` under MultiWorkerMirroredStrategy.

    1. The per-replica logs of each step are averaged with an axis scalars lack
       (`_reduce_per_replica_scalars_too`).
    2. Each `fit`/`evaluate` first draws a batch and averages it over the replicas
       to build the model symbolically; the multi-worker strategy cannot reduce a
       nested batch ("Attempt to convert a value (PerReplica...) to a Tensor"). Our
       model, optimizer and metrics are built before `fit`, so that build has nothing
       to do: it runs here without the batch (and fails loudly if something is unbuilt).

    Nothing changes outside multi-worker training.
    """
    if not is_multi_worker(strategy):
        return
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    if not getattr(keras_tf_trainer.reduce_per_replica, "patched_for_multi_worker", False):
        keras_tf_trainer.reduce_per_replica = _reduce_per_replica_scalars_too(keras_tf_trainer.reduce_per_replica)

    def symbolic_build_without_data(iterator=None, data_batch=None):
        unbuilt = [layer.name for layer in model._flatten_layers() if not layer.built]
        if unbuilt or (model.optimizer is not None and not model.optimizer.built):
            raise RuntimeError(f"Build the model and its optimizer before fit under MultiWorkerMirroredStrategy (not built: {unbuilt or 'optimizer'})")
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", symbolic_build_without_data)  # past Keras' attribute tracking


# ------------------------------------------------------------------ a worker that dies or never comes
#
# Bounded failure. While training, TensorFlow's coordination service notices a worker
# that stopped sending heartbeats (about 10 s) and aborts every collective in the
# survivors: `worker_loss_reported` turns that error into one clear message and exit
# code 5. Before training, the multi-worker strategy waits for every worker without a
# limit: `give_up_after` bounds that wait.


# Runs beside a process blocked in TensorFlow: the waiting call holds the GIL, so no
# Python thread of that process could act, and SIGTERM is ignored meanwhile.
_WATCHDOG = (
    "import os, signal, sys, time\n"
    "pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]\n"
    "time.sleep(seconds)\n"
    "print('error: ' + message, file=sys.stderr, flush=True)\n"
    "os.kill(pid, signal.SIGKILL)\n"
)


@contextlib.contextmanager
def give_up_after(seconds: float, message: str):
    """End this process (SIGKILL, exit status 137) if the block still runs after `seconds`.

    For blocking calls that cannot be interrupted from Python (TensorFlow waiting
    for the cluster inside C++, holding the GIL). A small watchdog process prints
    `error: <message>` to this process's stderr first; it is stopped when the block ends.
    """
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message], stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


def _cluster_did_not_form(seconds: float) -> str:
    return (
        f"the multi-worker job did not start: not every worker of TF_CONFIG ({', '.join(cluster_workers())}) joined"
        f" within {seconds:g} s (--cluster-start-timeout). Start train.py on every worker, each with the same"
        " cluster list and its own task index, and check that these addresses are reachable from each other."
    )


_TASK = re.compile(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)")


def describe_lost_worker(text: str, strategy: tf.distribute.Strategy) -> str:
    """'worker /job:worker/task:1 stopped sending heartbeats (...)' from TensorFlow's error text.

    Example:

    ```python
    describe_lost_worker("... unhealthy (stopped sending heartbeats): /job:worker/replica:0/task:1 ...", strategy)
    # 'worker /job:worker/task:1 stopped sending heartbeats (it crashed or was killed)'
    ```
    """
    resolver = strategy.cluster_resolver
    me = (resolver.task_type, str(resolver.task_id))
    others = [f"/job:{job}/task:{task}" for job, task in _TASK.findall(text) if (job, task) != me]
    who = f"worker {others[0]}" if others else "another worker"
    if "heartbeat" in text:
        return f"{who} stopped sending heartbeats (it crashed or was killed)"
    if "incarnation" in text:
        return f"{who} was restarted while the job ran"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{who} stopped responding ({lines[-1][:300] if lines else type(text).__name__})"


# What TensorFlow raises in the survivors when a worker dies: the coordination service
# misses its heartbeats and aborts every collective (Unavailable), or a collective's
# connection to it breaks (Unavailable, Cancelled, Aborted, DeadlineExceeded).
WORKER_LOST_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
    tf.errors.DeadlineExceededError,
)


@contextlib.contextmanager
def worker_loss_reported(strategy: tf.distribute.Strategy):
    """In multi-worker training, turn TensorFlow's error for a dead worker into a `TrainingStopped`.

    The message says what happened and what to do; train.py exits with
    `EXIT_WORKER_LOST` (5). Outside multi-worker training errors pass unchanged.

    Example:

    ```python
    with worker_loss_reported(strategy):
        model.fit(ds)
    ```
    """
    if not is_multi_worker(strategy):
        yield
        return
    try:
        yield
    except WORKER_LOST_ERRORS as err:
        raise TrainingStopped(
            f"Training stopped: {describe_lost_worker(str(getattr(err, 'message', err)), strategy)}; a"
            f" {len(cluster_workers())}-worker job cannot go on without it. Restart every worker with its command:"
            " training resumes from the last checkpoint.",
            EXIT_WORKER_LOST,
            "stopped: a worker was lost",
        ) from None
