"""A quiet console: TensorFlow's C++ start-up messages only with `--verbose`.

Importing TensorFlow prints lines that are not about the user's run ("All log
messages before absl::InitializeLog() is called ...", "Could not find cuda
drivers", "failed call to cuInit", oneDNN and CPU-instruction notices). Some come
from static initialisers before `TF_CPP_MIN_LOG_LEVEL` is read, so the level alone
cannot hide them: `import_tensorflow` captures the process's stderr (file
descriptor 2) while TensorFlow loads and finds its devices, then writes back every
line that is not one of these known notices, so a real error still shows.

A `TF_CPP_MIN_LOG_LEVEL` set by the user is kept; otherwise it is 2 (warnings and
info hidden; errors shown), or 0 with `--verbose`.

Example:

>>> tf = import_tensorflow(verbose=False)   # before anything else imports TensorFlow
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

import caption_tf

QUIET_LOG_LEVEL, VERBOSE_LOG_LEVEL = "2", "0"
START_UP_NOISE = re.compile(
    "|".join(
        (
            r"All log messages before absl::InitializeLog\(\) is called",
            r"cudart_stub\.cc.*Could not find cuda drivers",
            r"failed call to cuInit",
            r"Unable to register cu(DNN|FFT|BLAS) factory",
            r"computation placer already registered",
            r"TF-TRT Warning: Could not find TensorRT",
            r"oneDNN custom operations are on",
            r"cpu_feature_guard\.cc",
            r"^To enable the following instructions: .*rebuild TensorFlow",
        )
    )
)


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern = START_UP_NOISE) -> Iterator[None]:
    """Capture file descriptor 2 (C++ writes there directly); on exit write back the lines `noise` does not match."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True) if not noise.search(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def import_tensorflow(verbose: bool = False):
    """Import TensorFlow (and find its devices) with its start-up notices hidden unless `verbose`; returns the module."""
    if not caption_tf.TF_LOG_LEVEL_FROM_USER:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = VERBOSE_LOG_LEVEL if verbose else QUIET_LOG_LEVEL
    if verbose or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    with filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA probing (cuInit) happens here, not at import
    return tf
