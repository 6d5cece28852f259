"""Publishing files safely, and the package's content hashes.

Every file a reader may open while it is being replaced (a run's `run.json`
and weights, the shapes dataset's annotations, evaluation reports) is
published atomically: written to `partial-<name>` beside it, flushed to
disk, then renamed over the old one. A crash leaves the old file or the new
one, never half of one. The temporary name keeps the file's suffix, so
writers that check it (Keras wants `.weights.h5`) accept it.

Shared outputs that take long to make (a generated dataset, a feature cache)
are built once under `build_lock`: several processes on one filesystem (the
workers of a multi-worker job) wait for the first one and reuse its result.

Example:

```python
write_json(Path("runs/x/run.json"), {"status": "complete"})
with atomic_path(Path("runs/x/model.weights.h5")) as tmp:
    model.save_weights(tmp)
```
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

PARTIAL_PREFIX = "partial-"  # a file being published: partial-<name>
LOCK_SUFFIX = ".lock"  # <target>.lock beside what a process is building
CHUNK_BYTES = 1 << 20


def fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every OS or filesystem allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; published by one rename on success.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(PARTIAL_PREFIX + path.name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextlib.contextmanager
def build_lock(target: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of `target` (the file `<target>.lock` beside it) while building it.

    Whoever gets the lock first builds; the others wait here, then find the
    result and reuse it, so call it as: check, lock, check again, build.
    It is the kernel's lock (`fcntl.flock`, also honoured over NFS on Linux): a
    process killed while holding it releases it, so a crash never leaves a stale
    lock. The lock file stays (removing it would race with a waiting process).

    Example:

    ```python
    if not done(target):
        with build_lock(target):
            if not done(target):   # another process may have built it meanwhile
                build(target)
    ```
    """
    target = Path(target)
    lock_path = target.with_name(target.name + LOCK_SUFFIX)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process to finish building {target} (it holds {lock_path}) ...", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Atomically replace `path` with `text` (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: Any, indent: int | None = 2) -> None:
    """Atomically replace `path` with `payload` as JSON (values JSON cannot hold are written with `str`)."""
    write_text(path, json.dumps(payload, indent=indent, default=str))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (downloads and checkpoints are verified with it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stable_hash(obj: Any) -> str:
    """SHA-256 of a JSON-serialisable object, independent of key order.

    Example:

    >>> stable_hash({"b": 1, "a": 2}) == stable_hash({"a": 2, "b": 1})
    True
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
