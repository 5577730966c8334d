"""The ``imago`` command line tool.

Subcommands come from the core (``plugins``) and from plugins through the
``imago_register_cli_commands`` hook. An :class:`~imago.ImagoError` is printed as one line
(``imago: <message>``) with exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..errors import ImagoError, PluginLoadError
from ..plugin import manager as _plugins
from .plugins import configure_plugins, run_plugins

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand, core and plugin ones."""
    parser = argparse.ArgumentParser(prog="imago", description="Virtual-machine disk image tool.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    plugins_parser = commands.add_parser("plugins", help="list installed plugins, their drivers and load errors")
    configure_plugins(plugins_parser)
    plugins_parser.set_defaults(run=run_plugins)
    for command in _plugins.cli_commands().values():
        sub = commands.add_parser(command.name, help=command.help)
        try:
            command.configure(sub)
        except Exception as error:
            sub.set_defaults(run=_broken(command.name, command.plugin, error))
        else:
            sub.set_defaults(run=command.run)
    return parser


def _broken(command: str, plugin: str, error: Exception) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        raise PluginLoadError(plugin, None, f"command {command!r} could not be set up: {type(error).__name__}: {error}")

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``imago`` command; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        status = args.run(args)
    except ImagoError as error:
        print(f"imago: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
