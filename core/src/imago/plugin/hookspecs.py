"""The pluggy hook specifications: the whole contract an imago plugin implements.

A plugin is a module (or object) named by an entry point in the group ``imago``; it
implements some of these hooks, marked with :data:`hookimpl`. Hooks only register classes;
they are called lazily: for a driver looked up by name, only the plugins of the distributions
declaring it (below); for any listing, every plugin. Each receives a typed
registrar (:mod:`imago.plugin.registrars`) as its ``register`` argument, valid only while
the hook runs.

A marked function whose name matches no specification here (a misspelled hook) makes the
plugin fail to load, and so does a function named like a hook but not marked.

A distribution can also declare the drivers its plugin provides, in the entry-point groups
``imago.storage_drivers`` and ``imago.format_drivers`` (driver name = ``module:Class``).
imago never loads those entry points: they let a look-up by name load only the declaring
distribution's plugin, and when a driver is missing, they let the error name the distribution
that should provide it, even when its plugin failed to load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .registrars import CliRegistrar, FormatRegistrar, StorageRegistrar

__all__ = [
    "FORMAT_DRIVERS_GROUP",
    "PROJECT_NAME",
    "STORAGE_DRIVERS_GROUP",
    "hookimpl",
    "hookspec",
    "imago_register_cli_commands",
    "imago_register_format_drivers",
    "imago_register_storage_drivers",
]

#: The pluggy project name, and the entry-point group plugins are found under.
PROJECT_NAME = "imago"
#: Entry-point group in which a distribution declares its storage drivers (name = class).
STORAGE_DRIVERS_GROUP = "imago.storage_drivers"
#: Entry-point group in which a distribution declares its format drivers (name = class).
FORMAT_DRIVERS_GROUP = "imago.format_drivers"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorator marking a plugin's hook implementations.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def imago_register_storage_drivers(register: StorageRegistrar) -> None:
    """Register storage driver classes: ``register(cls)`` (or ``register.register(cls)``) for each.

    ``cls`` must subclass :class:`imago.Storage` and set a non-empty ``name``; a name
    registered twice, by this plugin or another, is an error.
    """


@hookspec
def imago_register_format_drivers(register: FormatRegistrar) -> None:
    """Register format driver classes: ``register(cls)`` (or ``register.register(cls)``) for each.

    ``cls`` must subclass :class:`imago.FormatDriver`, set a non-empty ``name`` (unique, as
    for storage drivers) and implement every capability listed in its ``capabilities``.
    """


@hookspec
def imago_register_cli_commands(register: CliRegistrar) -> None:
    """Register subcommands of the ``imago`` command line tool.

    Call ``register.command(name=..., help=..., configure=..., run=...)`` (or
    ``register(name, help, configure, run)``): *configure* adds arguments to the subcommand's
    parser, *run* executes it with the parsed arguments and returns the exit status (``None``
    meaning 0).
    """
