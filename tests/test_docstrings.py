"""Every `>>>` example in the package's docstrings runs and prints what it shows.

Examples that need a trained run, a download or minutes of work are written as
```python blocks instead, without invented outputs.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import caption_tf

MODULES = ["caption_tf"] + sorted(m.name for m in pkgutil.walk_packages(caption_tf.__path__, "caption_tf."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write a file (a figure) write it here
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
