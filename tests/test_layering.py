"""The package's layering: every module imports alone, imports only from lower layers, and keeps no globals.

A circle of imports is a layering bug, so it is fixed by moving the shared piece down, never by hiding
an import in a function body: function-level imports of captioner modules are checked like any other.
Only `if TYPE_CHECKING:` blocks are exempt (they never run). ARCHITECTURE.md explains the layers.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "captioner"

# The layers, bottom to top: a module may import from its own layer and the layers below, never above.
# `captioner.models` and `captioner.data` stand for every module of those packages. The package root
# (`captioner/__init__.py`) sits on top: it lazily re-exports `Captioner` from the API.
LAYERS: dict[str, int] = {
    "captioner.errors": 0,
    "captioner.config": 1,      # config dataclasses, option enums, `resolve`
    "captioner.runtime": 1,     # device, precision plan, autocast, process group, RNG state
    "captioner.models": 2,      # positional, kernels, attention, encoders, decoder, captioner
    "captioner.data": 2,        # images, vocab, synthetic, sources, dataset
    "captioner.checkpoint": 3,  # run directories
    "captioner.concepts": 3,    # the visual-concept loss: which words an image's captions contain
    "captioner.decoding": 4,    # greedy / beam / sample over CaptionModel.begin's steps
    "captioner.metrics": 4,
    "captioner.results": 4,     # result files (jsonl, csv, json): streamed, flushed, read back to resume
    "captioner.api": 5,         # Captioner.load / caption
    "captioner.overlay": 6,
    "captioner.curves": 6,      # curves.png of a run: loss, learning rate, validation scores
    "captioner.attend": 6,
    "captioner.evaluation": 6,
    "captioner.bulk": 6,        # caption many files into a results file: resume, torchrun shards, events
    "captioner.feature_cache": 6,  # a frozen backbone's features, computed once and memory-mapped from disk
    "captioner.training": 7,    # the one training loop
    "captioner.scst": 7,        # SCST: its reward step and run set-up, on training's loop
    "captioner.serve": 7,       # `captioner serve`: the HTTP API and page over api, overlay and results
    "captioner.cli": 8,
    "captioner.__main__": 8,
    "captioner": 8,
}
PACKAGES = ("captioner.models", "captioner.data", "captioner.serve")  # entries of LAYERS that cover a whole package

# Same-layer parts that must not import each other at all: the model never knows how data is read,
# and the data never knows what model will consume it.
APART = {("captioner.models", "captioner.data"), ("captioner.data", "captioner.models")}

# Modules narrower than their layer allows: the bottom floor that every layer above may lean on.
ONLY = {"captioner.runtime": {"captioner.errors", "captioner.config"}}

# Names of the package root that any module may read: `__init__.py` runs before every submodule,
# and `__version__` is a plain string there, so reading it depends on nothing above.
ROOT_NAMES = {"__version__"}


def module_name(path: Path) -> str:
    """`captioner/models/attention.py` -> `captioner.models.attention`; a package's `__init__.py` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES = sorted(FILES)


def layer_key(module: str) -> str | None:
    """The LAYERS entry that covers `module`, or None when it has none."""
    if module in LAYERS:
        return module
    return next((pkg for pkg in PACKAGES if module.startswith(pkg + ".")), None)


@dataclass(frozen=True)
class Import:
    """One import of a captioner module: who imports what, and where."""

    source: str  # importing module
    target: str  # imported module (a submodule when `from pkg import submodule`)
    line: int

    def where(self) -> str:
        """`captioner/api.py:94: from captioner.training import resolve_device`"""
        path = FILES[self.source]
        text = path.read_text().splitlines()[self.line - 1].strip()
        return f"{path.relative_to(ROOT)}:{self.line}: {text}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of the tree except those inside `if TYPE_CHECKING:` bodies (their `else` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str) -> list[Import]:
    """Every captioner import of `module` that can run: top level and in function bodies."""
    path = FILES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base != "captioner" and not base.startswith("captioner."):
                continue
            # `from pkg import name` imports the submodule pkg.name when there is one, else reads pkg.
            targets = []
            for alias in node.names:
                if f"{base}.{alias.name}" in FILES:
                    targets.append(f"{base}.{alias.name}")
                elif not (base == "captioner" and alias.name in ROOT_NAMES):
                    targets.append(base)
        else:
            continue
        found += [Import(module, t, node.lineno) for t in dict.fromkeys(targets)
                  if t == "captioner" or t.startswith("captioner.")]
    return sorted(found, key=lambda imp: (imp.line, imp.target))


ALL_IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if layer_key(m) is None]
    assert not missing, f"modules without a layer: {missing}; add each to LAYERS in tests/test_layering.py"


def test_no_import_of_a_higher_layer() -> None:
    bad = []
    for imp in ALL_IMPORTS:
        src, dst = layer_key(imp.source), layer_key(imp.target)
        if src is None or dst is None:
            continue  # reported by test_every_module_has_a_layer (or a missing module, by the import test)
        if LAYERS[dst] > LAYERS[src]:
            bad.append(f"{imp.where()}  (layer {LAYERS[src]} imports {imp.target}, layer {LAYERS[dst]})")
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


def test_models_and_data_stay_apart() -> None:
    bad = []
    for imp in ALL_IMPORTS:
        pair = (layer_key(imp.source), layer_key(imp.target))
        if pair in APART:
            bad.append(f"{imp.where()}  ({pair[0]} must not import {pair[1]})")
        allowed = ONLY.get(imp.source)
        if allowed is not None and imp.target not in allowed:
            bad.append(f"{imp.where()}  ({imp.source} may import only {sorted(allowed)})")
    assert not bad, "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), by Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    edges: dict[str, set[str]] = {}
    for imp in ALL_IMPORTS:
        edges.setdefault(imp.source, set()).add(imp.target)
    report = []
    for component in _cycles(edges):
        members = set(component)
        report.append("cycle among " + ", ".join(component) + ":")
        report += ["  " + imp.where() for imp in ALL_IMPORTS if imp.source in members and imp.target in members]
    assert not report, "\n".join(report)


def test_no_global_statements() -> None:
    bad = []
    for module in MODULES:
        path = FILES[module]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Global):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: global {', '.join(node.names)}")
    assert not bad, "module-level switches (pass a setting or a context object instead):\n" + "\n".join(bad)


# Importing every module alone in a fresh interpreter finds the circles that only show when a module is
# the first one imported. A new interpreter per module would pay torch's import (seconds) each time, so one
# interpreter imports the heavy third-party libraries (no captioner module) and forks a child per module:
# each child starts with no captioner module loaded and imports just the one it was given.
_IMPORT_EACH = r"""
import json, os, subprocess, sys, traceback
import numpy, PIL.Image, torch  # noqa: F401  (third-party only: importing them hides no circle of ours)

assert not any(m == "captioner" or m.startswith("captioner.") for m in sys.modules)
results = {}
for name in sys.argv[1:]:
    if not hasattr(os, "fork"):
        run = subprocess.run([sys.executable, "-c", "import " + name], capture_output=True, text=True)
        results[name] = run.stderr.strip() if run.returncode else None
        continue
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(name)
            status = 0
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            status = 1
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        error = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    results[name] = None if status == 0 else (error.strip() or f"child exited with status {status}")
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def imported_alone() -> dict[str, str | None]:
    """{module: None if it imports alone, else the traceback}."""
    run = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *MODULES], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_imports_alone(module: str, imported_alone: dict[str, str | None]) -> None:
    error = imported_alone[module]
    assert error is None, f"`import {module}` in a fresh interpreter fails:\n{error}"
