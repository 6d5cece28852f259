"""Verified checkpoints on `tf.train.CheckpointManager`.

The manager owns numbering (`ckpt-<step>`), `max_to_keep` and the latest checkpoint;
writing is TensorFlow's own, in the background with `CheckpointOptions(enable_async=True)`.
This module adds one thin layer: a SHA-256 manifest, written by a write callback once a
checkpoint's files are complete, checked before any restore; what fails is quarantined.

    checkpoints/
      checkpoint                       the manager's state (latest and kept checkpoints)
      ckpt-120.index                   tf.train.Checkpoint files
      ckpt-120.data-00000-of-00001
      ckpt-120.manifest.json           size + SHA-256 of each file, metadata: written last
      quarantine/ckpt-90-<time>/       damaged or unfinished ones, with REASON.txt
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.checkpoint.checkpoint_management import update_checkpoint_state_internal
from tensorflow.python.util import deprecation

from caption_tf.files import file_sha256, stable_hash, write_json

logger = logging.getLogger(__name__)

CHECKPOINT_NAME, MANIFEST_SUFFIX, MANIFEST_FORMAT = "ckpt", ".manifest.json", 2
STATE_FILE = "checkpoint"  # the manager's state, written by TensorFlow
QUARANTINE_DIR, REASON_FILE = "quarantine", "REASON.txt"
_PIECE = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)(\.|_temp)")  # ckpt-12.index, ckpt-12.data-..., ckpt-12_temp/


class CorruptCheckpointError(RuntimeError):
    """A checkpoint that failed verification; `.reason` says why."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"Checkpoint {path} is not usable: {reason}")
        self.path, self.reason = Path(path), reason


class CheckpointWriteError(RuntimeError):
    """A save that failed (disk full, I/O error); `.errno` is the underlying one, e.g. ENOSPC."""

    errno = property(lambda self: getattr(self.__cause__, "errno", None))


class SaveRefusedError(RuntimeError):
    """Saves are refused (the loss became NaN): those weights must not be published."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A verified checkpoint; `path` is its prefix (`.../ckpt-120`), as `tf.train.Checkpoint.read` wants it."""

    path: Path
    step: int
    metadata: dict
    total_bytes: int


def _files_of(prefix: Path) -> list[Path]:
    return sorted(prefix.parent.glob(prefix.name + ".index")) + sorted(prefix.parent.glob(prefix.name + ".data-*"))


def _manifest_hash(body: Mapping[str, Any]) -> str:
    return stable_hash({k: v for k, v in body.items() if k != "manifest_sha256"})


def write_manifest(prefix: Path, step: int, metadata: Mapping[str, Any]) -> CheckpointInfo:
    """Record size and SHA-256 of each file of the checkpoint `prefix`; published atomically, last."""
    files = {}
    for path in _files_of(prefix):
        with open(path, "rb") as fh:  # TensorFlow does not fsync: no manifest may outlive its data on power loss
            os.fsync(fh.fileno())
        files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    versions = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__}
    body = {"format": MANIFEST_FORMAT, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files, "metadata": {"library_versions": versions, **metadata}}
    body["manifest_sha256"] = _manifest_hash(body)
    write_json(Path(f"{prefix}{MANIFEST_SUFFIX}"), body, indent=1)
    return verify(prefix, check_hashes=False)


def verify(prefix: str | Path, check_hashes: bool = True) -> CheckpointInfo:
    """Check the manifest, then size and SHA-256 of every file it lists.

    Raises:
        CorruptCheckpointError: naming the checkpoint and the reason.
    """
    prefix = Path(prefix)
    manifest = Path(f"{prefix}{MANIFEST_SUFFIX}")
    if not manifest.is_file():
        raise CorruptCheckpointError(prefix, f"missing manifest {manifest.name} (never finished?)")
    try:
        body = json.loads(manifest.read_text("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptCheckpointError(prefix, f"{manifest.name} is not valid JSON ({err})") from None
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT or body.get("manifest_sha256") != _manifest_hash(body):
        raise CorruptCheckpointError(prefix, f"{manifest.name} checksum mismatch (edited, bit-flipped or unknown format)")
    if not any(name.endswith(".index") for name in body["files"]):
        raise CorruptCheckpointError(prefix, f"{manifest.name} lists no .index file")
    for name, expected in sorted(body["files"].items()):
        path = prefix.parent / name
        if not path.is_file():
            raise CorruptCheckpointError(prefix, f"missing file {name}")
        if path.stat().st_size != expected["size"]:
            raise CorruptCheckpointError(prefix, f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)")
        if check_hashes and file_sha256(path) != expected["sha256"]:
            raise CorruptCheckpointError(prefix, f"{name} SHA-256 mismatch (bit flip or partial overwrite)")
    total = sum(f["size"] for f in body["files"].values()) + manifest.stat().st_size
    return CheckpointInfo(prefix, int(body["step"]), body.get("metadata", {}), total)


def _pieces_by_step(directory: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    for entry in directory.iterdir() if directory.is_dir() else ():
        if match := _PIECE.match(entry.name):
            found.setdefault(int(match.group(1)), []).append(entry)
    return found


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _quarantine(directory: Path, step: int, pieces: list[Path], reason: str) -> Path:
    target = directory / QUARANTINE_DIR / f"{CHECKPOINT_NAME}-{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    while target.exists():
        target = target.with_name(target.name + "+")
    target.mkdir(parents=True)
    for piece in pieces:
        os.replace(piece, target / piece.name)
    (target / REASON_FILE).write_text(reason + "\n", encoding="utf-8")
    logger.warning("Checkpoint %s is corrupt (%s): moved to %s.", directory / f"{CHECKPOINT_NAME}-{step}", reason, target)
    return target


def latest_valid(directory: str | Path, quarantine: bool = True) -> tuple[Optional[CheckpointInfo], list[tuple[Path, str]]]:
    """The newest checkpoint of `directory` that verifies, and [(quarantine folder, reason)] of newer ones that did not.

    Every checkpoint on disk is a candidate (a damaged or lost manager state loses nothing); older ones the
    manager no longer lists are removed and the state lists what is left. `quarantine=False` changes nothing.
    """
    directory = Path(directory)
    try:  # None when missing or unreadable (TensorFlow logs why)
        state = tf.train.get_checkpoint_state(str(directory))
    except ValueError:  # parsed, but names no checkpoint
        state = None
    listed = {Path(p).name for p in state.all_model_checkpoint_paths} if state else None
    found, moved, kept = None, [], []
    for step, pieces in sorted(_pieces_by_step(directory).items(), reverse=True):
        name = f"{CHECKPOINT_NAME}-{step}"
        if found is not None:  # older ones are verified when they are needed
            if listed is None or name in listed:
                kept.append(name)
            elif quarantine:
                _remove(pieces)
            continue
        try:
            found = verify(directory / name)
            kept.append(name)
        except CorruptCheckpointError as err:
            if quarantine:
                moved.append((_quarantine(directory, step, pieces, err.reason), err.reason))
    if quarantine and listed != set(kept):
        if kept:
            now = time.time()
            with deprecation.silence():  # the function CheckpointManager writes its own state with
                update_checkpoint_state_internal(
                    str(directory), str(directory / kept[0]), [str(directory / k) for k in kept[::-1]], save_relative_paths=True,
                    all_model_checkpoint_timestamps=[now] * len(kept), last_preserved_timestamp=now - 1,
                )
        else:
            (directory / STATE_FILE).unlink(missing_ok=True)
    return found, moved


@contextlib.contextmanager
def _quiet_async_errors():  # TensorFlow logs a failed async write as it hands it over; the caller reports it once
    absl_logger, level = logging.getLogger("absl"), logging.getLogger("absl").level
    absl_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


class VerifiedCheckpointManager:
    """A `tf.train.CheckpointManager` whose checkpoints carry a verified SHA-256 manifest.

    Args:
        checkpoint: the `tf.train.Checkpoint` to save and restore.
        directory: the checkpoint folder (created when needed).
        max_to_keep: how many of the newest checkpoints the manager keeps.
        async_save: write in the background (`CheckpointOptions(enable_async=True)`).
        chief: False on a multi-worker cluster's other workers. Every worker takes part in a
            save (reading a variable is a collective); as in Keras' callbacks, the others write to
            `write_directory` (default: a temporary folder, removed at `close()`) and only read
            `directory`, never quarantining or rewriting anything in it.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str | Path, max_to_keep: int = 3, async_save: bool = True, chief: bool = True,
                 write_directory: Optional[str | Path] = None):
        self.directory, self.chief = Path(directory), chief
        self.write_directory = self.directory if chief else Path(write_directory or tempfile.mkdtemp(prefix="caption_tf_worker_ckpt_"))
        self.write_directory.mkdir(parents=True, exist_ok=True)
        self.checkpoint, self.max_to_keep, self.async_save = checkpoint, max_to_keep, async_save
        self.last_published: Optional[CheckpointInfo] = None
        self.refusal: Optional[str] = None  # why saves are refused (see `refuse_saves`)
        self._pending: Optional[int] = None  # the step being written in the background
        self.manager = tf.train.CheckpointManager(checkpoint, str(self.write_directory), max_to_keep, checkpoint_name=CHECKPOINT_NAME)

    @property
    def published_step(self) -> Optional[int]:
        return self.last_published.step if self.last_published else None

    def refuse_saves(self, reason: str) -> None:
        """Every later `save()` raises `SaveRefusedError` (e.g. after a NaN loss)."""
        self.refusal = reason

    def latest_valid(self) -> Optional[CheckpointInfo]:
        info, _ = latest_valid(self.directory, quarantine=self.chief)
        if self.chief:  # the state may have been rewritten: the manager reads it again
            self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.directory), self.max_to_keep, checkpoint_name=CHECKPOINT_NAME)
        return info

    def restore(self, check: Optional[Callable[[CheckpointInfo], None]] = None, step: Optional[int] = None) -> Optional[CheckpointInfo]:
        """Verify and restore `directory`'s checkpoint of `step` (default: the newest valid one; None if none).

        `check(info)` may refuse it first.

        Raises:
            CorruptCheckpointError: the checkpoint of `step` fails verification.
        """
        info = self.latest_valid() if step is None else verify(self.directory / f"{CHECKPOINT_NAME}-{step}")
        if info is not None:
            if check is not None:
                check(info)
            self.checkpoint.read(str(info.path)).assert_existing_objects_matched()
            if self.published_step is None or self.published_step <= info.step:
                self.last_published = info
        return info

    def save(self, step: int, metadata: Optional[Mapping[str, Any]] = None) -> None:
        """Snapshot now; `ckpt-<step>` is written (in the background when async) and published by its manifest.

        Raises:
            SaveRefusedError: after `refuse_saves`.
            CheckpointWriteError: this save failed, or the previous background one did.
        """
        if self.refusal:
            raise SaveRefusedError(f"Not saving step {step}: {self.refusal}")

        def publish(save_path: str) -> None:  # a write callback: the files are complete
            if self.chief:
                try:
                    self.last_published = write_manifest(Path(save_path), int(step), dict(metadata or {}))
                except BaseException:
                    _remove(_files_of(Path(save_path)))  # never an unverifiable checkpoint
                    raise
                self._drop_orphan_manifests()

        failed = self._pending if self.chief and self._pending not in (None, self.published_step) else step
        self._pending = int(step) if self.async_save else None
        try:
            with _quiet_async_errors():  # a previous async failure surfaces here
                self.manager.save(int(step), options=tf.train.CheckpointOptions(enable_async=self.async_save, experimental_write_callbacks=[publish]))
        except Exception as err:
            self._pending = None
            self._discard(failed)
            raise CheckpointWriteError(f"Writing checkpoint {self.directory / f'{CHECKPOINT_NAME}-{failed}'} failed: {err}") from err

    def flush(self) -> Optional[CheckpointInfo]:
        """Wait for the background write; the last published checkpoint. Raises `CheckpointWriteError` if it failed."""
        self.manager.sync()
        self._drop_orphan_manifests()
        pending, self._pending, error = self._pending, None, None
        # TensorFlow keeps an async error until the next save, or raises it at exit: the last save has no next one.
        try:
            with _quiet_async_errors():
                if (helper := getattr(self.checkpoint, "_async_checkpointer_impl", None)) is not None:
                    helper._check_async_thread_error()
        except Exception as err:  # noqa: BLE001 - raised below as CheckpointWriteError
            error = err
        if error is not None or (self.chief and pending not in (None, self.published_step)):
            self._discard(pending)
            raise CheckpointWriteError(f"Writing checkpoint {self.directory / f'{CHECKPOINT_NAME}-{pending}'} failed: {error}") from error
        return self.last_published

    def close(self) -> Optional[CheckpointInfo]:
        """Flush; a worker's temporary folder is removed."""
        try:
            return self.flush()
        finally:
            if not self.chief:
                shutil.rmtree(self.write_directory, ignore_errors=True)

    def _discard(self, step: Optional[int]) -> None:
        # What a failed save left (TensorFlow's ckpt-N_temp/ on a full disk): never valid, and it holds space.
        if self.chief and step is not None and step != self.published_step:
            _remove(_pieces_by_step(self.directory).get(step, []))

    def _drop_orphan_manifests(self) -> None:  # of checkpoints the manager deleted since
        for manifest in self.directory.glob(f"*{MANIFEST_SUFFIX}") if self.chief else ():
            if not _files_of(Path(str(manifest)[: -len(MANIFEST_SUFFIX)])):
                manifest.unlink(missing_ok=True)
