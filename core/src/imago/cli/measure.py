"""``imago measure``: ``qemu-img measure`` for every format whose create builder can measure.

The target format's create builder computes the numbers (:meth:`FormatCreateBuilder.measure`)
from the options and, for a source image, the guest ranges that hold data: those come from the
source's mappings through the public API (``get_mapping`` in big steps; zero and unallocated
areas left out), so any source format works.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import runtime
from ..api import measure
from ..api import open as open_image
from ..errors import ImagoError, SnapshotNotFoundError
from ..format.access import SyncFormatAccess
from ..format.capabilities import Capability
from ..format.driver import FormatDriver
from ..format.mapping import MappingEof, MappingRaw, MappingZero
from ..format.measure import Measurement
from . import qjson
from .common import (
    CliError,
    add_force_share,
    add_format,
    add_gate_options,
    add_options,
    add_output,
    check_interrupt,
    check_output,
    describe_error,
    gate_for,
    interruptible,
    parse_options,
    wants_help,
)
from .create import convert_options, driver_for, format_option_help, parse_image_size
from .holes import Holes

__all__ = ["configure", "data_ranges", "format_human", "run"]

#: How much of the source one mapping request may cover (the driver answers with less where
#: the mapping changes).
_STEP = 1 << 62


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago measure`` (qemu-img's)."""
    add_output(parser)
    add_format(parser, what="the source image")
    parser.add_argument("-O", dest="target_format", default="raw", metavar="FMT", help="format of the new image")
    add_options(parser, "creation options of the new image")
    parser.add_argument("--size", dest="size", metavar="N", help="measure an empty image of N bytes (no source)")
    parser.add_argument(
        "-l",
        dest="snapshot",
        metavar="SNAPSHOT",
        help="measure an internal snapshot of the source: its name or ID, or snapshot.name=NAME / snapshot.id=ID",
    )
    add_force_share(parser)
    add_gate_options(parser)
    parser.add_argument("filename", metavar="FILE", nargs="?", help="the source image")


def run(args: argparse.Namespace) -> int:
    """Print the sizes; 0 on success, 1 on errors."""
    output = check_output(args)
    driver = driver_for(args.target_format, None)
    builder_class = driver.create_builder_class
    if wants_help(args.options):
        sys.stdout.write(format_option_help(builder_class, args.target_format))
        return 0
    if args.size is None and args.filename is None:
        raise CliError("Either --size N or one filename must be specified.")
    if args.size is not None and args.filename is not None:
        raise CliError("--size N cannot be used together with a filename.")
    if args.size is not None and (args.format is not None or args.snapshot is not None):
        raise CliError("--image-opts, -f, and -l require a filename argument.")
    size = None if args.size is None else parse_image_size(args.size)
    options = convert_options(builder_class, parse_options(args.options), args.target_format)
    options.pop("size", None)  # --size or the source's size decide, as in qemu-img
    try:
        if size is not None:
            measurement = measure(args.target_format, size, None, **options)
        else:
            source_size, data, bitmaps = _source_data(args)
            measurement = measure(args.target_format, source_size, data, **options)
            if not bitmaps:
                measurement = Measurement(measurement.required, measurement.fully_allocated)
    except ImagoError as error:
        if isinstance(error, CliError):
            raise
        raise CliError(describe_error(error)) from None
    sys.stdout.write(qjson.dumps(measurement.to_json()) + "\n" if output == "json" else format_human(measurement))
    return 0


def _source_data(args: argparse.Namespace) -> tuple[int, list[tuple[int, int]], bool]:
    """The source's disk size, its data ranges, and whether it can hold persistent bitmaps."""
    filename: str = args.filename
    try:
        disk = open_image(filename, args.format, force_share=args.force_share, gate=gate_for(args, [filename]))
    except (ImagoError, OSError) as error:
        raise CliError(f"Could not open '{filename}': {describe_error(error)}") from None
    with disk, interruptible():
        bitmaps = _stores_bitmaps(disk.driver.info())
        if args.snapshot is None:
            return disk.size, data_ranges(disk), bitmaps
        with SyncFormatAccess(_snapshot_view(disk, args.snapshot)) as view:
            return view.size, data_ranges(view), bitmaps


def _snapshot_view(disk: SyncFormatAccess, text: str) -> FormatDriver:
    """A read-only view of the internal snapshot ``-l`` names (``NAME_OR_ID`` or ``snapshot.name=``...)."""
    wanted = text
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key in ("snapshot.name", "snapshot.id"):
            wanted = value
    snapshots = Capability.SNAPSHOTS.of(disk.driver)
    if snapshots is None:
        raise CliError("Failed to load snapshot: this image format has no internal snapshots")
    try:
        return runtime.run_sync(snapshots.read_snapshot(wanted))
    except SnapshotNotFoundError:
        raise CliError("Failed to load snapshot: Can't find snapshot") from None


def _stores_bitmaps(info: dict[str, Any]) -> bool:
    """Whether a source can hold persistent dirty bitmaps: qemu-img reports their size only then.

    Among the formats qemu-img knows, only qcow2 from compat 1.1 on can; the source's
    ``format-specific`` facts (qemu-img info's) tell.
    """
    specific = info.get("format-specific") or {}
    data = specific.get("data") or {}
    return bool(specific.get("type") == "qcow2" and data.get("compat", "0.10") != "0.10")


def data_ranges(disk: SyncFormatAccess) -> list[tuple[int, int]]:
    """The guest ranges of *disk* that hold data (zero and unallocated areas left out), merged."""
    ranges: list[tuple[int, int]] = []
    holes = Holes(disk.access)
    offset, size = 0, disk.size
    while offset < size:
        check_interrupt()
        mapping, length = disk.get_mapping(offset, min(_STEP, size - offset))
        if isinstance(mapping, MappingEof) or length <= 0:
            break
        is_data = not isinstance(mapping, MappingZero)
        if isinstance(mapping, MappingRaw):
            is_data, length = runtime.run_sync(holes.data_run(mapping, min(length, size - offset)))
        if is_data:
            if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((offset, length))
        offset += length
    return ranges


def format_human(measurement: Measurement) -> str:
    """``qemu-img measure``'s human output."""
    lines = [f"required size: {measurement.required}", f"fully allocated size: {measurement.fully_allocated}"]
    if measurement.bitmaps is not None:
        lines.append(f"bitmaps size: {measurement.bitmaps}")
    return "\n".join(lines) + "\n"
