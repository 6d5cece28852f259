"""The ways a user runs the code: plain `pytest` as well as `python -m pytest`."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO_ROOT

TESTS_DIR = REPO_ROOT / "tests"


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_test_modules_import_conftest_the_way_plain_pytest_can():
    # `tests.conftest` resolves only when the current directory is on sys.path (`python -m pytest`).
    wrong = sorted(p.name for p in TESTS_DIR.glob("*.py") if any(m == "tests" or m.startswith("tests.") for m in imported_modules(p)))
    assert not wrong, f"import `conftest`, not `tests.conftest`: {wrong}"


def test_plain_pytest_from_another_directory(tmp_path):
    # `python -P -m pytest` is the `pytest` command: the current directory is not put on sys.path.
    done = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(TESTS_DIR / "test_text.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "test_text.py::test_cleaning_and_wrapping" in done.stdout  # conftest and caption_tf were imported


def test_every_requirement_is_installed_at_an_allowed_version():
    # A missing requirement fails here, once, instead of silently skipping the tests that need it.
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    problems = []
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        text = line.split("#")[0].strip()
        if not text:
            continue
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            problems.append(f"{requirement.name}: not installed (pip install -r requirements.txt)")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name}: {installed} installed, requirements.txt asks for {requirement.specifier}")
    assert not problems, problems


def test_pyproject_lists_every_package_and_ships_the_presets():
    import tomllib

    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO_ROOT).parts) for p in (REPO_ROOT / "caption_tf").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk | {"caption_tf.configs"}
    assert setuptools["package-dir"]["caption_tf.configs"] == "configs" and any((REPO_ROOT / "configs").glob("*.yaml"))


def test_the_suites_slowest_first_list_names_existing_files():
    """conftest.SLOWEST_FIRST orders the suite; a renamed file would silently drop to the end."""
    from conftest import SLOWEST_FIRST

    assert [name for name in SLOWEST_FIRST if not (TESTS_DIR / name).is_file()] == []
    assert len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)
