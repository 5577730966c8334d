"""The pluggy hook specifications: the whole contract an imago plugin implements.

A plugin is a module (or object) named by an entry point in the group ``imago``; it
implements some of these hooks, marked with :data:`hookimpl`. Hooks only register classes;
they are called once, lazily, the first time a driver is looked up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    from ..format.driver import FormatDriver
    from ..storage import Storage

__all__ = ["PROJECT_NAME", "CliConfigure", "CliRun", "hookimpl", "hookspec"]

#: Adds a subcommand's arguments to its parser.
CliConfigure = Callable[["argparse.ArgumentParser"], None]
#: Runs a subcommand; returns the exit status (``None`` meaning 0).
CliRun = Callable[["argparse.Namespace"], Any]

#: The pluggy project name, and the entry-point group plugins are found under.
PROJECT_NAME = "imago"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorator marking a plugin's hook implementations.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def imago_register_storage_drivers(register: Callable[[type[Storage]], None]) -> None:
    """Register storage driver classes: call ``register(cls)`` for each.

    ``cls`` must subclass :class:`imago.Storage` and set a non-empty ``name``; a name
    registered twice is an error.
    """


@hookspec
def imago_register_format_drivers(register: Callable[[type[FormatDriver]], None]) -> None:
    """Register format driver classes: call ``register(cls)`` for each.

    ``cls`` must subclass :class:`imago.FormatDriver` and set a non-empty ``name``.
    """


@hookspec
def imago_register_cli_commands(register: Callable[[str, str, CliConfigure, CliRun], None]) -> None:
    """Register subcommands of the ``imago`` command line tool.

    Call ``register(name, help, configure, run)``: *configure* adds arguments to the
    subcommand's parser, *run* executes it with the parsed arguments and returns the exit
    status (``None`` meaning 0).
    """
