"""What the qemu-img-like subcommands share: sizes, ``-o`` lists, formats, cache modes, gates, errors.

Every subcommand module (``imago.cli.<name>``) defines ``configure(parser)`` and ``run(args)``
and builds on the public API only; these helpers keep their options spelled and checked the way
qemu-img 7.2 spells and checks them. A :class:`CliError` is the one way a subcommand reports a
failure: ``imago.cli.main`` prints it as one line (``imago: <message>``) and exits with its
status.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

from ..errors import ImagoError, ImplicitOpenDeniedError
from ..storage import uri_scheme

if TYPE_CHECKING:  # the gates (and the plugin manager behind them) are imported when a gate is made
    from ..format.gates import ImplicitOpenGate

__all__ = [
    "CACHE_MODES",
    "CliError",
    "OperationInterrupted",
    "add_cache",
    "add_force_share",
    "add_format",
    "add_gate_options",
    "add_options",
    "add_output",
    "cache_flags",
    "check_interrupt",
    "describe_error",
    "gate_for",
    "interruptible",
    "parse_options",
    "parse_size",
]


class CliError(ImagoError):
    """A subcommand failed: one line for stderr and the exit status (qemu-img's: mostly 1)."""

    def __init__(self, message: str, status: int = 1) -> None:
        self.status = status
        super().__init__(message)


class OperationInterrupted(ImagoError):  # noqa: N818 - the name says what happened
    """Ctrl-C (SIGINT) stopped a long operation at a point where every image is consistent."""

    def __init__(self) -> None:
        super().__init__("interrupted")


# --- sizes ----------------------------------------------------------------------------------

_SIZE = re.compile(r"\s*(?P<number>0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?)(?P<suffix>[bBkKmMgGtTpPeE]?)\Z")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
#: The largest size qemu accepts (sizes are int64 in QEMU).
MAX_SIZE = (1 << 63) - 1


def parse_size(text: str, *, what: str = "size") -> int:
    """A size in bytes from qemu's syntax: ``1G``, ``512k``, ``1.5M``, ``0x1000``, ``4096``.

    Suffixes (case-insensitive, powers of 1024): B, K, M, G, T, P, E; a fraction needs a
    suffix other than B, as in qemu; a fraction finer than a byte is dropped. Raises
    :class:`CliError` naming *what* (qemu-img's wording: "Invalid image size specified") otherwise.
    """
    match = _SIZE.match(text)
    if match is None:
        raise CliError(
            f"Invalid {what} specified: {text!r}. You may use k, M, G, T, P or E suffixes for "
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
    number, suffix = match["number"], match["suffix"].lower()
    unit = _UNITS[suffix]
    if number[:2].lower() == "0x":
        value = int(number, 16) * unit
    elif "." in number:
        if unit == 1:
            raise CliError(f"Invalid {what} specified: {text!r}. A fraction needs a k, M, G, T, P or E suffix.")
        whole, _, fraction = number.partition(".")
        value = int(whole or "0") * unit + (int(fraction or "0") * unit) // 10 ** len(fraction)
    else:
        value = int(number) * unit
    if value > MAX_SIZE:
        raise CliError(f"Invalid {what} specified: {text!r}. Must be between 0 and {MAX_SIZE}.")
    return value


# --- -o key=value lists ------------------------------------------------------------------------


def parse_options(texts: Iterable[str]) -> dict[str, str]:
    """Parse qemu's ``-o`` lists (several ``-o`` join as one): ``key=value,key2=value2`` in order.

    ``,,`` is a literal comma inside a value; a key alone means ``key=on``. A key given twice
    keeps the last value, as in qemu. Raises :class:`CliError` for an empty key.
    """
    options: dict[str, str] = {}
    for text in texts:
        for item in _split_commas(text):
            if item == "":
                continue
            key, sep, value = item.partition("=")
            if not key:
                raise CliError(f"Invalid option list {text!r}: an option has no name")
            options[key] = value if sep else "on"
    return options


def _split_commas(text: str) -> Iterator[str]:
    item: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text[i + 1 : i + 2] == ",":
                item.append(",")
                i += 2
                continue
            yield "".join(item)
            item = []
        else:
            item.append(char)
        i += 1
    yield "".join(item)


def wants_help(texts: Iterable[str]) -> bool:
    """Whether an ``-o`` list asks for the option list (``-o help`` or ``-o ?``)."""
    return any(key in ("help", "?") for key in parse_options(texts))


# --- options every subcommand spells the same ------------------------------------------------


def add_format(
    parser: argparse.ArgumentParser, flag: str = "-f", dest: str = "format", what: str = "the image"
) -> None:
    """``-f FMT``: the format of *what* (default: probed, which is unsafe for untrusted images)."""
    parser.add_argument(flag, dest=dest, metavar="FMT", help=f"format of {what} (default: probe it)")


def add_output(parser: argparse.ArgumentParser) -> None:
    """``--output=human|json``."""
    parser.add_argument("--output", default="human", metavar="human|json", help="output format (default: human)")


def check_output(args: argparse.Namespace) -> str:
    """The ``--output`` value, checked as qemu-img checks it."""
    output: str = args.output
    if output not in ("human", "json"):
        raise CliError("--output must be used with human or json as argument.")
    return output


def add_options(parser: argparse.ArgumentParser, what: str = "format options") -> None:
    """``-o k=v,...`` (repeatable; ``-o help`` lists them)."""
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help=f"{what} as key=value,... ('-o help' lists them)",
    )


def add_force_share(parser: argparse.ArgumentParser) -> None:
    """``-U``: open read-only without locks that would stop a writer."""
    parser.add_argument(
        "-U",
        "--force-share",
        dest="force_share",
        action="store_true",
        help="open images read-only without taking locks that would stop a writer (may read inconsistent data)",
    )


#: qemu's cache modes: (O_DIRECT, flushes ignored).
CACHE_MODES: dict[str, tuple[bool, bool]] = {
    "writeback": (False, False),
    "writethrough": (False, False),
    "none": (True, False),
    "directsync": (True, False),
    "unsafe": (False, True),
}


def add_cache(
    parser: argparse.ArgumentParser, flag: str = "-t", dest: str = "cache", default: str = "writeback"
) -> None:
    """``-t CACHE`` (or ``-T``): one of :data:`CACHE_MODES`."""
    parser.add_argument(
        flag,
        dest=dest,
        default=default,
        metavar="CACHE",
        help=f"cache mode: {', '.join(CACHE_MODES)} (default: {default}); none and directsync use O_DIRECT, "
        "unsafe ignores flushes",
    )


def cache_flags(mode: str, *, option: str = "cache") -> tuple[bool, bool]:
    """``(direct, no_flush)`` for a cache mode, for ``imago.open(direct=..., no_flush=...)``."""
    try:
        return CACHE_MODES[mode]
    except KeyError:
        raise CliError(f"Invalid {option} option: {mode}") from None


# --- gates -------------------------------------------------------------------------------------


def add_gate_options(parser: argparse.ArgumentParser) -> None:
    """``--allow-dir DIR`` and ``--allow-any``: which files images may make imago open."""
    group = parser.add_argument_group(
        "implicit opens",
        "Files an image names (backing files, data files) are opened only inside the directories of "
        "the images named on the command line (a source's in the sources' directories, a target's in the "
        "target's), unless allowed here.",
    )
    group.add_argument(
        "--allow-dir",
        dest="allow_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="also let images open files in DIR (repeatable)",
    )
    group.add_argument(
        "--allow-any",
        dest="allow_any",
        action="store_true",
        help="let images open any file they name (trusted images only)",
    )


def shown_name(given: str, own: str | None, full: str) -> str:
    """How qemu-img names a file *full* of an image opened as *given* whose own file is *own*.

    QEMU builds such names from the name the user gave: a file beside the image is shown in the
    given name's directory, any other by its full name.
    """
    if own is not None and full == own:
        return given
    if own is not None and os.path.dirname(full) == os.path.dirname(own):
        return os.path.join(os.path.dirname(given), os.path.basename(full))
    return full


def gate_for(args: argparse.Namespace, images: Iterable[str | os.PathLike[str]]) -> ImplicitOpenGate:
    """The gate for implicit opens: the images' directories plus ``--allow-dir``, or anything."""
    from ..format.gates import DenyImplicitOpenGate, PermissiveImplicitOpenGate, SandboxImplicitOpenGate

    if getattr(args, "allow_any", False):
        return PermissiveImplicitOpenGate()
    # A URI (nbd+unix:///...) has no directory of its own to allow.
    names = [os.fspath(image) for image in images]
    directories = {os.path.dirname(os.path.realpath(name)) or "." for name in names if uri_scheme(name) is None}
    directories.update(os.path.realpath(directory) for directory in getattr(args, "allow_dirs", ()))
    if not directories:  # only URIs, and no --allow-dir: nothing to open
        return DenyImplicitOpenGate()
    return SandboxImplicitOpenGate(sorted(directories))


# --- errors and interrupts ---------------------------------------------------------------------


def describe_error(error: BaseException) -> str:
    """One line for *error*: the file and the problem, with the option that allows a refused open."""
    if isinstance(error, ImplicitOpenDeniedError) and error.allowable:
        return f"{error} (allow it with --allow-dir DIR or --allow-any)"
    if isinstance(error, OSError) and not isinstance(error, ImagoError) and error.strerror:
        if error.filename is not None:
            return f"{os.fsdecode(error.filename)}: {error.strerror}"
        return error.strerror
    return str(error)


_interrupted = False


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn the first Ctrl-C into a flag that :func:`check_interrupt` raises at a safe point.

    Long operations call :func:`check_interrupt` between requests, so images are closed (and
    flushed) consistently. A second Ctrl-C interrupts at once, as Python normally does.
    """
    global _interrupted
    import signal  # only the long operations that use this need it

    def first(_signum: int, _frame: FrameType | None) -> None:
        global _interrupted
        _interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = signal.signal(signal.SIGINT, first)
    except ValueError:  # not the main thread: no signal handling to change
        yield
        return
    _interrupted = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted = False


def check_interrupt() -> None:
    """Raise :class:`OperationInterrupted` if Ctrl-C was pressed inside :func:`interruptible`."""
    if _interrupted:
        raise OperationInterrupted()


def warn(message: str) -> None:
    """A warning line on stderr, qemu-img style."""
    print(f"imago: warning: {message}", file=sys.stderr)
