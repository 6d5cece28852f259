"""train.py on several replicas, the way a user runs it: MirroredStrategy over two logical
CPU devices (`--cpu-replicas 2`) and MultiWorkerMirroredStrategy over two train.py processes
on 127.0.0.1 sharing one checkout. Each run is a real subprocess; kills are real SIGKILLs.

One uninterrupted 2-replica run with dropout and a grid encoder layer (`two_replica_runs`) is
the reference of the resumed 2-replica run (every checkpoint tensor compared: weights, Adam
slots, each replica's dropout RNG, data position). A plain 2-replica run (`plain_two_replica_run`,
no dropout: masks depend on how the batch is split) is the reference of the resumed 2-worker run
(two workers compute exactly what two devices of one process compute) and of a 1-replica run at
the same global batch.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_overrides, h5_arrays, cli_flags

# 32 training images x 5 captions = 160 pairs; global batch 16 -> 10 steps per epoch.
EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 2, 10, 3
# Adam (the product's optimizer) at 1e-3 for the global batch: the 2-replica runs ask for
# 5e-4 per replica batch of 8 and the linear scaling rule doubles it.
TWO_REPLICAS = {"cpu_replicas": 2, "batch_size": 8, "learning_rate": 5e-4}
ONE_REPLICA = {"batch_size": 16, "learning_rate": 1e-3}
# Dropout on in the kill/resume runs: the resumed run must replay each replica's dropout masks.
DROPOUT = {"dropout": 0.3}
ENCODER = {"encoder_layers": 1}  # a grid encoder layer: its weights and Adam slots must resume too
PROCESS_TIMEOUT_S = 300
WORKER_LOST_EXIT = 5  # runtime.EXIT_WORKER_LOST
LOST_WORKER_BOUND_S = 90  # measured 7-12 s on 2 busy cores (docs/distributed.md)


def overrides(tmp, name, **extra) -> dict:
    # Captions cut at 8 tokens: a shorter unrolled decoder traces faster; the tests compare runs.
    # The conv grid adapter (the `fast` preset's) on: its weights go through every comparison here.
    return tiny_overrides(tmp, epochs=EPOCHS, checkpoint_every=CHECKPOINT_EVERY, max_length=8, grid_adapter="conv", run_name=name, **extra)


def train_py(values: dict, log_path, env=None, tf_config=None) -> subprocess.Popen:
    """Start `python train.py --preset minimal <flags>`, output to `log_path`."""
    env = {**os.environ, **(env or {})}
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    log = open(log_path, "w")
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--preset", "minimal", *cli_flags(values)]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


def finish(proc, log_path) -> str:
    code = proc.wait(PROCESS_TIMEOUT_S)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    return text


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_workers(values, tmp, tag, ports, envs) -> list[tuple[subprocess.Popen, object]]:
    """One train.py per worker, TF_CONFIG naming every worker on 127.0.0.1."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index, env in enumerate(envs):
        log_path = tmp / f"{tag}-worker{index}.log"
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        workers.append((train_py(values, log_path, env, tf_config), log_path))
    return workers


def max_abs_diff(path_a, path_b) -> float:
    a, b = h5_arrays(path_a), h5_arrays(path_b)
    assert a.keys() == b.keys() and len(a) > 10
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def checkpoint_tensors(run_dir) -> dict:
    """Every tensor of the run's newest checkpoint (weights, optimizer slots, RNG states, data position) by key."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(run_dir / "checkpoints")))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in key}


def history(run_dir) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def published_steps(run_dir) -> list[int]:
    """Steps of the checkpoints whose manifest (written last, once the files are complete) exists."""
    return sorted(int(p.name[5:].split(".")[0]) for p in (run_dir / "checkpoints").glob("ckpt-*.manifest.json"))


def kill_after_checkpoint(proc, log_path, run_dir, rng) -> int:
    """SIGKILL `proc` a random moment (< 50 ms) after its first checkpoint is published; its newest step."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not published_steps(run_dir):
        assert proc.poll() is None, f"training ended before the kill:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.05))
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(PROCESS_TIMEOUT_S) == -signal.SIGKILL
    return max(published_steps(run_dir))


@pytest.fixture(scope="module")
def two_replica_runs(tmp_path_factory):
    """2-replica MirroredStrategy runs through train.py, dropout on: an uninterrupted reference and,
    beside it, the same command SIGKILLed mid-epoch a random moment after a checkpoint, then rerun.

    Returns (tmp, reference run folder, reference log, resumed run folder, resumed log, newest
    checkpoint step at the kill). `--jit on` is asked for: XLA fails under MirroredStrategy on
    CPU devices, so train.py must turn it off with a warning rather than crash.
    """
    tmp = tmp_path_factory.mktemp("distribute")
    rng = random.Random(random.SystemRandom().randrange(10**6))
    # Both start from empty data/ and cache/: one builds them, the other waits for it.
    reference = train_py({**overrides(tmp, "reference", **TWO_REPLICAS, **DROPOUT, **ENCODER), "jit": "on"}, tmp / "reference.log")
    values = overrides(tmp, "killed", **TWO_REPLICAS, **DROPOUT, **ENCODER)
    killed = train_py(values, tmp / "killed.log")
    killed_at = kill_after_checkpoint(killed, tmp / "killed.log", tmp / "runs" / "killed", rng)
    resumed = finish(train_py(values, tmp / "resumed.log"), tmp / "resumed.log")
    reference_log = finish(reference, tmp / "reference.log")
    return tmp, tmp / "runs" / "reference", reference_log, tmp / "runs" / "killed", resumed, killed_at


def test_two_cpu_replicas_train_and_resume_exactly_after_sigkill(two_replica_runs):
    tmp, reference, reference_log, resumed, resumed_log, killed_at = two_replica_runs
    assert "Runtime: 2 replica(s), precision float32, XLA off" in reference_log
    assert "--jit on ignored" in reference_log  # the XLA limitation is said, not hidden
    assert json.loads((reference / "run.json").read_text())["replicas"] == 2
    assert len(history(reference)) == EPOCHS

    assert 0 < killed_at < STEPS_PER_EPOCH  # killed mid-epoch; the rerun resumed there
    assert f"ckpt-{killed_at}: epoch 1, {killed_at} batch(es) done" in resumed_log
    difference = max_abs_diff(reference / "model.weights.h5", resumed / "model.weights.h5")
    assert difference == 0.0, f"killed after step {killed_at}: max abs weight difference {difference}"
    assert [r["val_loss"] for r in history(resumed)] == [r["val_loss"] for r in history(reference)]
    weights = h5_arrays(resumed / "model.weights.h5")
    adapter = {k: v.shape for k, v in weights.items() if "/adapter/" in k}
    assert sorted(adapter.values()) == [(3, 3, 16, 16), (16,)], adapter  # the adapter (at the grid width, 16) was among the weights compared
    assert any(k.endswith("grid_encoder/encoder_0/attention/query_dense/vars/0") for k in weights), sorted(weights)  # and the encoder layer's
    # The final checkpoints, tensor by tensor: the state a further resume would start from.
    expected, actual = checkpoint_tensors(reference), checkpoint_tensors(resumed)
    assert expected.keys() == actual.keys() and len(expected) > 40
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
    assert [v.shape for v in actual.values() if v.ndim == 4] == [(3, 3, 16, 16)] * 3  # the adapter's kernel and its 2 Adam slots


@pytest.fixture(scope="module")
def plain_two_replica_run(two_replica_runs):
    """An uninterrupted 2-replica train.py run without dropout, on the fixture's data and cache: its run folder."""
    tmp = two_replica_runs[0]
    finish(train_py(overrides(tmp, "two-replicas", **TWO_REPLICAS), tmp / "two-replicas.log"), tmp / "two-replicas.log")
    return tmp / "runs" / "two-replicas"


def test_one_and_two_replicas_agree_at_the_same_global_batch(two_replica_runs, plain_two_replica_run):
    """Adam, learning rate 1e-3, global batch 16, no dropout: 1 device vs 2 (before weighting each
    replica by its share of the batch's real tokens, captions of different lengths made them differ by 3e-3)."""
    from caption_tf.config import load_config
    from caption_tf.training.trainer import train

    tmp, reference = two_replica_runs[0], plain_two_replica_run
    one = train(load_config("minimal", overrides(tmp, "one-replica", **ONE_REPLICA)))
    assert json.loads((one / "run.json").read_text())["replicas"] == 1

    difference = max_abs_diff(one / "model.weights.h5", reference / "model.weights.h5")
    print(f"1 vs 2 replicas: max abs weight difference {difference:.3g}")
    assert difference < 1e-4
    one_rows, two_rows = history(one), history(reference)
    assert float(one_rows[-1]["loss"]) < float(one_rows[0]["loss"]) - 0.1  # it trained: the weights moved
    for a, b in zip(one_rows, two_rows):  # logged metrics are averaged per replica: close, not equal
        assert abs(float(a["val_loss"]) - float(b["val_loss"])) < 1e-3


def test_two_workers_build_once_fail_fast_and_resume_exactly(plain_two_replica_run, tmp_path):
    """Two train.py workers in one checkout, started from empty data/ and cache/:

    1. one worker generates the dataset and extracts the features, the other waits and
       reuses them. The chief (worker 0) is SIGKILLed a random moment after a checkpoint:
       for the run folder, which only the chief writes, that is a kill of the whole job.
       The other worker stops within a bounded time, exit code 5, saying a worker was lost.
    2. Both commands again: training resumes from the chief's last checkpoint and ends with
       exactly the weights of the plain uninterrupted 2-replica run (two workers compute what two
       devices of one process compute). Only the chief wrote the run folder; the other
       worker's temporary folder is gone, also a stale one a killed worker would leave.
    """
    reference = plain_two_replica_run
    values = overrides(tmp_path, "cluster", batch_size=8, learning_rate=5e-4)
    run_dir = tmp_path / "runs" / "cluster"
    ports = free_ports(2)
    rng = random.Random(random.SystemRandom().randrange(10**6))

    (chief, chief_log), (survivor, survivor_log) = start_workers(values, tmp_path, "first", ports, [{}, {}])
    killed_at = kill_after_checkpoint(chief, chief_log, run_dir, rng)
    died = time.monotonic()
    code = survivor.wait(PROCESS_TIMEOUT_S)
    waited = time.monotonic() - died
    logs = [chief_log.read_text(), survivor_log.read_text()]
    assert code == WORKER_LOST_EXIT, logs[1][-3000:]
    assert waited < LOST_WORKER_BOUND_S, f"worker 1 took {waited:.0f} s to notice"
    assert "Training stopped:" in logs[1] and "Restart every worker with its command" in logs[1]
    print(f"worker 1 stopped {waited:.1f} s after the chief was killed at step {killed_at}")
    assert sum(text.count("Generating the shapes dataset") for text in logs) == 1
    assert sum(text.count("Feature cache: extracting") for text in logs) == 1
    assert any("Waiting for another process to finish building" in text for text in logs)
    assert not list(run_dir.glob("worker-*"))  # worker 1 cleaned up on its way out

    stale = run_dir / "worker-1.tmp" / "checkpoints" / "ckpt-99_temp"  # as a SIGKILLed worker leaves it
    stale.mkdir(parents=True)
    workers = start_workers(values, tmp_path, "second", ports, [{}, {}])
    logs = [finish(proc, log) for proc, log in workers]
    assert all(f"ckpt-{killed_at}:" in text for text in logs)  # both restored the chief's newest checkpoint
    assert "Test metrics" in logs[0] and "Test metrics" not in logs[1]  # the chief evaluates
    difference = max_abs_diff(reference / "model.weights.h5", run_dir / "model.weights.h5")
    assert difference == 0.0, f"killed at step {killed_at}: max abs weight difference {difference}"
    assert [r["val_loss"] for r in history(run_dir)] == [r["val_loss"] for r in history(reference)]
    assert not list(run_dir.glob("worker-*")), "the other worker's temporary folder was left behind"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"

    # The same command without TF_CONFIG is 1 replica: another global batch, so the
    # checkpoint's data position means other examples. Refused, naming the change.
    from caption_tf.config import load_config
    from caption_tf.run_folder import CheckpointMismatchError
    from caption_tf.training.trainer import train

    with pytest.raises(CheckpointMismatchError, match="--replicas 2 -> 1"):
        train(load_config("minimal", values))


def test_a_worker_alone_gives_up_after_the_cluster_start_timeout(tmp_path):
    """TensorFlow waits forever for missing workers; train.py gives up after --cluster-start-timeout."""
    ports = free_ports(2)
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]}, "task": {"type": "worker", "index": 1}}
    proc = train_py({**overrides(tmp_path, "alone"), "cluster_start_timeout": 3}, tmp_path / "alone.log", tf_config=tf_config)
    assert proc.wait(PROCESS_TIMEOUT_S) == -signal.SIGKILL
    log = (tmp_path / "alone.log").read_text()
    assert "did not start: not every worker of TF_CONFIG" in log and "within 3 s (--cluster-start-timeout)" in log
    assert not (tmp_path / "runs").exists()  # nothing was written


GRADIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from caption_tf.models.decoder import CaptionDecoder

    VOCAB, CELLS, DIM, LENGTH, PAIRS, GLOBAL_BATCH, REFS = 16, 4, 8, 8, 32, 8, 4
    rng = np.random.default_rng(0)
    image_grid = rng.random((PAIRS // REFS, CELLS, DIM), dtype=np.float32)
    grid = np.repeat(image_grid, REFS, axis=0)  # pairs: each image's 4 captions in a row
    tokens = rng.integers(1, VOCAB, (PAIRS, LENGTH)).astype("int32")
    for row, length in enumerate(rng.integers(3, LENGTH, PAIRS)):  # captions of different lengths
        tokens[row, length:] = 0
    data = tf.data.Dataset.from_tensor_slices(((grid, tokens[:, :-1]), tokens[:, 1:])).batch(GLOBAL_BATCH)
    # The same captions as batches of whole images (--group-by-image): 2 images x 4 captions.
    by_image = tokens.reshape(PAIRS // REFS, REFS, LENGTH)
    grouped = tf.data.Dataset.from_tensor_slices(((image_grid, by_image[..., :-1]), by_image[..., 1:])).batch(GLOBAL_BATCH // REFS)

    def train(strategy, initial=None, data=data):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            # GRU + Luong: one recurrent layer call, which traces faster than a loop over the steps;
            # the loss weighting under test is the same for every family (base.CaptionModel).
            model = CaptionDecoder(vocab_size=VOCAB, embedding_dim=8, units=16, decoder="gru", attention="luong")
            model((np.zeros((1, CELLS, DIM), "float32"), np.zeros((1, LENGTH - 1), "int32")))
            if initial is not None:
                model.set_weights(initial)
            start = model.get_weights()
            model.compile(optimizer=keras.optimizers.SGD(0.5))
        model.fit(data, epochs=2, verbose=0, shuffle=False)
        return start, model.get_weights()

    start, single = train(tf.distribute.get_strategy())
    _, mirrored = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), initial=start)
    _, grouped_mirrored = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), initial=start, data=grouped)
    with open(sys.argv[1], "w") as out:
        json.dump({
            "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(single, mirrored)),
            "max_grouped_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(single, grouped_mirrored)),
            "max_update": max(float(np.max(np.abs(a - b))) for a, b in zip(single, start)),
        }, out)
    from caption_tf.cli import exit_without_teardown
    exit_without_teardown(0)  # as train.py ends: 1.3 s less than the interpreter's teardown
    """
)


def test_train_step_gradient_is_the_global_token_mean_on_two_replicas(tmp_path):
    """SGD sees the gradient's scale (Adam does not): the update on 2 replicas is the one of
    1 device, also when the replicas' halves of a batch hold different numbers of tokens, and
    also with batches of whole images (one grid per image, each replica one image)."""
    script, result = tmp_path / "gradient.py", tmp_path / "result.json"
    script.write_text(GRADIENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, str(script), str(result)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["max_update"] > 1e-2  # training moved the weights, so agreement means something
    assert out["max_weight_diff"] < 1e-5 and out["max_grouped_diff"] < 1e-5, out


def test_bad_distribution_flags_are_refused_before_devices_are_touched():
    import tensorflow as tf

    from caption_tf.config import load_config
    from caption_tf.training.runtime import is_chief, select_strategy, worker_write_dir

    with pytest.raises(ValueError, match="--cpu-replicas must be >= 1"):
        load_config("minimal", {"cpu_replicas": 0})
    with pytest.raises(ValueError, match="one replica per CPU-only worker"):
        select_strategy("multiworker", cpu_replicas=2)
    one_device = tf.distribute.get_strategy()
    assert is_chief(one_device) and worker_write_dir("runs/x", one_device).as_posix() == "runs/x"
