"""Atomic, verified, optionally asynchronous checkpoints.

Layout of a checkpoint directory:

    checkpoints/
      ckpt-120/                      published, verified on every resume
        ckpt.index                   tf.train.Checkpoint files
        ckpt.data-00000-of-00001
        manifest.json                SHA-256 + size of every file, metadata
      ckpt-150.tmp/                  being written (or left by a crash)
      quarantine/ckpt-90-<time>/     corrupt ones, moved aside with REASON.txt

A save serialises the `tf.train.Checkpoint` into TensorFlow's in-memory
filesystem (`ram://`) on the training thread: that is the snapshot, so the
published files hold exactly the values of that moment. Copying to disk,
hashing, fsync, the atomic `os.replace` of `ckpt-<step>.tmp/` to
`ckpt-<step>/` and pruning then run on a background thread (or inline when
`async_save=False`). Background errors surface at the next `save()` or
`flush()`.

Example:

>>> ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
>>> store = VerifiedCheckpointStore("runs/x/checkpoints", ckpt, keep=3)
>>> info = store.restore()            # latest valid one, or None
>>> store.save(step=100, metadata={"epoch": 0, "val_loss": 2.1})
>>> store.close()                     # waits for the pending write
"""

from __future__ import annotations

import errno as errno_lib
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import keras

from caption_tf.files import file_sha256, fsync_directory, stable_hash
from caption_tf.training.async_writer import BackgroundWriteError, BackgroundWriter

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CHECKPOINT_FILE_PREFIX = "ckpt"  # file prefix inside a checkpoint folder
FOLDER_PREFIX = "ckpt-"
TMP_SUFFIX = ".tmp"
TRASH_SUFFIX = ".trash"  # a folder being deleted by pruning
QUARANTINE_DIR = "quarantine"
REASON_FILE = "REASON.txt"
RAM_ROOT = "ram://caption_tf_checkpoints"
COPY_CHUNK_BYTES = 8 << 20
DEFAULT_COMPAT_KEYS = ("config_hash", "vocab_hash", "feature_fingerprint")
_PUBLISHED = re.compile(r"^ckpt-(\d+)$")
_TMP = re.compile(r"^ckpt-(\d+)\.tmp$")


class CheckpointError(RuntimeError):
    """Base class of checkpoint failures."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint folder failed verification.

    Example:

    >>> err = CorruptCheckpointError("runs/x/ckpt-10", "missing manifest.json")
    >>> err.reason
    'missing manifest.json'
    """

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"Checkpoint {path} is not usable: {reason}")
        self.path = Path(path)
        self.reason = reason


class CheckpointMismatchError(ValueError):
    """A checkpoint was made under a different config/vocabulary/feature cache."""


class SaveRefusedError(CheckpointError):
    """The store refuses saves (e.g. after the loss became NaN)."""


CheckpointWriteError = BackgroundWriteError  # a failed save; `.errno` e.g. ENOSPC


@dataclass(frozen=True)
class CheckpointInfo:
    """A published, verified checkpoint.

    Example:

    >>> info = store.latest_valid()
    >>> info.step, info.metadata["epoch"], info.prefix
    (120, 2, 'runs/x/checkpoints/ckpt-120/ckpt')
    """

    path: Path
    step: int
    metadata: dict
    total_bytes: int

    @property
    def prefix(self) -> str:
        """The prefix to pass to `tf.train.Checkpoint.read`."""
        return str(self.path / CHECKPOINT_FILE_PREFIX)


# ----------------------------------------------------------------- helpers


def library_versions() -> dict:
    """Versions worth recording next to a checkpoint.

    Example:

    >>> sorted(library_versions())
    ['keras', 'numpy', 'python', 'tensorflow']
    """
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def check_compatible(
    manifest_meta: Mapping[str, Any],
    current_meta: Mapping[str, Any],
    keys: Sequence[str] = DEFAULT_COMPAT_KEYS,
) -> None:
    """Raise if a checkpoint's metadata differs from the current run's.

    Keys missing on both sides are ignored; missing on one side is a mismatch.

    Example:

    >>> check_compatible({"vocab_hash": "a"}, {"vocab_hash": "b"}, keys=["vocab_hash"])
    Traceback (most recent call last):
    CheckpointMismatchError: ... vocab_hash: checkpoint has 'a', this run has 'b' ...
    """
    differences = []
    for key in keys:
        saved, current = manifest_meta.get(key), current_meta.get(key)
        if saved != current:
            differences.append(f"{key}: checkpoint has {saved!r}, this run has {current!r}")
    if differences:
        raise CheckpointMismatchError(
            "Refusing to resume: the checkpoint was made under different settings ("
            + "; ".join(differences)
            + "). Start a new run (--run-name) or --resume never."
        )


def all_finite(variables: Iterable[Any]) -> bool:
    """True if every floating-point variable holds only finite values.

    Example:

    >>> all_finite(model.weights)
    True
    """
    checks = [
        tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))
        for v in variables
        if tf.as_dtype(v.dtype).is_floating
    ]
    return bool(tf.reduce_all(checks).numpy()) if checks else True


def is_disk_full(error: BaseException) -> bool:
    """True if `error` (or what it wraps) is 'No space left on device'.

    Example:

    >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    True
    """
    while error is not None:
        if getattr(error, "errno", None) in (errno_lib.ENOSPC, errno_lib.EDQUOT):
            return True
        if isinstance(error, tf.errors.ResourceExhaustedError) or "No space left" in str(error):
            return True
        error = error.__cause__
    return False


class DurableFileWriter:
    """Writes a file from chunks, then flushes and fsyncs it.

    Injectable into `VerifiedCheckpointStore(writer=...)`, e.g. to simulate a
    full disk in tests.

    Example:

    >>> DurableFileWriter().write(Path("x.bin"), [b"abc", b"def"])
    6
    """

    def write(self, path: Path, chunks: Iterable[bytes]) -> int:
        size = 0
        with open(path, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                size += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        return size


def _manifest_body_hash(body: Mapping[str, Any]) -> str:
    return stable_hash({k: v for k, v in body.items() if k != "manifest_sha256"})


def _read_chunks(path: str) -> Iterable[bytes]:
    with tf.io.gfile.GFile(path, "rb") as fh:
        while True:
            chunk = fh.read(COPY_CHUNK_BYTES)
            if not chunk:
                return
            yield chunk


def _hashing(chunks: Iterable[bytes], digest: "hashlib._Hash") -> Iterable[bytes]:
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


# ------------------------------------------------------------------- store


class VerifiedCheckpointStore:
    """Saves, verifies, prunes and restores one `tf.train.Checkpoint`.

    Args:
        directory: where `ckpt-<step>/` folders live (created if needed).
        checkpoint: the `tf.train.Checkpoint` holding every trackable to save
            (model, optimizer, a `tf.data` iterator, position variables...).
        keep: how many of the newest checkpoints to keep.
        keep_best: also keep the best one by `best_metric` in the metadata.
        best_metric: metadata key compared for "best" (e.g. "val_loss").
        best_mode: "min" or "max".
        async_save: publish on a background thread (True) or inline (False).
        writer: object with `write(path, chunks) -> bytes_written`; defaults to
            `DurableFileWriter` (fsync after writing).

    Example:

    >>> store = VerifiedCheckpointStore(tmp / "ckpts", tf.train.Checkpoint(v=v), keep=2)
    >>> store.save(10, {"epoch": 0, "val_loss": 1.5})
    >>> store.flush().step
    10
    """

    def __init__(
        self,
        directory: str | Path,
        checkpoint: tf.train.Checkpoint,
        keep: int = 3,
        keep_best: bool = True,
        best_metric: str = "val_loss",
        best_mode: str = "min",
        async_save: bool = True,
        writer: Optional[DurableFileWriter] = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.checkpoint = checkpoint
        self.keep = keep
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.writer = writer or DurableFileWriter()
        self._background = BackgroundWriter(name="checkpoint-writer", enabled=async_save)
        self._in_flight: Optional[str] = None  # name of the .tmp folder being written
        self._refusal: Optional[str] = None
        self._dir_lock = threading.RLock()  # publish/prune vs. latest_valid scans
        self.last_published: Optional[CheckpointInfo] = None
        self.quarantined: list[tuple[Path, str]] = []

    # -- saving

    @property
    def last_checkpoint_bytes(self) -> Optional[int]:
        """Size on disk of the last published checkpoint (None before the first)."""
        return self.last_published.total_bytes if self.last_published else None

    @property
    def refusal(self) -> Optional[str]:
        """Why saves are refused, or None."""
        return self._refusal

    def refuse_saves(self, reason: str) -> None:
        """Make every later `save()` raise `SaveRefusedError` (e.g. NaN loss)."""
        self._refusal = reason

    def save(self, step: int, metadata: Optional[Mapping[str, Any]] = None) -> Path:
        """Snapshot now; publish `ckpt-<step>/` (in the background if async).

        Waits for the previous save first; if that one failed, raises its
        `CheckpointWriteError` instead of saving.

        Returns:
            the folder the checkpoint is (or will be) published to.
        """
        if self._refusal:
            raise SaveRefusedError(f"Not saving step {step}: {self._refusal}")
        self._background.wait()
        step = int(step)
        staging = f"{RAM_ROOT}/{uuid.uuid4().hex}"
        try:
            self.checkpoint.write(f"{staging}/{CHECKPOINT_FILE_PREFIX}")
        except BaseException:
            if tf.io.gfile.exists(staging):
                tf.io.gfile.rmtree(staging)
            raise
        meta = {"library_versions": library_versions(), **dict(metadata or {})}
        self._in_flight = f"{FOLDER_PREFIX}{step}{TMP_SUFFIX}"
        self._background.submit(
            lambda: self._publish_locked(staging, step, meta),
            description=f"Writing checkpoint {self.directory / self._in_flight}",
        )
        return self.directory / f"{FOLDER_PREFIX}{step}"

    def flush(self) -> Optional[CheckpointInfo]:
        """Wait for the pending save; return the last published checkpoint."""
        self._background.wait()
        return self.last_published

    def close(self) -> Optional[CheckpointInfo]:
        """Flush and stop the background thread."""
        self._background.close()
        return self.last_published

    def __enter__(self) -> "VerifiedCheckpointStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _publish_locked(self, staging: str, step: int, metadata: dict) -> CheckpointInfo:
        with self._dir_lock:
            return self._publish(staging, step, metadata)

    def _publish(self, staging: str, step: int, metadata: dict) -> CheckpointInfo:
        tmp = self.directory / f"{FOLDER_PREFIX}{step}{TMP_SUFFIX}"
        final = self.directory / f"{FOLDER_PREFIX}{step}"
        try:
            if tmp.exists():
                self._quarantine(tmp, "leftover half-written folder with the same step")
            tmp.mkdir()
            files = {}
            for name in sorted(tf.io.gfile.listdir(staging)):
                digest = hashlib.sha256()
                size = self.writer.write(tmp / name, _hashing(_read_chunks(f"{staging}/{name}"), digest))
                files[name] = {"size": size, "sha256": digest.hexdigest()}
            body = {
                "format": MANIFEST_FORMAT,
                "step": step,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "checkpoint_prefix": CHECKPOINT_FILE_PREFIX,
                "files": files,
                "metadata": metadata,
            }
            body["manifest_sha256"] = _manifest_body_hash(body)
            text = json.dumps(body, indent=1, sort_keys=True, default=str).encode("utf-8")
            self.writer.write(tmp / MANIFEST_NAME, [text])
            fsync_directory(tmp)
            if final.exists():  # re-saving a step: retire the old one first
                self._delete(final)
            os.replace(tmp, final)
            fsync_directory(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial folder behind
            raise
        finally:
            tf.io.gfile.rmtree(staging)
            self._in_flight = None
        total = sum(f["size"] for f in files.values()) + len(text)
        info = CheckpointInfo(final, step, json.loads(json.dumps(metadata, default=str)), total)
        self.last_published = info
        self._prune()
        return info

    # -- listing, verification, quarantine

    def _published(self) -> list[tuple[int, Path]]:
        found = []
        for entry in self.directory.iterdir():
            match = _PUBLISHED.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def verify(self, path: str | Path) -> CheckpointInfo:
        """Check manifest, sizes and SHA-256 of a folder; raise if anything is off.

        Raises:
            CorruptCheckpointError: naming the folder and the reason.

        Example:

        >>> store.verify("runs/x/checkpoints/ckpt-120").step
        120
        """
        path = Path(path)
        if path.name.endswith(TMP_SUFFIX):
            raise CorruptCheckpointError(path, "half-written: it was never published (still .tmp)")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CorruptCheckpointError(path, f"missing {MANIFEST_NAME}")
        try:
            body = json.loads(manifest_path.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptCheckpointError(path, f"{MANIFEST_NAME} is not valid JSON ({err})") from None
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            raise CorruptCheckpointError(path, f"{MANIFEST_NAME} has an unknown format")
        if body.get("manifest_sha256") != _manifest_body_hash(body):
            raise CorruptCheckpointError(path, f"{MANIFEST_NAME} checksum mismatch (edited or bit-flipped)")
        files = body.get("files", {})
        if not any(name.endswith(".index") for name in files):
            raise CorruptCheckpointError(path, f"{MANIFEST_NAME} lists no .index file")
        for name, expected in sorted(files.items()):
            file_path = path / name
            if not file_path.is_file():
                raise CorruptCheckpointError(path, f"missing file {name}")
            size = file_path.stat().st_size
            if size != expected["size"]:
                raise CorruptCheckpointError(
                    path, f"{name} has {size} bytes, the manifest says {expected['size']} (truncated?)"
                )
            if file_sha256(file_path) != expected["sha256"]:
                raise CorruptCheckpointError(path, f"{name} SHA-256 mismatch (bit flip or partial overwrite)")
        total = sum(f["size"] for f in files.values()) + manifest_path.stat().st_size
        return CheckpointInfo(path, int(body["step"]), body.get("metadata", {}), total)

    def latest_valid(self) -> Optional[CheckpointInfo]:
        """The newest checkpoint that verifies; quarantines the ones that don't.

        Leftover `.tmp` folders (not the one being written now) are
        quarantined too. Each problem is logged as a warning naming the folder
        and the reason.

        Example:

        >>> info = store.latest_valid()
        >>> info.step if info else "no checkpoint"
        120
        """
        with self._dir_lock:
            return self._latest_valid()

    def _latest_valid(self) -> Optional[CheckpointInfo]:
        for entry in sorted(self.directory.iterdir()):
            if _TMP.match(entry.name) and entry.name != self._in_flight:
                self._quarantine(entry, "half-written: it was never published (still .tmp)")
            elif entry.name.endswith(TRASH_SUFFIX):
                shutil.rmtree(entry, ignore_errors=True)  # interrupted pruning
        for _, path in reversed(self._published()):
            try:
                return self.verify(path)
            except CorruptCheckpointError as err:
                self._quarantine(path, err.reason)
        return None

    def _quarantine(self, path: Path, reason: str) -> Path:
        target_dir = self.directory / QUARANTINE_DIR
        target_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = target_dir / f"{path.name}-{stamp}"
        suffix = 1
        while target.exists():
            target = target_dir / f"{path.name}-{stamp}-{suffix}"
            suffix += 1
        os.replace(path, target)
        (target / REASON_FILE).write_text(reason + "\n", encoding="utf-8")
        logger.warning("Checkpoint %s is corrupt (%s): moved to %s; falling back to an older one.", path, reason, target)
        self.quarantined.append((target, reason))
        return target

    # -- pruning

    def _metric(self, path: Path) -> Optional[float]:
        try:
            value = json.loads((path / MANIFEST_NAME).read_text("utf-8"))["metadata"].get(self.best_metric)
            value = float(value)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return value if math.isfinite(value) else None

    def best(self) -> Optional[tuple[int, Path]]:
        """(step, folder) of the best published checkpoint by `best_metric`, if any."""
        scored = [(self._metric(p), s, p) for s, p in self._published()]
        scored = [t for t in scored if t[0] is not None]
        if not scored:
            return None
        pick = min if self.best_mode == "min" else max
        metric, step, path = pick(scored, key=lambda t: t[0])
        return step, path

    def _prune(self) -> None:
        published = self._published()
        keep = {step for step, _ in published[-self.keep :]}
        best = self.best() if self.keep_best else None
        if best:
            keep.add(best[0])
        for step, path in published:
            if step not in keep:
                self._delete(path)

    @staticmethod
    def _delete(path: Path) -> None:
        # Rename first so a crash mid-delete never leaves a half-deleted ckpt-N.
        trash = path.with_name(path.name + TRASH_SUFFIX)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # -- restoring

    def restore(self, info: Optional[CheckpointInfo] = None, expect_partial: bool = False) -> Optional[CheckpointInfo]:
        """Verify and restore `info` (default: `latest_valid()`); None if none.

        With `expect_partial=False`, every object of the current checkpoint
        graph that exists must be matched by the saved one (a changed
        architecture fails loudly).

        Example:

        >>> info = store.restore()
        >>> start_step = info.step + 1 if info else 0
        """
        info = self.latest_valid() if info is None else self.verify(info.path)
        if info is None:
            return None
        status = self.checkpoint.read(info.prefix)
        if expect_partial:
            status.expect_partial()
        else:
            status.assert_existing_objects_matched()
        if self.last_published is None or self.last_published.step <= info.step:
            self.last_published = info  # the last good one, e.g. for NaN reports
        logger.info("Restored checkpoint %s (step %d).", info.path, info.step)
        return info


# ------------------------------------------------------------ keras glue


class TrainingPosition(tf.Module):
    """Step/epoch/batch counters saved inside the checkpoint for exact resume.

    Example:

    >>> position = TrainingPosition()
    >>> ckpt = tf.train.Checkpoint(model=model, optimizer=opt, position=position)
    >>> position.advance(epoch=0, batch=0); int(position.step)
    1
    """

    def __init__(self):
        super().__init__(name="training_position")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.batch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch")  # batches done in epoch

    def advance(self, epoch: int, batch: int) -> None:
        """Record that batch `batch` (0-based) of `epoch` has finished."""
        self.step.assign_add(1)
        self.epoch.assign(epoch)
        self.batch.assign(batch + 1)

    def as_dict(self) -> dict:
        return {"step": int(self.step), "epoch": int(self.epoch), "batch": int(self.batch)}


def _scalar(value: Any) -> Optional[float]:
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError):
        return None


class CheckpointCallback(keras.callbacks.Callback):
    """Saves through a `VerifiedCheckpointStore` every N batches and each epoch.

    Never saves non-finite weights or after a non-finite loss. A failed save
    (disk full, I/O error) stops training cleanly: the last published
    checkpoint stays intact, and `self.failure` holds the error.

    Args:
        store: the store (its checkpoint must include `position`).
        position: the `TrainingPosition` to advance each batch.
        every_n_batches: save period in batches (0: epoch ends only).
        save_at_epoch_end: also save after each epoch (with val metrics).
        metadata_fn: returns extra metadata (config hash, vocab hash...).

    Example:

    >>> cb = CheckpointCallback(store, position, every_n_batches=50,
    ...                         metadata_fn=lambda: {"config_hash": h})
    >>> model.fit(ds, epochs=3, callbacks=[cb])
    """

    def __init__(
        self,
        store: VerifiedCheckpointStore,
        position: TrainingPosition,
        every_n_batches: int = 0,
        save_at_epoch_end: bool = True,
        metadata_fn: Optional[Callable[[], Mapping[str, Any]]] = None,
    ):
        super().__init__()
        self.store = store
        self.position = position
        self.every_n_batches = every_n_batches
        self.save_at_epoch_end = save_at_epoch_end
        self.metadata_fn = metadata_fn or dict
        self.failure: Optional[BaseException] = None
        # Batches of the current epoch done before this `fit` began (a resumed
        # mid-epoch run): Keras counts that partial epoch's batches from 0.
        self.batch_offset = 0
        self.blocking_seconds = 0.0  # time training waited in `store.save` (snapshot, or all when sync)
        self._epoch = 0
        self._last_loss: Optional[float] = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.position.advance(self._epoch, batch + self.batch_offset)
        self._last_loss = _scalar((logs or {}).get("loss"))
        if self.every_n_batches and int(self.position.step) % self.every_n_batches == 0:
            self.save_now(logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_at_epoch_end:
            self.save_now(logs)
        self.batch_offset = 0  # only the first (resumed) epoch is partial

    def on_train_end(self, logs=None):
        try:
            self.store.flush()
        except BackgroundWriteError as err:
            self._fail(err)

    def save_now(self, logs: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
        """Save the current state unless it is non-finite or saving failed before."""
        if self.failure is not None or self.store.refusal:
            return None
        if self._last_loss is not None and not math.isfinite(self._last_loss):
            logger.error("Not saving step %d: the loss is %s.", int(self.position.step), self._last_loss)
            return None
        if not all_finite(self._variables()):
            logger.error("Not saving step %d: the weights contain NaN/Inf.", int(self.position.step))
            return None
        metrics = {k: _scalar(v) for k, v in (logs or {}).items()}
        metadata = {**self.position.as_dict(), "metrics": metrics, **metrics, **dict(self.metadata_fn())}
        started = time.perf_counter()
        try:
            return self.store.save(int(self.position.step), metadata)
        except (BackgroundWriteError, OSError, tf.errors.OpError) as err:
            self._fail(err)
            return None
        finally:
            self.blocking_seconds += time.perf_counter() - started

    def _variables(self) -> list:
        variables = list(self.model.weights)
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            variables += list(optimizer.variables)
        return variables

    def _fail(self, err: BaseException) -> None:
        self.failure = err
        if self.model is not None:
            self.model.stop_training = True
        cause = "the disk is full" if is_disk_full(err) else "it failed"
        last = self.store.last_published
        logger.error(
            "Checkpoint save stopped training because %s (%s). Last good checkpoint: %s.",
            cause,
            err,
            last.path if last else "none",
        )
