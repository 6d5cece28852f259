"""Supervision of training: rerun the training process after a crash.

`python train.py --max-restarts K ...` starts the training in a child
process (the same command, marked with `CAPTION_TF_SUPERVISED=1`) and reruns
it after a crash (a non-zero exit or a signal such as SIGKILL from the OOM
killer) up to K times, with one log line each time. Each rerun resumes from
the newest valid checkpoint (`caption_tf.training.recovery`). Clean stops
that a rerun would not fix are not restarted: bad arguments or a
config/vocabulary mismatch (exit 2), a NaN/Inf loss (3), a failed checkpoint
save or a full disk (4).

This module imports no TensorFlow: the supervising parent stays small.

Example:

```python
supervise(["--preset", "minimal"], max_restarts=3)  # 0 once training finished
```
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
from typing import Callable, Optional, Sequence

SUPERVISED_ENV = "CAPTION_TF_SUPERVISED"  # set in the child of `supervise`

# Exit codes of train.py for a clean stop that a restart would not fix.
EXIT_USER_ERROR = 2  # bad flag, config/vocabulary mismatch (cli.main_guard)
EXIT_NON_FINITE = 3  # the loss became NaN/Inf
EXIT_CHECKPOINT_FAILED = 4  # disk full / checkpoint write failed / low disk stop
NO_RESTART_EXIT_CODES = frozenset({0, EXIT_USER_ERROR, EXIT_NON_FINITE, EXIT_CHECKPOINT_FAILED})


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def is_disk_full(error: Optional[BaseException]) -> bool:
    """True if `error`, or an error it was raised from, is 'No space left on device' (or a quota).

    Checked by errno and message, so it also recognises TensorFlow's ResourceExhaustedError from
    a file write (the same class is used for out-of-memory errors, which do not say "No space").

    Example:

    >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    True
    """
    while error is not None:
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


class TrainingStopped(RuntimeError):
    """Training stopped cleanly before the end (NaN loss, disk full); `exit_code` for train.py.

    Example:

    ```python
    raise TrainingStopped("loss became nan ...", EXIT_NON_FINITE)
    ```
    """

    def __init__(self, message: str, exit_code: int, status: str = "stopped"):
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status  # written to run.json


def child_command(argv: Sequence[str]) -> list[str]:
    """The command that reruns the training CLI with `argv` in a child process."""
    return [sys.executable, "-c", "from caption_tf.cli import main_guard, train_main; main_guard(train_main, skip_teardown=True)", *argv]


def describe_exit(code: int) -> str:
    """'exit code 1' or 'killed by SIGKILL' for a `Popen.returncode`."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def supervise(argv: Sequence[str], max_restarts: int, command: Optional[Callable[[Sequence[str]], list[str]]] = None) -> int:
    """Run training in a child process; rerun it after a crash, up to `max_restarts` times.

    A crash is a non-zero exit or a signal, except the clean stops a rerun would
    not fix (bad arguments/mismatch: 2, NaN loss: 3, checkpoint/disk failure: 4).
    Each rerun resumes from the newest valid checkpoint. Returns the last exit code.

    Example:

    ```python
    exit_code = supervise(["--preset", "minimal"], max_restarts=3)
    ```
    """
    make_command = command or child_command
    env = {**os.environ, SUPERVISED_ENV: "1"}
    restarts = 0
    while True:
        child = subprocess.Popen(make_command(argv), env=env, preexec_fn=_die_with_parent(os.getpid()))
        try:
            code = child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)
            child.wait()
            raise
        if code in NO_RESTART_EXIT_CODES:
            return code
        if restarts >= max_restarts:
            print(f"supervisor: training crashed ({describe_exit(code)}); no restarts left (--max-restarts {max_restarts})", flush=True)
            return code if code > 0 else 128 - code
        restarts += 1
        print(
            f"supervisor: training crashed ({describe_exit(code)}); restart {restarts}/{max_restarts}, resuming from the last checkpoint",
            flush=True,
        )


def _die_with_parent(parent: int) -> Optional[Callable[[], None]]:
    """In the child, before exec: SIGKILL me when the supervisor dies, even by SIGKILL (Linux prctl)."""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before the line above
            os._exit(1)

    return arm


def supervising(max_restarts: int) -> bool:
    """True when this process should supervise (restarts asked, not already a supervised child)."""
    return max_restarts > 0 and os.environ.get(SUPERVISED_ENV) != "1"
