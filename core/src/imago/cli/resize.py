"""``imago resize``: ``qemu-img resize`` for every format whose driver claims :attr:`Capability.RESIZE`.

``imago resize [-f FMT] [--shrink] [--preallocation=MODE] [-q] FILE [+|-]SIZE``: the size is
the last argument, taken before the options are parsed (as qemu-img does), so that ``-1G``
is a size and not an option. Built on the public API only: ``imago.open(write=True)`` and
:meth:`SyncFormatAccess.resize`. Messages and exit statuses are qemu-img 7.2's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..api import open as open_image
from ..errors import ImagoError
from ..format.capabilities import Capability
from .common import CliError, add_format, add_gate_options, describe_error, gate_for, parse_size, warn

__all__ = ["PREALLOCATION_MODES", "configure", "new_size", "run"]

#: ``--preallocation`` values, qemu's names.
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago resize``, qemu-img's."""
    parser.usage = "%(prog)s [-f FMT] [--shrink] [--preallocation=MODE] [-q] FILE [+|-]SIZE"
    parser.epilog = (
        "SIZE (the last argument) is the new virtual size, or with + or - the change; suffixes k, M, G, T, P, E "
        "(powers of 1024). Shrinking deletes the data past the new end: it needs --shrink."
    )
    add_format(parser)
    parser.add_argument(
        "--shrink", action="store_true", help="allow a smaller size (the data past the new end is deleted)"
    )
    parser.add_argument(
        "--preallocation",
        default="off",
        metavar="MODE",
        help=f"how the new space is prepared when growing: {', '.join(PREALLOCATION_MODES)} (default: off)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    add_gate_options(parser)
    parser.add_argument("filename", metavar="FILE", help="the image file")
    _take_size_last(parser)


def _take_size_last(parser: argparse.ArgumentParser) -> None:
    """Make *parser* take the last argument as the size before parsing the others (qemu-img's way)."""
    parse = parser.parse_known_args

    def parse_known_args(args: Sequence[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        if any(arg in ("-h", "--help") for arg in argv):
            return parse(argv, namespace)
        if len(argv) < 2:
            parser.error("Not enough arguments")
        parsed, extras = parse(argv[:-1], namespace)
        parsed.size = argv[-1]
        return parsed, extras

    setattr(parser, "parse_known_args", parse_known_args)  # noqa: B010 - an instance's own parse


def new_size(text: str, current: int) -> int:
    """The new size from ``[+|-]SIZE`` and the *current* one; raises :class:`CliError` if it is not positive."""
    sign = text[:1] if text[:1] in ("+", "-") else ""
    size = parse_size(text[len(sign) :], what="image size")
    total = current + size if sign == "+" else current - size if sign == "-" else size
    if total <= 0:
        raise CliError("New image size must be positive")
    return total


def run(args: argparse.Namespace) -> int:
    """Resize one image; 0 on success, 1 on any error (qemu-img's statuses)."""
    filename: str = args.filename
    prealloc: str = args.preallocation
    if prealloc not in PREALLOCATION_MODES:
        raise CliError(f"Invalid preallocation mode '{prealloc}'")
    text: str = args.size
    # The size's syntax is checked before the image is opened, as qemu-img does.
    parse_size(text[1:] if text[:1] in ("+", "-") else text, what="image size")
    try:
        disk = open_image(filename, args.format, write=True, gate=gate_for(args, [filename]))
    except (ImagoError, OSError) as error:
        raise CliError(f"Could not open '{filename}': {describe_error(error)}") from None
    with disk:
        total = new_size(text, disk.size)
        if total <= disk.size and prealloc != "off":
            raise CliError("Preallocation can only be used for growing images")
        if total < disk.size and not args.shrink:
            print("imago: Use the --shrink option to perform a shrink operation.", file=sys.stderr)
            warn(
                "Shrinking an image will delete all data beyond the shrunken image's end. Before performing "
                "such an operation, make sure there is no important data there."
            )
            return 1
        if not disk.driver.supports(Capability.RESIZE):
            raise CliError("Image format driver does not support resize")
        disk.resize(total, prealloc, shrink=args.shrink)
    if not args.quiet:
        print("Image resized.")
    return 0
