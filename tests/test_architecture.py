"""The package's imports flow one way, with no cycles.

Layers, lowest first; a module may import its own layer and the layers below:

    caption_tf, config, files,    the package, configuration, atomic writes and hashes,
    console                       the quiet console
    data                          datasets, images, text
    features                      backbones, feature cache and its record format
    models                        attention, decoder (loss, train step), decoding
    figures                       figures training and evaluation both draw
    run_folder                    the run folder: layout, run.json, loading a trained run
    training                      training pipeline, schedules, crash recovery
    evaluation                    metrics, analyses, the report
    cli                           train.py / evaluate.py

Every `import` counts, also those inside functions (a lazy import is still a
dependency). The graph is read from each module's source (AST); every module
is also imported for real.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = "caption_tf"
PACKAGE_DIR = REPO_ROOT / PACKAGE
LAYERS = (
    ("caption_tf", "caption_tf.config", "caption_tf.files", "caption_tf.console"),
    ("caption_tf.data",),
    ("caption_tf.features",),
    ("caption_tf.models",),
    ("caption_tf.figures",),
    ("caption_tf.run_folder",),
    ("caption_tf.training",),
    ("caption_tf.evaluation",),
    ("caption_tf.cli",),
)


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the most specific entry naming `module` or a package above it."""
    best, best_len = None, -1
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            covers = module == entry or (entry != PACKAGE and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def imported_modules(module: str, path: Path) -> list[tuple[str, int]]:
    """(package module imported, line) for every import in `path`, at any depth of the code."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule if submodule in MODULES else source, node.lineno))
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            raise AssertionError(
                f"{path}:{node.lineno}: a dynamic import of a package module hides a dependency; import it by name"
            )
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    first = call.args[0] if call.args else None
    return (
        name in ("import_module", "__import__")
        and isinstance(first, ast.Constant)
        and isinstance(first.value, str)
        and first.value.startswith(PACKAGE)
    )


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported package module: first line}."""
    graph = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for name, line in imported_modules(module, path):
            if name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_lazy_and_aliased_imports():
    """The AST reader itself: function-level imports and `from package import module` are edges."""
    graph = import_graph()
    assert "caption_tf.models.decoder" in graph["caption_tf.run_folder"]  # imported inside load_run
    assert "caption_tf.run_folder" in graph["caption_tf.training.trainer"]  # `from caption_tf import run_folder`
    assert "caption_tf.training.finetune" in graph["caption_tf.cli"]  # imported inside train_main
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_only_go_down_the_layers():
    graph = import_graph()
    upward = [
        f"{MODULES[module].relative_to(REPO_ROOT)}:{line}: {module} (layer {layer_of(module)}) imports "
        f"{imported} (layer {layer_of(imported)})"
        for module, edges in sorted(graph.items())
        for imported, line in sorted(edges.items())
        if layer_of(imported) > layer_of(module)
    ]
    assert not upward, "imports against the layering (see the docstring of this test):\n" + "\n".join(upward)


def test_every_module_has_a_layer():
    unplaced = [module for module in MODULES if layer_of(module) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_run_folder_and_supervisor_import_without_tensorflow():
    """The supervising parent process reads run folders; it must not pay TensorFlow's start-up."""
    code = (
        "import sys, caption_tf.run_folder, caption_tf.training.supervisor;"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
