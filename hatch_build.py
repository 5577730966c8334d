"""Metadata hook of the workspace root: its dependencies are the distributions in this tree.

The directories are the one list of in-repo distributions: ``core`` and every directory
``plugins/<name>`` holding a ``pyproject.toml``. Installing the root installs each of them
(``<its project name> @ file://<its directory>``); the Makefile, pytest, ruff and mypy find
them by the same globs, so adding a plugin means adding its directory and nothing else.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from hatchling.metadata.plugin.interface import MetadataHookInterface

__all__ = [
    "CORE_DIRECTORY",
    "PLUGIN_PROJECTS",
    "WorkspaceDependencies",
    "distribution_directories",
    "project_name",
    "workspace_dependencies",
]

#: The core's directory, relative to the workspace root.
CORE_DIRECTORY = "core"
#: Where plugin distributions live: each matching ``pyproject.toml`` is one.
PLUGIN_PROJECTS = "plugins/*/pyproject.toml"


def distribution_directories(root: Path) -> list[Path]:
    """The in-repo distributions' directories: the core first, then the plugins by name."""
    return [root / CORE_DIRECTORY, *sorted(project.parent for project in root.glob(PLUGIN_PROJECTS))]


def project_name(directory: Path) -> str:
    """The distribution name declared in *directory*'s ``pyproject.toml``."""
    with (directory / "pyproject.toml").open("rb") as file:
        name = tomllib.load(file)["project"]["name"]
    if not isinstance(name, str):
        raise TypeError(f"{directory / 'pyproject.toml'}: project.name must be a string, got {name!r}")
    return name


def workspace_dependencies(root: Path) -> list[str]:
    """One direct reference per in-repo distribution, as the root distribution depends on them."""
    root = root.resolve()
    return [f"{project_name(directory)} @ {directory.as_uri()}" for directory in distribution_directories(root)]


class WorkspaceDependencies(MetadataHookInterface):
    """Fills the root's dynamic ``dependencies`` from the directory listing."""

    def update(self, metadata: dict[str, Any]) -> None:
        """Set ``dependencies`` (declared dynamic in the root ``pyproject.toml``)."""
        metadata["dependencies"] = workspace_dependencies(Path(self.root))
