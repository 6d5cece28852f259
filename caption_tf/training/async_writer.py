"""A single-slot background worker for slow, fallible writes.

Checkpoint publishing (copying, hashing, fsync, renaming) is slow and can fail
(disk full, I/O error). `BackgroundWriter` runs such jobs on one background
thread with at most one job in flight: submitting a new job first waits for
the previous one. An exception raised by a job is never swallowed: it is
re-raised on the caller's thread, wrapped in `BackgroundWriteError`, at the
next `submit()` or `wait()`.

Example:

>>> writer = BackgroundWriter(name="demo")
>>> writer.submit(lambda: 1 + 1)
>>> writer.wait()
2
>>> writer.close()
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional


class BackgroundWriteError(RuntimeError):
    """A background job failed; `__cause__` holds the original exception.

    Example:

    >>> try:
    ...     raise BackgroundWriteError("saving ckpt-10 failed") from OSError(28, "full")
    ... except BackgroundWriteError as err:
    ...     err.errno
    28
    """

    @property
    def errno(self) -> Optional[int]:
        """The errno of the underlying OSError, if any (e.g. ENOSPC)."""
        return getattr(self.__cause__, "errno", None)


class BackgroundWriter:
    """Runs jobs on one background thread, at most one in flight.

    Args:
        name: thread name prefix, shown in stack dumps.
        enabled: if False, jobs run inline on the caller's thread (the
            synchronous mode), with the same error wrapping.

    Example:

    >>> writer = BackgroundWriter(name="demo", enabled=False)
    >>> writer.submit(lambda: "done")
    >>> writer.wait()
    'done'
    """

    def __init__(self, name: str = "background-writer", enabled: bool = True):
        self.enabled = enabled
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if enabled else None
        self._pending: Optional[Future] = None
        self._description = ""
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """True while a submitted job has not finished."""
        return self._pending is not None and not self._pending.done()

    def submit(self, job: Callable[[], Any], description: str = "background write") -> None:
        """Wait for the previous job (re-raising its error), then start `job`."""
        self.wait()
        with self._lock:
            self._description = description
            if self._executor is None:
                future: Future = Future()
                try:
                    future.set_result(job())
                except BaseException as err:  # noqa: BLE001 - re-raised by wait()
                    future.set_exception(err)
            else:
                future = self._executor.submit(job)
            self._pending = future

    def wait(self) -> Any:
        """Block until the job in flight finishes; return its result.

        Raises:
            BackgroundWriteError: the job raised; the original error is chained.
        """
        with self._lock:
            future, description = self._pending, self._description
            self._pending = None
        if future is None:
            return None
        error = future.exception()
        if error is not None:
            raise BackgroundWriteError(f"{description} failed: {error}") from error
        return future.result()

    def close(self) -> Any:
        """Wait for the job in flight (re-raising its error) and stop the thread."""
        try:
            return self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
                self.enabled = False
