"""The plugin API boundary: plugins import from the core only what ``imago`` exports.

The in-repo plugins are the proof that the public API suffices for a plugin, so their
sources (``plugins/*/src``) may use ``imago`` only through names in ``imago.__all__``, and
the public modules it lists (``imago.runtime``, ``imago.io_buffers``) only through names in
their own ``__all__``. Never a ``_private`` name, never another submodule.
"""

from __future__ import annotations

import ast
import textwrap
import types
from pathlib import Path

import pytest

import imago

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SOURCES = sorted(ROOT.glob("plugins/*/src/**/*.py"))


def public_modules() -> dict[str, types.ModuleType]:
    """``imago`` and the modules ``imago.__all__`` lists, by dotted name."""
    modules = {"imago": imago}
    for name in imago.__all__:
        value = getattr(imago, name)
        if isinstance(value, types.ModuleType):
            modules[f"imago.{name}"] = value
    return modules


def exported(module: types.ModuleType) -> set[str]:
    return {name for name in getattr(module, "__all__", ()) if not name.startswith("_")}


def dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; ``None`` for anything but names and attributes."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def is_core(module: str) -> bool:
    return module == "imago" or module.startswith("imago.")


def api_violations(source: str, filename: str = "<source>") -> list[str]:
    """Every use of the core in *source* that is not part of the public API, one message each.

    Checks ``import imago...`` and ``from imago... import ...`` statements (also under
    ``TYPE_CHECKING``) and attribute access through the names they bind (``imago.cache``).
    """
    modules = public_modules()
    bound: dict[str, str] = {}  # local name -> the public module it refers to
    problems: list[str] = []

    def report(node: ast.AST, message: str) -> None:
        problem = f"{filename}:{getattr(node, 'lineno', 0)}: {message}"
        if problem not in problems:
            problems.append(problem)

    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not is_core(alias.name):
                    continue
                if alias.name not in modules:
                    report(node, f"'import {alias.name}': {alias.name} is not a public module")
                elif alias.asname:
                    bound[alias.asname] = alias.name
                else:  # `import imago.runtime` binds `imago`
                    bound["imago"] = "imago"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and is_core(node.module):
            if node.module not in modules:
                names = ", ".join(alias.name for alias in node.names)
                report(node, f"'from {node.module} import {names}': {node.module} is not a public module")
                continue
            allowed = exported(modules[node.module])
            for alias in node.names:
                if alias.name == "*":
                    continue  # a star import binds only what __all__ lists
                if alias.name not in allowed:
                    report(node, f"'from {node.module} import {alias.name}': not in {node.module}.__all__")
                elif f"{node.module}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    # Second pass, now that every binding is known: attribute access through bound modules.
    for node in ast.walk(tree):
        parts = dotted(node) if isinstance(node, ast.Attribute) else None
        if not parts or parts[0] not in bound:
            continue
        module = bound[parts[0]]
        for attr in parts[1:]:
            if attr not in exported(modules[module]):
                report(node, f"'{module}.{attr}': not in {module}.__all__")
                break
            if f"{module}.{attr}" not in modules:
                break  # a class or function: its own attributes are its business
            module = f"{module}.{attr}"
    return problems


# --- the checker itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(
            "from imago.cache import MetadataCache", "imago.cache is not a public module", id="private-module"
        ),
        pytest.param(
            "from imago.format.mapping import ShallowRaw",
            "imago.format.mapping is not a public module",
            id="deep-module",
        ),
        pytest.param("from imago import _private", "'from imago import _private': not in imago.__all__", id="private"),
        pytest.param("from imago import errors", "'from imago import errors': not in imago.__all__", id="submodule"),
        pytest.param("from imago import NotExported", "not in imago.__all__", id="unknown-name"),
        pytest.param("from imago.plugin.manager import reset", "imago.plugin.manager is not", id="plugin-manager"),
        pytest.param("from imago.runtime import _loop", "not in imago.runtime.__all__", id="private-in-public-module"),
        pytest.param("import imago.cache", "'import imago.cache': imago.cache is not a public module", id="import"),
        pytest.param("import imago.format.mapping as m", "imago.format.mapping is not a public module", id="import-as"),
        pytest.param("import imago\nimago.cache.MetadataCache", "'imago.cache': not in imago.__all__", id="attribute"),
        pytest.param("import imago as im\nim._plugins.reset()", "'imago._plugins': not in imago.__all__", id="alias"),
        pytest.param("import imago.runtime\nimago.runtime._helper()", "'imago.runtime._helper'", id="module-attribute"),
        pytest.param("from imago import runtime\nruntime._helper", "'imago.runtime._helper'", id="bound-module"),
        pytest.param(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from imago.storage import Storage",
            "imago.storage is not a public module",
            id="type-checking",
        ),
        pytest.param(
            "def f():\n    from imago.locks import RangeLock\n", "imago.locks is not a public module", id="nested"
        ),
    ],
)
def test_checker_finds_non_exported_core_names(source: str, expected: str) -> None:
    problems = api_violations(source, "plugin.py")
    assert len(problems) == 1, problems
    assert expected in problems[0]
    assert problems[0].startswith("plugin.py:")


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("from imago import Storage, hookimpl, MetadataCache, ShallowRaw", id="exported"),
        pytest.param("from imago import StorageRegistrar as SR", id="exported-as"),
        pytest.param("import imago\nimago.FormatDriver\nimago.Capability.RESIZE.name", id="attributes"),
        pytest.param("import imago.runtime\nimago.runtime.run_sync", id="public-module"),
        pytest.param("from imago.io_buffers import byte_view, zero_fill", id="from-public-module"),
        pytest.param("from imago import runtime\nruntime.run_blocking", id="bound-public-module"),
        pytest.param("from imago import *", id="star"),
        pytest.param("from . import driver\nfrom .header import Header\nfrom .cache import X", id="relative"),
        pytest.param("import imago_raw\nimport imagomore.cache\nfrom imago_qcow2.x import _y", id="other-packages"),
        pytest.param("x = imago.cache  # no import binds imago here", id="unbound"),
    ],
)
def test_checker_accepts_the_public_api(source: str) -> None:
    assert api_violations(source) == []


def test_checker_reports_each_use() -> None:
    source = textwrap.dedent(
        """
        import imago
        from imago.cache import MetadataCache
        from imago import Storage, _hidden

        imago.cache.MetadataCache
        """
    )
    problems = api_violations(source, "x.py")
    assert [problem.split(":")[1] for problem in problems] == ["3", "4", "6"]


# --- the real tree ---------------------------------------------------------------------------


def test_plugin_sources_are_found() -> None:
    found = {path.relative_to(ROOT).parts[1] for path in PLUGIN_SOURCES}
    assert {"file", "null", "raw", "qcow2"} <= found
    assert all(path.relative_to(ROOT).parts[0] == "plugins" for path in PLUGIN_SOURCES)


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=[str(p.relative_to(ROOT / "plugins")) for p in PLUGIN_SOURCES])
def test_plugin_uses_only_the_public_api(path: Path) -> None:
    problems = api_violations(path.read_text(), str(path.relative_to(ROOT)))
    assert problems == [], "\n".join(problems)
