"""``imago map``: ``qemu-img map`` for any format, from the drivers' shallow mappings.

Each range is looked up layer by layer (``get_shallow_mapping``, then the backing layer an
``Indirect`` mapping points to), as qemu-img asks each image of the chain for its block status:
``depth`` is the layer that answers, ``present`` whether some layer allocates the range, ``zero``
and ``data`` how it reads, ``offset`` where its bytes lie in a file. Where a layer's disk is
its file as it is (``FormatDriver.identity_mapped``: raw), holes in the file read as zeroes
(:meth:`imago.Storage.data_extent`), as QEMU reports them.
Adjacent entries that agree are merged exactly as qemu-img merges them, and printed as
qemu-img 7.2 prints them (one JSON object per line, or the human table of data with an offset).

Drivers report long runs (a qcow2 L2 table at a time where nothing is allocated), so a large
sparse image takes few look-ups; the whole walk runs as one coroutine driven inline.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import attrs

from .. import runtime
from ..api import open as open_image
from ..errors import ImagoError
from ..format.mapping import ShallowEof, ShallowIndirect, ShallowRaw, ShallowSpecial, ShallowZero
from ..storage import Storage
from .common import (
    CliError,
    add_force_share,
    add_format,
    add_gate_options,
    add_output,
    check_interrupt,
    check_output,
    describe_error,
    gate_for,
    interruptible,
    parse_size,
    shown_name,
)

if TYPE_CHECKING:
    from ..format.access import FormatAccess

__all__ = ["MapEntry", "configure", "format_human_entry", "format_json_entry", "map_entries", "mergeable", "run"]


@attrs.define
class MapEntry:
    """One of qemu-img's map entries: a guest range and how it reads."""

    start: int
    length: int
    depth: int = 0
    present: bool = False
    zero: bool = False
    data: bool = False
    #: Where the bytes lie in :attr:`filename` (``None``: nowhere, e.g. compressed data).
    offset: int | None = None
    filename: str | None = None


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``imago map``: qemu-img's ``-f``, ``--output``, ``-s``, ``-l``, ``-U``."""
    add_format(parser)
    add_output(parser)
    parser.add_argument(
        "-s", "--start-offset", dest="start_offset", metavar="OFFSET", help="first guest byte to map (default 0)"
    )
    parser.add_argument(
        "-l", "--max-length", dest="max_length", metavar="LENGTH", help="map at most this many bytes (default: all)"
    )
    add_force_share(parser)
    add_gate_options(parser)
    parser.add_argument("filename", metavar="FILE", help="the image file")


def run(args: argparse.Namespace) -> int:
    """Print the map of one image; 0, or 1 on an error (as qemu-img)."""
    start = 0 if args.start_offset is None else parse_size(args.start_offset, what="start offset")
    max_length = None if args.max_length is None else parse_size(args.max_length, what="max length")
    output = check_output(args)
    filename: str = args.filename
    try:
        disk = open_image(filename, args.format, force_share=args.force_share, gate=gate_for(args, [filename]))
    except (ImagoError, OSError) as error:
        raise CliError(f"Could not open '{filename}': {describe_error(error)}") from None
    with disk, interruptible():
        size = -(-disk.size // 512) * 512  # QEMU's length: whole sectors
        end = size if max_length is None else min(start + max_length, size)
        printer = _HumanPrinter() if output == "human" else _JsonPrinter()
        try:
            runtime.run_sync(_walk(disk.access, filename, start, end, printer))
        except CliError:
            raise
        except (ImagoError, OSError) as error:
            raise CliError(f"Could not read file metadata: {describe_error(error)}") from error
        finally:
            sys.stdout.flush()
    return 0


class _JsonPrinter:
    def __init__(self) -> None:
        sys.stdout.write("[")

    def entry(self, entry: MapEntry, following: MapEntry | None) -> None:
        sys.stdout.write(format_json_entry(entry) + (",\n" if following is not None else "]\n"))


class _HumanPrinter:
    def __init__(self) -> None:
        sys.stdout.write(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n")

    def entry(self, entry: MapEntry, following: MapEntry | None) -> None:
        if entry.data and entry.offset is None:
            raise CliError("File contains external, encrypted or compressed clusters.")
        line = format_human_entry(entry)
        if line:
            sys.stdout.write(line)
        # qemu-img's table does not tell zero from unallocated: it marks what follows so that
        # such ranges merge.
        if following is not None and (not following.data or following.zero):
            following.data = False
            following.zero = True


async def _walk(top: FormatAccess, filename: str, start: int, end: int, printer: _JsonPrinter | _HumanPrinter) -> None:
    current = MapEntry(start, 0)
    async for following in map_entries(top, filename, start, end):
        check_interrupt()
        if mergeable(current, following):
            current.length += following.length
            continue
        if current.length:
            printer.entry(current, following)
        current = following
    printer.entry(current, None)


def mergeable(current: MapEntry, following: MapEntry) -> bool:
    """Whether qemu-img would print *following* as part of *current*."""
    if current.length == 0:
        return False
    if (current.zero, current.data, current.depth, current.present) != (
        following.zero,
        following.data,
        following.depth,
        following.present,
    ):
        return False
    if current.filename != following.filename or (current.offset is None) != (following.offset is None):
        return False
    return current.offset is None or current.offset + current.length == following.offset


def format_json_entry(entry: MapEntry) -> str:
    """One entry as ``qemu-img map --output=json`` prints it (without the separator)."""
    text = (
        f'{{ "start": {entry.start}, "length": {entry.length}, "depth": {entry.depth}, '
        f'"present": {_bool(entry.present)}, "zero": {_bool(entry.zero)}, "data": {_bool(entry.data)}'
    )
    if entry.offset is not None:
        text += f', "offset": {entry.offset}'
    return text + "}"


def format_human_entry(entry: MapEntry) -> str:
    """The human table's line for an entry ('' for entries it leaves out: not data, or zero)."""
    if not entry.data or entry.zero:
        return ""
    offset = entry.offset or 0
    return f"{_hex(entry.start):<16}{_hex(entry.length):<16}{_hex(offset):<16}{entry.filename or ''}\n"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _hex(value: int) -> str:
    """C's ``%#x``: no ``0x`` before zero."""
    return f"{value:#x}" if value else "0"


# --- the walk ----------------------------------------------------------------------------------


async def map_entries(top: FormatAccess, filename: str, start: int, end: int) -> AsyncIterator[MapEntry]:
    """qemu-img's unmerged entries for guest ``[start, end)`` of *top* (opened as *filename*).

    Each is as long as every layer down to the answering one reports the same thing.
    """
    names = _Names(top, filename)
    position = start
    while position < end:
        if position >= top.size:
            # QEMU counts whole 512-byte sectors: the end of the last one lies past the end of an
            # image of another size (raw), and reads as the hole past the end of its file.
            raw = names.raw(top)
            yield MapEntry(
                position,
                end - position,
                present=raw,
                zero=True,
                offset=position if raw else None,
                filename=names.of(top, top.driver.storage) if raw else None,
            )
            return
        layer, depth, offset, length = top, 0, position, end - position
        while True:
            mapping, mapped = await layer.get_shallow_mapping(offset, length)
            length = min(length, mapped)
            kind = type(mapping)
            if kind is ShallowIndirect:
                assert isinstance(mapping, ShallowIndirect)
                below = mapping.layer
                if mapping.offset >= below.size:
                    # Past the end of a shorter backing file: zero, and nothing allocated.
                    entry = MapEntry(position, 0, depth=depth, zero=True)
                    break
                length = min(length, below.size - mapping.offset)
                names.below(layer, below)
                layer, depth, offset = below, depth + 1, mapping.offset
                continue
            if kind is ShallowRaw:
                assert isinstance(mapping, ShallowRaw)
                is_data, is_zero = True, False
                if mapping.offset == offset and mapping.storage is layer.driver.storage and names.raw(layer):
                    # Guest bytes at the same offsets of the layer's own file, in a format without
                    # clusters of its own (raw): the file's holes read as zeroes and are not data
                    # (QEMU asks the file). Formats that allocate report their data as data.
                    is_data, run = await mapping.storage.data_extent(mapping.offset, length)
                    is_zero = not is_data
                    length = min(length, run)
                elif layer.driver.holes_read_as_data(mapping.storage):
                    # Allocated to the format, but its file's holes read as zero: QEMU asks the
                    # file and reports them as zero data (a VMDK flat extent).
                    in_file, run = await mapping.storage.data_extent(mapping.offset, length)
                    is_zero = not in_file
                    length = min(length, run)
                entry = MapEntry(
                    position,
                    0,
                    depth=depth,
                    present=True,
                    zero=is_zero,
                    data=is_data,
                    offset=mapping.offset,
                    filename=names.of(layer, mapping.storage),
                )
            elif kind is ShallowZero:
                assert isinstance(mapping, ShallowZero)
                # A zeroed range that keeps host space of its own: qemu-img shows where.
                entry = MapEntry(
                    position,
                    0,
                    depth=depth,
                    present=mapping.explicit,
                    zero=True,
                    offset=mapping.offset,
                    filename=None if mapping.storage is None else names.of(layer, mapping.storage),
                )
            elif kind is ShallowSpecial:
                entry = MapEntry(position, 0, depth=depth, present=True, data=True)
            elif kind is ShallowEof:
                entry = MapEntry(position, 0, depth=depth, zero=True)
            else:
                raise CliError(f"{names.of(layer, layer.driver.storage)}: unknown mapping {mapping!r}")
            break
        entry.length = length
        yield entry
        position += length


class _Names:
    """What qemu-img shows of each layer: its files' names (as given, or resolved as QEMU does)."""

    def __init__(self, top: FormatAccess, filename: str) -> None:
        self._layers: dict[int, str] = {id(top): filename}

    def raw(self, layer: FormatAccess) -> bool:
        """Whether the layer's disk is its file as it is (raw): its holes are the disk's."""
        return type(layer.driver).identity_mapped

    def below(self, layer: FormatAccess, backing: FormatAccess) -> None:
        if id(backing) not in self._layers:
            parent = self._layers[id(layer)]
            recorded = layer.driver.info().get("backing-filename")
            name = recorded if isinstance(recorded, str) else (backing.filename or "")
            self._layers[id(backing)] = name if os.path.isabs(name) else os.path.join(os.path.dirname(parent), name)

    def of(self, layer: FormatAccess, storage: Storage) -> str:
        name = self._layers[id(layer)]
        if storage is layer.driver.storage:
            return name
        # Another file of the layer (an external data file, an extent): named like the layer
        # when it lies beside it, else by its full name.
        return shown_name(name, layer.driver.storage.filename, storage.filename or "")
