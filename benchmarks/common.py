"""Shared helpers for the benchmarks: timing, machine description, table + JSON output.

Every benchmark prints a table and writes `benchmarks/out/<name>.json` (gitignored)
with the rows, the command line and the machine.

Example:

```python
seconds = best_time(lambda: model.train_on_batch(x, y), repeats=5)
report("train_step", [{"config": "lstm", "ms": 1000 * seconds}])
```
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"
ROOT = Path(__file__).resolve().parent.parent  # the repository

try:  # the benchmarks use the installed package (pyproject.toml), from any folder
    import caption_tf  # noqa: F401
except ImportError:
    raise SystemExit("The benchmarks import caption_tf: install it once with `pip install -e .` in the repository root.") from None


def machine() -> dict:
    """CPU/GPU, core count and library versions, so figures can be compared."""
    import keras
    import psutil
    import tensorflow as tf

    gpus = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in tf.config.list_physical_devices("GPU")]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus or "none",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` untimed runs.

    The median, not the minimum: the cores are shared, and one lucky run says little.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def train_step(model, x, y) -> dict:
    """One compiled train step on one batch; returns the logs as floats (so the step has finished).

    `model.train_on_batch` hands `train_step` an `(x, y, sample_weight)` triple, which
    `CaptionDecoder.train_step` does not unpack; this feeds `(x, y)` as `fit` does.
    """
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.make_train_function()
    logs = model.train_function(iter([(x, y)]))
    return {k: float(v) for k, v in logs.items()}


def format_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def report(name: str, rows: list[dict], notes: dict | None = None) -> Path:
    """Print the table and write `out/<name>.json`; returns the JSON path."""
    print(format_table(rows))
    for key, value in (notes or {}).items():
        print(f"{key}: {value}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    payload = {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "rows": rows,
        "notes": notes or {},
    }
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {path}")
    return path


def quiet_tensorflow() -> None:
    """Hide TF's C++ info logs, so the tables stay readable."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
