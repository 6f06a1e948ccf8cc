"""Imports go one way: every module of efficient_ops/, triton_kernels/ and bench/ imports only from its own
layer or the layers below it (read with ``ast``, relative imports resolved; imports inside functions count).

    formats < reference < (triton_kernels, _C) < ops < nn < pipelines, serving < cli, bench

Special cases, and why:

- ``efficient_ops.backends`` (backend selection, the extension handle, device guards) is plumbing of the ops
  layer: it imports nothing from the package (it loads ``efficient_ops._C`` and ``triton`` by name, at run
  time), and ops, cli and bench use it. It sits at the ops level.
- ``efficient_ops/__init__.py`` is the public facade: it re-exports every public wrapper and type, so it imports
  from formats, ops and nn, and sits just above nn. Nothing below it may import it (``from .. import backends``
  inside ops names the module ``efficient_ops.backends``, not the facade); pipelines, serving, cli and bench may.
- ``triton_kernels`` imports nothing from the package but itself (format facts come in as arguments from ops),
  and ``_C`` is compiled C++ (csrc/ includes no package headers).
- A pipeline (``efficient_ops.pipelines.<name>``) imports only the facade ``efficient_ops``, ``efficient_ops.nn``
  (its public modules) and its own subpackage: never ``ops``, ``reference``, ``formats``, kernels, ``backends``,
  another pipeline, or a private module.

A module that matches no layer fails the test: a new top-level module or package must be placed here first.
"""

import ast
import os
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source directory -> the package it installs as (setup.py's package_dir)
SOURCES = {"efficient_ops": "efficient_ops", "triton_kernels": "efficient_ops.triton_kernels",
           "bench": "efficient_ops.bench"}
FACADE = "efficient_ops"
EXTENSION = "efficient_ops._C"  # compiled, so no .py file to discover
FACADE_LEVEL = 4.5  # above nn, below pipelines

# module prefix -> level; the longest matching prefix wins
LEVELS = {
    "efficient_ops.formats": 0,
    "efficient_ops.reference": 1,
    "efficient_ops.triton_kernels": 2,
    "efficient_ops._C": 2,
    "efficient_ops.ops": 3,
    "efficient_ops.backends": 3,
    "efficient_ops.nn": 4,
    "efficient_ops.pipelines": 5,
    "efficient_ops.serving": 5,
    "efficient_ops.cli": 6,
    "efficient_ops.bench": 6,
}
PIPELINES = "efficient_ops.pipelines"


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def level(name: str) -> Optional[float]:
    """The layer of module ``name`` (None if it belongs to none)."""
    if name == FACADE:
        return FACADE_LEVEL
    matches = [p for p in LEVELS if _under(name, p)]
    return LEVELS[max(matches, key=len)] if matches else None


def discover() -> Dict[str, Path]:
    """Every module of the three source trees: dotted name -> file."""
    modules = {}
    for directory, package in SOURCES.items():
        base = ROOT / directory
        for dirpath, dirnames, filenames in os.walk(base):  # does not follow the worktree's symlinked dirs
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not (Path(dirpath) / d).is_symlink())
            for filename in sorted(filenames):
                if not filename.endswith(".py"):
                    continue
                path = Path(dirpath) / filename
                parts = list(path.relative_to(base).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                modules[".".join([package, *parts])] = path
    return modules


def imported_modules(module: str, source: str, is_package: bool, known) -> List[tuple]:
    """(line, target module) for every package-internal import in ``source`` (the module called ``module``).
    ``from X import name`` targets ``X.name`` when that is a module in ``known``, else ``X``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{module}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known or sub == EXTENSION else target))
    return [(line, t) for line, t in found if _under(t, "efficient_ops")]


def violation(importer: str, target: str) -> Optional[str]:
    """Why ``importer`` may not import ``target`` (None when it may)."""
    src, dst = level(importer), level(target)
    if src is None:
        return f"{importer} belongs to no layer (add it to LEVELS in tests/test_layering.py)"
    if dst is None:
        return f"{target} belongs to no layer (add it to LEVELS in tests/test_layering.py)"
    if _under(importer, "efficient_ops.triton_kernels") and not _under(target, "efficient_ops.triton_kernels"):
        return "triton_kernels imports nothing from the package (pass format facts in from ops)"
    if _under(importer, PIPELINES):
        own = ".".join(importer.split(".")[:3])  # efficient_ops.pipelines.<name> (or the pipelines package)
        public_nn = _under(target, "efficient_ops.nn") and not any(p.startswith("_") for p in target.split("."))
        if not (target == FACADE or public_nn or _under(target, own)):
            return (f"a pipeline imports only efficient_ops, efficient_ops.nn and its own subpackage {own}, "
                    f"not {target}")
        return None
    if dst > src:
        return f"upward import: layer {src} imports {target} of layer {dst}"
    return None


def check(modules: Dict[str, Path]) -> List[str]:
    errors = []
    for name, path in modules.items():
        if level(name) is None:
            errors.append(f"{path.relative_to(ROOT)}: {name} belongs to no layer (add it to LEVELS)")
            continue
        for line, target in imported_modules(name, path.read_text(), path.name == "__init__.py", modules):
            why = violation(name, target)
            if why:
                errors.append(f"{path.relative_to(ROOT)}:{line}: {why}")
    return errors


def test_no_upward_imports():
    modules = discover()
    # the walk found the layers it polices (a broken walk would pass vacuously)
    for layer in ("efficient_ops.formats.lowbit", "efficient_ops.reference.lowbit", "efficient_ops.ops._library",
                  "efficient_ops.nn", "efficient_ops.triton_kernels.lowbit", "efficient_ops.bench.common",
                  "efficient_ops.cli", "efficient_ops.backends", "efficient_ops.pipelines"):
        assert layer in modules, layer
    errors = check(modules)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("importer, is_package, source", [
    ("efficient_ops.formats.lowbit", False, "from ..ops import lowbit_linear"),  # formats -> ops
    ("efficient_ops.reference.speculative", False, "from ..ops._library import lib"),  # reference -> ops
    ("efficient_ops.ops.lowbit", False, "import efficient_ops"),  # ops -> the facade (which imports nn)
    ("efficient_ops.ops.lowbit", False, "from ..nn import QuantLinear"),  # ops -> nn
    ("efficient_ops.nn.lowbit", False, "from .. import lowbit_linear"),  # nn -> the facade
    ("efficient_ops.triton_kernels.lowbit", False, "from efficient_ops.formats.lowbit import get_format"),
    ("efficient_ops.triton_kernels.lowbit", False, "from .. import _C"),
    ("efficient_ops.pipelines.speculative.loop", False, "from ...ops.speculative import tree_attention"),
    ("efficient_ops.pipelines.speculative", True, "from efficient_ops.reference import speculative"),
    ("efficient_ops.pipelines.tempo.ata", False, "from ..speculative import drafter"),  # another pipeline
    ("efficient_ops.pipelines.tempo", True, "from efficient_ops import backends"),
    ("efficient_ops.pipelines.tempo", True, "from efficient_ops.nn import _private"),
    ("efficient_ops.nn.lowbit", False, "def f():\n    from ..pipelines import tempo"),  # lazy imports count
])
def test_planted_upward_import_fails(importer, is_package, source):
    """The checker flags each kind of forbidden import (so the test above can fail)."""
    known = set(discover()) | {"efficient_ops.nn._private", "efficient_ops.pipelines.tempo",
                               "efficient_ops.pipelines.speculative", "efficient_ops.pipelines.speculative.drafter"}
    targets = imported_modules(importer, source, is_package, known)
    assert targets and all(violation(importer, t) for _, t in targets), targets


@pytest.mark.parametrize("importer, is_package, source", [
    ("efficient_ops.ops.lowbit", False, "from .. import backends"),  # the module, not the facade
    ("efficient_ops.ops.lowbit", False, "from ..reference import lowbit as reference"),
    ("efficient_ops.ops.lowbit", False, "from ..triton_kernels import lowbit"),
    ("efficient_ops.pipelines.speculative.loop", False, "from efficient_ops import tree_attention, nn"),
    ("efficient_ops.pipelines.speculative.loop", False, "from efficient_ops.nn.loading import load_causal_lm"),
    ("efficient_ops.pipelines.speculative.loop", False, "from .drafter import Drafter"),
    ("efficient_ops.bench.lowbit", False, "from efficient_ops.formats.lowbit import get_format"),
])
def test_allowed_imports_pass(importer, is_package, source):
    known = set(discover()) | {"efficient_ops.pipelines.speculative.drafter"}
    targets = imported_modules(importer, source, is_package, known)
    assert targets and not [violation(importer, t) for _, t in targets if violation(importer, t)], targets
