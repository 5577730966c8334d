"""``imago amend``: ``qemu-img amend`` for every format whose driver claims :attr:`Capability.AMEND`.

The ``-o`` texts become typed values through the format's declared creation options (the ones
the driver lists in ``amend_option_names``); the driver validates them all before it writes.
"""

from __future__ import annotations

import argparse
import sys

from .. import runtime
from ..api import open as open_image
from ..errors import ImagoError
from ..format.capabilities import Capability
from .common import (
    CliError,
    add_cache,
    add_format,
    add_gate_options,
    add_options,
    cache_flags,
    describe_error,
    gate_for,
    interruptible,
    parse_options,
    wants_help,
)
from .create import convert_options, driver_for, format_option_help
from .progress import add_progress, progress_for

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago amend`` (qemu-img's: ``-f``, ``-o``, ``-p``, ``-q``, ``-t``, ``--force``)."""
    add_format(parser)
    add_options(parser, "options to change")
    add_progress(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="print no progress")
    add_cache(parser, "-t", dest="cache", default="writeback")
    parser.add_argument("--force", action="store_true", help="allow changes that may lose data (qemu-img's --force)")
    add_gate_options(parser)
    parser.add_argument("filename", metavar="FILE", nargs="?", help="the image to change")


def run(args: argparse.Namespace) -> int:
    """Change the options; 0 on success, 1 on errors (one line on stderr)."""
    filename: str | None = args.filename
    if not args.options:
        raise CliError("Must specify options (-o)")
    if wants_help(args.options) and args.format is not None:
        return _help(args.format)
    if filename is None:
        raise CliError("Expecting one image file name")
    texts = parse_options(args.options)
    direct, no_flush = cache_flags(args.cache)
    try:
        disk = open_image(
            filename,
            args.format,
            write=not wants_help(args.options),
            direct=direct,
            no_flush=no_flush,
            gate=gate_for(args, [filename]),
        )
    except (ImagoError, OSError) as error:
        raise CliError(f"Could not open '{filename}': {describe_error(error)}") from None
    with disk:
        format_name = disk.format_name
        amender = Capability.AMEND.of(disk.driver)
        if amender is None:
            raise CliError(f"Format driver '{format_name}' does not support option amendment")
        if wants_help(args.options):
            return _help(format_name)
        builder_class = driver_for(format_name, filename).create_builder_class
        names = amender.amend_option_names
        declared = {option.name for option in builder_class.options}
        for name in texts:
            if name in declared and name not in names:
                raise CliError(
                    f"{filename}: Invalid parameter '{name}': this option is only supported for image creation"
                )
        options = convert_options(builder_class, texts, filename, allowed=names)
        if args.quiet:
            args.progress = None
        with interruptible(), progress_for(args, "amend", 1) as progress:
            try:
                runtime.run_sync(amender.amend(options, force=args.force))
            except ImagoError as error:
                raise CliError(f"{filename}: {describe_error(error)}") from None
            progress.update(1)
    return 0


def _help(format_name: str) -> int:
    """``-o help``: the options the format's amend accepts, qemu-img's table."""
    driver = driver_for(format_name, None)
    amender = Capability.AMEND in driver.capabilities
    if not amender:
        raise CliError(f"Format driver '{format_name}' does not support option amendment")
    names = getattr(driver, "amend_option_names", ())
    sys.stdout.write(
        format_option_help(
            driver.create_builder_class, format_name, names=names, title=f"Amend options for '{format_name}':"
        )
    )
    return 0
