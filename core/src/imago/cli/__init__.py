"""The ``imago`` command line tool.

Subcommands come from the core (``plugins``, ``check``) and from plugins through the
``imago_register_cli_commands`` hook. An :class:`~imago.ImagoError` is printed as one line
(``imago: <message>``) with exit status 1, never as a traceback. Usage errors exit with argparse's
status 2, except for the qemu-img subcommands (``check``), which report them as qemu-img does: one
line, status 1 (status 2 means "corruptions found" there).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar, overload

from ..errors import ImagoError, PluginLoadError
from ..plugin import manager as _plugins
from .check import configure_check, run_check
from .plugins import configure_plugins, run_plugins

__all__ = ["build_parser", "main"]

_N = TypeVar("_N")


class _UsageError(ImagoError):
    """A bad command line of a subcommand that reports it as one line (qemu-img's way)."""


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: argparse's, or with :attr:`one_line_usage_errors` qemu-img's way."""

    #: Usage errors (unknown or missing arguments, bad values) raise :class:`_UsageError`, which
    #: :func:`main` prints as one line with status 1, instead of argparse's usage and status 2.
    one_line_usage_errors = False

    @overload
    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: None = None
    ) -> tuple[argparse.Namespace, list[str]]: ...
    @overload
    def parse_known_args(self, args: Iterable[str] | None, namespace: _N) -> tuple[_N, list[str]]: ...
    @overload
    def parse_known_args(self, *, namespace: _N) -> tuple[_N, list[str]]: ...
    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        """argparse's, and with :attr:`one_line_usage_errors` unknown arguments are an error here."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.one_line_usage_errors:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        if self.one_line_usage_errors:
            raise _UsageError(f"{self.prog}: {message}")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand, core and plugin ones."""
    parser = argparse.ArgumentParser(prog="imago", description="Virtual-machine disk image tool.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_SubcommandParser)
    plugins_parser = commands.add_parser("plugins", help="list installed plugins, their drivers and load errors")
    configure_plugins(plugins_parser)
    plugins_parser.set_defaults(run=run_plugins)
    check_parser = commands.add_parser(
        "check", help="check an image for errors, optionally repair them (qemu-img check)"
    )
    check_parser.one_line_usage_errors = True
    configure_check(check_parser)
    check_parser.set_defaults(run=run_check)
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
    except _UsageError as error:
        print(error, file=sys.stderr)
        return 1
    except ImagoError as error:
        print(f"imago: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
