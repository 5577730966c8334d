"""Fixtures shared by the cross-distribution tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

import imago
import imago.plugin.manager


@pytest.fixture
def register_plugin() -> Iterator[Callable[[str, object], None]]:
    """``register_plugin(name, obj)``: add a plugin in-process for one test.

    Every plugin added is unregistered afterwards and the registry is reset, so other tests
    see the normal registry (the installed entry points only).
    """
    names: list[str] = []

    def register(name: str, plugin: object) -> None:
        names.append(name)
        imago.register_plugin(name, plugin)

    yield register
    for name in names:
        imago.unregister_plugin(name)
    imago.plugin.manager.reset()


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """Rebuild the plugin registry before and after the test (for tests that change ``sys.path``)."""
    imago.plugin.manager.reset()
    yield
    imago.plugin.manager.reset()


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_python(args, pythonpath=[...])``: run this venv's Python in a subprocess.

    *pythonpath* entries are put first on ``PYTHONPATH``; output is captured as text.
    """

    def run(
        args: Sequence[str], *, pythonpath: Sequence[str | os.PathLike[str]] = (), check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        extra = [os.fspath(p) for p in pythonpath]
        if env.get("PYTHONPATH"):
            extra.append(env["PYTHONPATH"])
        if extra:
            env["PYTHONPATH"] = os.pathsep.join(extra)
        else:
            env.pop("PYTHONPATH", None)
        return subprocess.run(
            [sys.executable, *args], env=env, capture_output=True, text=True, check=check, timeout=300
        )

    return run


@pytest.fixture
def venv_bin() -> Path:
    """The directory holding this venv's Python and console scripts."""
    return Path(sys.executable).parent
