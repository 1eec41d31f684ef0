"""The architecture of ``docs/architecture.md``, checked: imports point one way, and light modules stay light.

Every module under ``dcp_explorer/`` is parsed with :mod:`ast` (never imported) and every import is
collected -- at module level, inside functions and methods, and under ``if TYPE_CHECKING:`` --
together with ``importlib.import_module("x")`` / ``__import__("x")`` calls with a literal name.

Rules
-----
1. A *light* module (:data:`PURE` and :data:`TORCH_FREE`) imports no :data:`HEAVY` library
   (torch, ipywidgets, matplotlib) anywhere: not at module level, not inside a function, not under
   ``TYPE_CHECKING``. Its run-time imports from the package are light too (a pure module's are
   pure), so a light module cannot reach torch through a helper either.
2. A module imports only from its own layer or lower ones (:data:`LAYERS`). Imports inside
   functions count: they run as soon as the function is called. Imports under ``TYPE_CHECKING``
   never run, so they may point upward (they name the types a function receives, e.g.
   ``Checkpoint`` in ``load``); they still count for rule 1.
3. :data:`LAYERS` is the table in ``docs/architecture.md``, and every module is in it.

Known exceptions to rule 2 are listed, with their reason, in :data:`KNOWN_UPWARD`; an entry that no
longer occurs fails the test, so the list only shrinks. A fresh interpreter then imports every light
module and checks that no heavy library was loaded.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "dcp_explorer"
DOC = ROOT / "docs" / "architecture.md"

#: Libraries a light module never imports.
HEAVY = ("torch", "ipywidgets", "matplotlib", "safetensors.torch")

#: Import layers, lowest first: a module may import from its own layer and the ones below.
#: A package name covers its submodules (``dcp_explorer.readers`` -> ``readers._fast``, ...), except
#: ``dcp_explorer`` itself, which means only the package's ``__init__`` (the public facade).
LAYERS: dict[str, int] = {
    # 0 base
    "dcp_explorer.errors": 0,
    "dcp_explorer._procs": 0,  # local worker processes; torch only in the worker-side functions
    # 1 the model (pure)
    "dcp_explorer.model": 1,
    "dcp_explorer.layout": 1,
    # 2 access: metadata I/O (torch-free)
    "dcp_explorer.store": 2,
    "dcp_explorer.cache": 2,
    "dcp_explorer.readers": 2,
    # 3 views: DataFrames and HTML of the model (pure)
    "dcp_explorer.tables": 3,
    "dcp_explorer.html": 3,
    # 4 operations
    "dcp_explorer.plan": 4,
    "dcp_explorer.load": 4,
    "dcp_explorer.quant": 4,
    "dcp_explorer._kernels": 4,  # compiled, used by quant
    "dcp_explorer.export": 4,
    # 5 facade
    "dcp_explorer.checkpoint": 5,
    "dcp_explorer": 5,
    "dcp_explorer.diff": 5,  # takes paths or Checkpoints: opens them, then streams through load/quant
    # 6 pictures
    "dcp_explorer.viz": 6,
    "dcp_explorer.viz_quant": 6,
    # 7 widgets
    "dcp_explorer.widgets": 7,
    # 8 front ends and tools
    "dcp_explorer.cli": 8,
    "dcp_explorer.verify": 8,
    "dcp_explorer.samples": 8,
}
LAYER_NAMES = (
    "base",
    "model",
    "access",
    "views",
    "operations",
    "facade",
    "pictures",
    "widgets",
    "front ends",
)

#: No I/O and no heavy library; their package imports are pure as well.
PURE = frozenset({
    "dcp_explorer.errors", "dcp_explorer.model", "dcp_explorer.layout",
    "dcp_explorer.tables", "dcp_explorer.html", "dcp_explorer.plan",
})  # fmt: skip
#: They read (store, readers) or write (cache) files, but never need a heavy library.
TORCH_FREE = frozenset({"dcp_explorer.store", "dcp_explorer.cache", "dcp_explorer.readers"})

#: Upward run-time imports that exist today, (importer, imported) -> why; see docs/architecture.md.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------------
# the checker
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    """One import statement (or literal ``import_module`` call) found in a module."""

    importer: str  #: the importing module, dotted
    target: str  #: the imported module (or, for ``from pkg import name`` of a non-module, ``pkg``)
    line: int  #: line number in the importer
    in_function: bool  #: inside a function or method body (runs when it is called)
    type_checking: bool  #: under ``if TYPE_CHECKING:`` (never runs)

    def __str__(self) -> str:
        where = (
            "TYPE_CHECKING" if self.type_checking else "in a function" if self.in_function else "top level"
        )
        return f"{self.importer}:{self.line} imports {self.target} ({where})"


def module_name(relpath: str) -> tuple[str, bool]:
    """``"dcp_explorer/readers/dcp.py"`` -> (``"dcp_explorer.readers.dcp"``, is_package=False)."""
    parts = relpath.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def find_imports(relpath: str, source: str, modules: frozenset[str]) -> list[Import]:
    """All imports of one module, relative ones resolved; ``modules`` tells a submodule from a name."""
    name, is_pkg = module_name(relpath)
    package = name if is_pkg else name.rpartition(".")[0]
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> list[str]:
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        # `from pkg import sub` imports the module pkg.sub; `from pkg import name` only pkg
        subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
        rest = len(subs) < len(node.names)
        return subs + ([mod] if rest or not subs else [])

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, type_checking)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = resolve(node)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            targets = [node.args[0].value]
        for t in targets:
            found.append(Import(name, t, getattr(node, "lineno", 0), in_function, type_checking))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_checking)

    visit(ast.parse(source, filename=relpath), False, False)
    return found


def layer_of(module: str) -> int | None:
    """The layer of a package module (longest matching entry of :data:`LAYERS`), None if unlisted."""
    if module in LAYERS:
        return LAYERS[module]
    parts = module.split(".")
    for n in range(len(parts) - 1, 1, -1):  # never fall back to the bare "dcp_explorer" facade
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def _in(module: str, group: frozenset[str]) -> bool:
    return any(module == g or module.startswith(g + ".") for g in group)


def _heavy(target: str) -> bool:
    return any(target == h or target.startswith(h + ".") for h in HEAVY)


def check(sources: dict[str, str], modules: frozenset[str] | None = None) -> list[str]:
    """Every rule broken by ``sources`` ({relative path: source}), as messages; [] when all hold.

    Upward imports in :data:`KNOWN_UPWARD` are reported too, prefixed ``known:``.
    """
    if modules is None:
        modules = frozenset(module_name(p)[0] for p in sources)
    problems: list[str] = []
    for relpath, source in sorted(sources.items()):
        importer = module_name(relpath)[0]
        own = layer_of(importer)
        if own is None:
            problems.append(f"{importer} is in no layer: add it to LAYERS and docs/architecture.md")
            continue
        light = _in(importer, PURE) or _in(importer, TORCH_FREE)
        for imp in find_imports(relpath, source, modules):
            internal = imp.target == "dcp_explorer" or imp.target.startswith("dcp_explorer.")
            if light and _heavy(imp.target):
                problems.append(f"light module imports a heavy library: {imp}")
            if not internal or imp.type_checking:
                continue
            if _in(importer, PURE) and not _in(imp.target, PURE):
                problems.append(f"pure module imports a module that is not pure: {imp}")
            elif light and not (_in(imp.target, PURE) or _in(imp.target, TORCH_FREE)):
                problems.append(f"torch-free module imports a module that is not light: {imp}")
            theirs = layer_of(imp.target)
            if theirs is not None and theirs > own:
                known = "known: " if (importer, imp.target) in KNOWN_UPWARD else ""
                problems.append(
                    f"{known}upward import, layer {own} {LAYER_NAMES[own]} -> {theirs} {LAYER_NAMES[theirs]}: {imp}"
                )
    return problems


def package_sources() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted(PKG.rglob("*.py"))}


def package_modules() -> frozenset[str]:
    """Python modules and compiled extensions (by their C source) of the package."""
    names = {module_name(p)[0] for p in package_sources()}
    names |= {p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".") for p in PKG.rglob("*.c")}
    return frozenset(names)


# ------------------------------------------------------------------------------------------------
# the package
# ------------------------------------------------------------------------------------------------
def test_no_unknown_violation():
    problems = [p for p in check(package_sources(), package_modules()) if not p.startswith("known: ")]
    assert not problems, "layering rules broken (docs/architecture.md):\n  " + "\n  ".join(problems)


def test_known_upward_imports_still_exist():
    seen = {
        (m.group(1), m.group(2))
        for p in check(package_sources(), package_modules())
        if (m := re.search(r"^known: .*: ([\w.]+):\d+ imports ([\w.]+) ", p))
    }
    stale = sorted(set(KNOWN_UPWARD) - seen)
    assert not stale, f"fixed, so remove from KNOWN_UPWARD (and the doc): {stale}"


def test_every_module_has_a_layer():
    missing = sorted(m for m in package_modules() if layer_of(m) is None)
    assert not missing, f"add to LAYERS and docs/architecture.md: {missing}"


def test_doc_table_matches_layers():
    """Each row ``| N | name | `mod`, `mod` | ...`` of the doc's layer table lists exactly that layer."""
    rows = re.findall(r"^\|\s*(\d)\s*\|\s*([^|]+?)\s*\|([^|]*)\|", DOC.read_text(), re.M)
    assert rows, f"no layer table in {DOC}"
    doc = {int(n): (name, set(re.findall(r"`([\w.]+)`", mods))) for n, name, mods in rows}
    for n, label in enumerate(LAYER_NAMES):
        want = {m.removeprefix("dcp_explorer.") if m != "dcp_explorer" else "dcp_explorer"
                for m, layer in LAYERS.items() if layer == n}  # fmt: skip
        assert n in doc, f"layer {n} ({label}) missing from the doc's table"
        assert doc[n][0].lower() == label, (n, doc[n][0], label)
        assert {m.removesuffix(".*").removesuffix("/") for m in doc[n][1]} == want, (n, doc[n][1], want)


def test_light_modules_load_no_heavy_library_at_import():
    """A fresh interpreter imports every light module; no heavy library may be in ``sys.modules``."""
    light = sorted(
        m for m in package_modules() if (_in(m, PURE) or _in(m, TORCH_FREE)) and not m.endswith("._dcpscan")
    )
    child = textwrap.dedent(
        """
        import importlib, json, sys
        heavy = tuple(sys.argv[1].split(","))
        report = {}
        for name in sys.argv[2:]:
            importlib.import_module(name)
            report[name] = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        print(json.dumps(report))
        """
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    heavy_roots = sorted({h.split(".")[0] for h in HEAVY})
    proc = subprocess.run(
        [sys.executable, "-c", child, ",".join(heavy_roots), *light],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(report) == light
    loaded = {name: mods for name, mods in report.items() if mods}
    assert not loaded, f"importing these loaded heavy libraries: {loaded}"


# ------------------------------------------------------------------------------------------------
# the checker can fail
# ------------------------------------------------------------------------------------------------
FAKE_MODULES = frozenset({"dcp_explorer", "dcp_explorer.model", "dcp_explorer.widgets", "dcp_explorer.load"})


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "import torch\n",
            "light module imports a heavy library: dcp_explorer.model:1 imports torch (top level)",
        ),
        (
            "def f():\n    from matplotlib import pyplot\n",
            "light module imports a heavy library: dcp_explorer.model:2 imports matplotlib (in a function)",
        ),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ipywidgets\n",
            "light module imports a heavy library: dcp_explorer.model:3 imports ipywidgets (TYPE_CHECKING)",
        ),
        (
            "import importlib\ndef f():\n    return importlib.import_module('torch.nn')\n",
            "light module imports a heavy library: dcp_explorer.model:3 imports torch.nn (in a function)",
        ),
        (
            "def f():\n    from . import widgets\n",
            "upward import, layer 1 model -> 7 widgets: dcp_explorer.model:2 imports dcp_explorer.widgets",
        ),
        (
            "def f():\n    from .load import Loader\n",
            "pure module imports a module that is not pure: dcp_explorer.model:2 imports dcp_explorer.load",
        ),
    ],
)
def test_checker_flags_a_fake_module(source, expected):
    problems = check({"dcp_explorer/model.py": source}, FAKE_MODULES)
    assert any(p.startswith(expected) for p in problems), problems


def test_checker_allows_type_checking_upward_and_downward_imports():
    source = textwrap.dedent(
        """
        from typing import TYPE_CHECKING
        import numpy as np
        from .errors import MetadataError
        from .model import CheckpointIndex
        if TYPE_CHECKING:
            from .checkpoint import Checkpoint
        else:
            pass
        def f():
            from .layout import parse_mesh
        """
    )
    assert check({"dcp_explorer/plan.py": source}, FAKE_MODULES) == []


def test_checker_counts_the_else_branch_of_type_checking_as_run_time():
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\nelse:\n    from .widgets import x\n"
    )
    problems = check({"dcp_explorer/model.py": source}, FAKE_MODULES)
    assert any("upward import" in p and "(top level)" in p for p in problems), problems


def test_checker_resolves_relative_imports_in_subpackages():
    imports = find_imports(
        "dcp_explorer/widgets/quant.py",
        "from .. import open, viz_quant\nfrom ._common import guarded\n",
        frozenset({"dcp_explorer", "dcp_explorer.viz_quant", "dcp_explorer.widgets._common"}),
    )
    assert sorted(i.target for i in imports) == [
        "dcp_explorer",
        "dcp_explorer.viz_quant",
        "dcp_explorer.widgets._common",
    ]
