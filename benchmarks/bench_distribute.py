"""Epoch time on 1 replica vs 2 replicas (MirroredStrategy, MultiWorkerMirroredStrategy), via train.py.

Each run is the user's command (`python train.py --preset minimal ...`), on one shared
data/ and cache/ folder (the features are extracted by the first run, not timed):

- 1 replica:  `train.py --preset minimal`
- mirrored:   the same with `--cpu-replicas 2` (MirroredStrategy over 2 logical CPU devices)
- 2 workers:  two train.py processes on 127.0.0.1 with TF_CONFIG (MultiWorkerMirroredStrategy)

`--batch-size` is per replica, so by default the 2-replica runs take a global batch twice
as large and half as many steps; `--same-global-batch` halves their per-replica batch
instead. The figure is `epoch_seconds` from each run's history.csv (training batches and
the validation pass; the first epoch, which traces the graphs, is left out); medians over
the runs, which are interleaved (1, mirrored, workers, 1, ...) because the cores are shared.

    python benchmarks/bench_distribute.py [--epochs 4] [--repeats 3] [--same-global-batch] [--dir FOLDER]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, report


def train_py(flags: list[str], log_path: Path, tf_config: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags], stdout=log, stderr=subprocess.STDOUT, env=env)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def run(config: str, base: list[str], name: str, folder: Path, batch_size: int, same_global_batch: bool) -> list[float]:
    """Train one run of `config`; the epoch_seconds of its epochs after the first."""
    per_replica = batch_size // 2 if same_global_batch and config != "1 replica" else batch_size
    flags = [*base, "--run-name", name, "--batch-size", str(per_replica)]
    if config == "mirrored (--cpu-replicas 2)":
        procs = [train_py([*flags, "--cpu-replicas", "2"], folder / f"{name}.log")]
    elif config == "2 workers (127.0.0.1)":
        cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
        procs = [
            train_py(flags, folder / f"{name}-worker{i}.log", {"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(2)
        ]
    else:
        procs = [train_py(flags, folder / f"{name}.log")]
    if any(proc.wait() != 0 for proc in procs):
        raise RuntimeError(f"{config}: train.py failed; see the logs in {folder}")
    with open(folder / "runs" / name / "history.csv", newline="") as fh:
        return [float(row["epoch_seconds"]) for row in csv.DictReader(fh)][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per replica (the minimal preset's)")
    parser.add_argument("--same-global-batch", action="store_true", help="2-replica runs take half the batch per replica")
    parser.add_argument("--dir", default=None, help="data/, cache/, runs/ and logs go here (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench_distribute_"))
    folder.mkdir(parents=True, exist_ok=True)
    base = [
        "--preset", "minimal", "--epochs", str(args.epochs), "--resume", "never", "--no-meteor",
        "--data-root", str(folder / "data"), "--cache-dir", str(folder / "cache"), "--runs-dir", str(folder / "runs"),
    ]
    configs = ["1 replica", "mirrored (--cpu-replicas 2)", "2 workers (127.0.0.1)"]
    seconds: dict[str, list[float]] = {config: [] for config in configs}
    for repeat in range(args.repeats):
        for index, config in enumerate(configs):
            epochs = run(config, base, f"bench-{index}-{repeat}", folder, args.batch_size, args.same_global_batch)
            seconds[config] += epochs
            print(f"repeat {repeat + 1}/{args.repeats} {config}: epoch seconds {[round(s, 2) for s in epochs]}", flush=True)
    single = statistics.median(seconds["1 replica"])
    rows = [
        {
            "config": config,
            "per_replica_batch": args.batch_size // 2 if args.same_global_batch and config != "1 replica" else args.batch_size,
            "epoch_s_median": round(statistics.median(values), 2),
            "epoch_s_all": [round(v, 2) for v in values],
            "time_vs_1_replica": round(statistics.median(values) / single, 2),
        }
        for config, values in seconds.items()
    ]
    report("distribute_same_global_batch" if args.same_global_batch else "distribute", rows)


if __name__ == "__main__":
    main()
