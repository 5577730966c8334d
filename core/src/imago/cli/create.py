"""``imago create``: ``qemu-img create`` for every format driver.

Built on :func:`imago.create` (which checks every option and the backing file before the target
is touched). The command line's ``-o`` texts become typed values through the driver's declared
options (:attr:`FormatCreateBuilder.options`), which also give ``-o help`` its table; the
``Formatting ...`` line is qemu-img's, with the same values in the same order.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from typing import Any

from ..api import create as create_image
from ..errors import DriverNotFoundError, ImagoError, ImplicitOpenDeniedError
from ..format.access import SyncFormatAccess
from ..format.builder import FormatCreateBuilder
from ..format.driver import FormatDriver
from ..format.gates import ImplicitOpenGate
from ..plugin.manager import format_driver
from .common import (
    CliError,
    add_gate_options,
    add_options,
    describe_error,
    gate_for,
    parse_options,
    parse_size,
    wants_help,
)

__all__ = [
    "configure",
    "convert_options",
    "driver_for",
    "format_option_help",
    "formatting_line",
    "parse_image_size",
    "run",
]

_TYPE_NAMES = {"size": "size", "int": "num", "bool": "bool (on/off)", "str": "str"}
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago create`` (qemu-img's: ``-f``, ``-o``, ``-b``, ``-F``, ``-u``, ``-q``)."""
    parser.add_argument(
        "-f", dest="format", default="raw", metavar="FMT", help="format of the new image (default: raw)"
    )
    add_options(parser, "creation options")
    parser.add_argument("-b", dest="backing", metavar="BACKING", help="backing file the new image refers to")
    parser.add_argument("-F", dest="backing_format", metavar="BACKING_FMT", help="format of the backing file")
    parser.add_argument(
        "-u", dest="unsafe", action="store_true", help="do not open the backing file (it need not exist; give SIZE)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print the 'Formatting' line")
    add_gate_options(parser)
    parser.add_argument("filename", metavar="FILE", nargs="?", help="the image file to create (replaced if it exists)")
    parser.add_argument("size", metavar="SIZE", nargs="?", help="virtual size, with k, M, G, T, P or E suffixes")


def run(args: argparse.Namespace) -> int:
    """Create the image; 0 on success, 1 on errors (one line on stderr)."""
    filename: str | None = args.filename
    builder_class = driver_for(args.format, filename).create_builder_class
    if wants_help(args.options):
        sys.stdout.write(format_option_help(builder_class, args.format, with_file=filename is not None))
        return 0
    if filename is None:
        raise CliError("Expecting image file name")
    size = None if args.size is None else parse_image_size(args.size)
    texts = parse_options(args.options)
    if args.backing is not None:
        texts["backing_file"] = args.backing
    if args.backing_format is not None:
        texts["backing_fmt"] = args.backing_format
    options = convert_options(builder_class, texts, filename)
    size_option = options.pop("size", None)
    if size is not None and size_option is not None:
        raise CliError(f"{filename}: The image size must be specified only once")
    if size_option is not None:
        size = int(size_option)
    texts.pop("size", None)
    backing = texts.get("backing_file")
    gate = gate_for(args, [filename])
    if backing is not None and "backing_fmt" not in texts:
        raise CliError(f"{filename}: Backing file specified without backing format")
    if size is None and (backing is None or args.unsafe):
        raise CliError(f"{filename}: Image creation needs a size parameter")
    if backing is not None and not args.unsafe:
        backing_size = _backing_size(filename, backing, texts["backing_fmt"], gate)
        size = backing_size if size is None else size
    assert size is not None
    if not args.quiet:
        print(formatting_line(builder_class, filename, args.format, size, texts), flush=True)
    try:
        create_image(filename, args.format, size, unsafe=args.unsafe, gate=gate, **options)
    except CliError:
        raise
    except ImagoError as error:
        raise CliError(f"{filename}: {error}") from None
    return 0


def driver_for(format_name: str, filename: str | None) -> type[FormatDriver]:
    """The driver of the format *format_name* (qemu-img's error when there is none)."""
    try:
        return format_driver(format_name)
    except DriverNotFoundError:
        prefix = f"{filename}: " if filename else ""
        raise CliError(f"{prefix}Unknown file format '{format_name}'") from None


def parse_image_size(text: str) -> int:
    """A SIZE argument, with qemu-img's messages for bad ones."""
    try:
        return parse_size(text)
    except CliError:
        if text.strip().isdigit():
            raise CliError("Invalid image size specified. Must be between 0 and 9223372036854775807.") from None
        raise CliError(
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, "
            "gigabytes, terabytes, petabytes and exabytes."
        ) from None


def _declared(builder_class: type[FormatCreateBuilder[Any]]) -> dict[str, FormatCreateBuilder.Option]:
    """The builder's options by name; options it accepts but does not declare are strings."""
    declared = {option.name: option for option in builder_class.options}
    accepted = {*builder_class.option_names, *builder_class.option_aliases}
    methods_declared = {builder_class.option_aliases.get(name, name) for name in declared}
    for name in sorted(accepted):
        if name not in declared and builder_class.option_aliases.get(name, name) not in methods_declared:
            declared[name] = FormatCreateBuilder.Option(name, "str", "")
    return declared


def convert_options(
    builder_class: type[FormatCreateBuilder[Any]],
    texts: dict[str, str],
    filename: str,
    allowed: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Typed values for the ``-o`` texts, per the builder's declared option types.

    Unknown names (or names outside *allowed*) raise :class:`CliError` listing the valid ones.
    """
    declared = _declared(builder_class)
    valid = sorted(declared if allowed is None else set(allowed))
    values: dict[str, Any] = {}
    for name, text in texts.items():
        option = declared.get(name)
        if option is None or name not in valid:
            raise CliError(f"{filename}: Invalid parameter '{name}' (valid options: {', '.join(valid)})")
        values[name] = _convert(option, text, filename)
    return values


def _convert(option: FormatCreateBuilder.Option, text: str, filename: str) -> Any:
    if option.kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise CliError(f"{filename}: Parameter '{option.name}' expects 'on' or 'off'")
    if option.kind == "size":
        try:
            return parse_size(text, what=option.name)
        except CliError:
            raise CliError(
                f"{filename}: Parameter '{option.name}' expects a non-negative number below 2^64 "
                "(optional suffix k, M, G, T, P or E)"
            ) from None
    if option.kind == "int":
        try:
            value = int(text, 16) if text[:2].lower() == "0x" else int(text, 10)
        except ValueError:
            raise CliError(f"{filename}: Parameter '{option.name}' expects a number") from None
        return value
    if option.choices and text not in option.choices:
        raise CliError(
            f"{filename}: Parameter '{option.name}' does not accept value '{text}' "
            f"(allowed: {', '.join(option.choices)})"
        )
    return text


def _shown(option: FormatCreateBuilder.Option, text: str) -> str:
    """A value as qemu-img prints it: numbers parsed, strings with commas doubled."""
    if option.kind in ("size", "int"):
        return str(int(_convert(option, text, "")))
    if option.kind == "str":
        return text.replace(",", ",,")
    return text


def formatting_line(
    builder_class: type[FormatCreateBuilder[Any]], filename: str, format_name: str, size: int, texts: dict[str, str]
) -> str:
    """``qemu-img create``'s ``Formatting 'FILE', fmt=FMT k=v ...`` line (defaults included)."""
    given = {**texts, "size": str(size)}
    parts = [f"Formatting '{filename}', fmt={format_name}"]
    declared = _declared(builder_class)
    for option in builder_class.options:
        text = given.pop(option.name, None)
        if text is None:
            text = option.default
        if text is not None:
            parts.append(f"{option.name}={_shown(option, text)}")
    parts.extend(f"{name}={_shown(declared[name], text)}" for name, text in given.items())
    return " ".join(parts)


def format_option_help(
    builder_class: type[FormatCreateBuilder[Any]],
    format_name: str,
    *,
    with_file: bool = False,
    names: Iterable[str] | None = None,
    title: str | None = None,
) -> str:
    """The ``-o help`` table: ``  name=<type>  - description`` sorted by name, qemu-img's shape."""
    declared = _declared(builder_class)
    wanted = sorted(declared if names is None else (n for n in names if n in declared))
    lines = [title or ("Supported options:" if with_file else f"Supported {format_name} options:")]
    for name in wanted:
        option = declared[name]
        entry = f"  {name}=<{_TYPE_NAMES.get(option.kind, option.kind)}>"
        if option.description:
            entry = f"{entry.ljust(24)} - {option.description}"
        lines.append(entry)
    text = "\n".join(lines) + "\n"
    if not with_file and title is None:
        text += (
            "\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n"
        )
    return text


def _backing_size(filename: str, backing: str, backing_format: str, gate: ImplicitOpenGate) -> int:
    """The backing file's disk size, opened through *gate* as the new image would open it.

    qemu-img opens the backing file before it prints anything: a missing or refused one fails
    the command without the ``Formatting`` line.
    """
    path = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(filename), backing)
    try:
        driver = format_driver(backing_format).builder_path(path).open_sync(gate)
    except DriverNotFoundError:
        raise CliError(f"{filename}: Unknown backing file format '{backing_format}'") from None
    except ImplicitOpenDeniedError as error:
        raise CliError(f"{filename}: {describe_error(error)}") from None
    except (ImagoError, OSError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise CliError(f"{filename}: Could not open '{backing}': {reason}. Could not open backing image.") from None
    with SyncFormatAccess(driver) as disk:
        return disk.size
