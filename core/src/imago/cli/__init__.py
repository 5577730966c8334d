"""The ``imago`` command line tool.

The core's subcommands are qemu-img's (``info``, ``create``, ``convert``, ``check``, ...; each in
the module ``imago.cli.<name>`` with ``configure(parser)`` and ``run(args)``) plus ``plugins``;
plugins add more through the ``imago_register_cli_commands`` hook. Only the subcommand that runs
is imported and configured, so the command starts fast; plugins are loaded only when a
subcommand needs a driver, or when the command is not one of the core's.

Errors are one line on stderr (``imago: <message>``) and a non-zero status, never a traceback
(``--debug``, anywhere on the command line, shows it). Usage errors of the qemu-img subcommands
are one line with status 1, as qemu-img reports them; ``plugins`` uses argparse's usage message
and status 2. Ctrl-C during a long operation stops it cleanly with status 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar, overload

from ..errors import ImagoError, PluginLoadError
from .common import CliError, OperationInterrupted, describe_error

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


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, as wide as the terminal like argparse's own, without importing :mod:`shutil`.

    argparse sizes its formatter with :func:`shutil.get_terminal_size`, and makes one for every
    argument added: importing :mod:`shutil` (and the compression modules it imports) would cost
    every command, not only ``--help``, a noticeable part of its start-up time.
    """

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, _terminal_columns() - 2 if width is None else width)


def _terminal_columns() -> int:
    """The terminal's width as :func:`shutil.get_terminal_size` reports it: ``$COLUMNS``, the terminal, or 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


#: The core's subcommands: name -> (help, qemu-img style usage errors). The module
#: ``imago.cli.<name>`` holds ``configure`` and ``run``.
COMMANDS: dict[str, tuple[str, bool]] = {
    "amend": ("change format-specific options of an image (qemu-img amend)", True),
    "bench": ("run a simple I/O benchmark on an image (qemu-img bench)", True),
    "check": ("check an image for errors, optionally repair them (qemu-img check)", True),
    "commit": ("write an overlay's data into its backing file (qemu-img commit)", True),
    "compare": ("compare the guest-visible content of two images (qemu-img compare)", True),
    "convert": ("copy images into a new image of any format (qemu-img convert)", True),
    "create": ("create a new image (qemu-img create)", True),
    "dd": ("copy part of an image, dd style (qemu-img dd)", True),
    "info": ("show facts about an image and its backing chain (qemu-img info)", True),
    "map": ("show where an image's data lives (qemu-img map)", True),
    "measure": ("compute the file size a new image needs (qemu-img measure)", True),
    "plugins": ("list installed plugins, their drivers and load errors", False),
    "rebase": ("change an image's backing file (qemu-img rebase)", True),
    "resize": ("change an image's virtual size (qemu-img resize)", True),
    "snapshot": ("list, create, apply or delete internal snapshots (qemu-img snapshot)", True),
}


def build_parser(only: str | None = None, *, alone: bool = False) -> argparse.ArgumentParser:
    """The argument parser with every subcommand, core and plugin ones.

    Only the core subcommand *only* is configured: the others are listed for ``--help`` but their
    modules are not imported. When *only* is not a core subcommand (or ``None``), the plugins'
    subcommands are loaded and configured. With *alone*, a core subcommand *only* is the parser's
    one subcommand: what parsing its command line needs (making the others' parsers costs a
    command a noticeable part of its start-up time, gettext looking up translations for each).
    """
    parser = argparse.ArgumentParser(
        prog="imago",
        formatter_class=_HelpFormatter,
        description="Virtual-machine disk image tool: qemu-img's subcommands, options and output. "
        "Add --debug anywhere to see the traceback of an error.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_SubcommandParser)
    for name, (help_text, qemu_style) in COMMANDS.items():
        if alone and only in COMMANDS and name != only:
            continue
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        sub.one_line_usage_errors = qemu_style
        if only == name:
            module = importlib.import_module(f"{__name__}.{name}")
            module.configure(sub)
            sub.set_defaults(run=module.run)
    if only in COMMANDS:
        return parser
    from ..plugin import manager as _plugins

    for command in _plugins.cli_commands().values():
        if command.name in COMMANDS:
            continue
        sub = commands.add_parser(command.name, help=command.help, formatter_class=_HelpFormatter)
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
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = _take_debug(arguments)
    try:
        command = next((a for a in arguments if not a.startswith("-")), None)
        # Options before the subcommand (--help, or a mistake) are the top-level parser's: its help
        # and usage errors show every subcommand. Otherwise the subcommand's parser is all it takes.
        alone = command is not None and not arguments[: arguments.index(command)]
        parser = build_parser(command, alone=alone)
        args = parser.parse_args(arguments)
        status = args.run(args)
    except _UsageError as error:
        print(error, file=sys.stderr)
        return 1
    except OperationInterrupted:
        print("imago: interrupted: the images were closed consistently", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("imago: interrupted", file=sys.stderr)
        return 130
    except (ImagoError, OSError) as error:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"imago: {describe_error(error)}", file=sys.stderr)
        return error.status if isinstance(error, CliError) else 1
    except BrokenPipeError:
        return 1
    return int(status or 0)


def _take_debug(arguments: list[str]) -> bool:
    """Remove ``--debug`` from the arguments before a ``--``; whether it was there."""
    end = arguments.index("--") if "--" in arguments else len(arguments)
    found = "--debug" in arguments[:end]
    if found:
        arguments[:end] = [a for a in arguments[:end] if a != "--debug"]
    return found


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
