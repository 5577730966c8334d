"""Opening a VHD: the footer (and its copy), the dynamic header, the BAT and the parent.

The footer is read at the end of the file; a dynamic or differencing image's copy at offset 0
must match it byte for byte (when the end holds no footer, the copy is used, as QEMU does). The
BAT is read whole (charged to the chain's memory budget) and every entry checked at open: a
block (its bitmap, then its data) must lie after the metadata and before the footer, and no two
blocks may overlap. A differencing image's parent is named by its parent locators (relative
names only, :func:`~imago_vpc.dynamic.decode_locator`), opened as a vpc image below this one
through the gate (so loops and over-deep chains are refused by the builder), and its footer's
UUID must be the one the header records.
"""

from __future__ import annotations

import itertools
import sys
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imago import (
    CorruptImageError,
    FormatAccess,
    FormatDriverBuilder,
    ImplicitOpenGate,
    MemoryBudget,
    Storage,
    UnsupportedFeatureError,
    open_named_image,
)

from .dynamic import (
    DYNAMIC_HEADER_SIZE,
    MAX_LOCATOR_BYTES,
    DynamicHeader,
    decode_locator,
    parse_dynamic_header,
)
from .footer import (
    FOOTER_SIZE,
    NO_OFFSET,
    SECTOR,
    TYPE_DIFFERENCING,
    TYPE_FIXED,
    Footer,
    disk_size,
    parse_footer,
)

if TYPE_CHECKING:
    from .driver import Vpc

__all__ = ["UNALLOCATED", "OpenedImage", "open_image", "read_at"]

#: A BAT entry of a block not allocated.
UNALLOCATED = 0xFFFFFFFF


@dataclass(slots=True)
class OpenedImage:
    """What the open path found."""

    footer: Footer
    #: Where the footer lies (the end of the file, or 0 when only the copy was found).
    footer_at: int
    size: int
    header: DynamicHeader | None
    bat: array[int] | None
    backing: FormatAccess | None
    parent_name: str | None
    budget: MemoryBudget


async def read_at(storage: Storage, offset: int, length: int) -> bytes:
    """Up to *length* bytes at *offset* (fewer past the end of the file)."""
    buf = bytearray(max(0, min(length, storage.size - offset)))
    if buf:
        await storage.readv([memoryview(buf)], offset)
    return bytes(buf)


async def open_image(driver_class: type[Vpc], builder: FormatDriverBuilder[Vpc], gate: ImplicitOpenGate) -> Vpc:
    """Open the image *builder* describes; its parent (read-only) through *gate*."""
    storage = await builder.open_storage(gate)
    opened: list[Storage | FormatAccess] = [storage] if builder.path is not None else []
    try:
        image = await _open(builder, gate, storage, opened)
    except BaseException:
        for resource in reversed(opened):
            await resource.close()
        raise
    return driver_class(storage, image, builder.writable)


async def read_footer(storage: Storage) -> tuple[Footer, int]:
    """The footer and where it lies; the copy at offset 0 checked against it."""
    filename = storage.filename
    file_size = storage.size
    if file_size < FOOTER_SIZE:
        raise CorruptImageError(filename, 0, f"the file ({file_size} bytes) is shorter than a VHD footer")
    end = file_size - FOOTER_SIZE
    tail = await read_at(storage, end, FOOTER_SIZE)
    head = await read_at(storage, 0, FOOTER_SIZE)
    if tail[:8] == b"conectix":
        footer = parse_footer(tail, filename, end)
        differs = footer.disk_type != TYPE_FIXED and end > 0 and head != tail
        if differs and parse_footer(head, filename, 0) != footer:
            raise CorruptImageError(filename, 0, "the footer's copy at the start of the file differs from the footer")
        return footer, end
    footer = parse_footer(head, filename, 0)
    if footer.disk_type == TYPE_FIXED:
        raise CorruptImageError(filename, end, "a fixed VHD without its footer at the end of the file")
    return footer, 0


async def _open(
    builder: FormatDriverBuilder[Vpc], gate: ImplicitOpenGate, storage: Storage, opened: list[Storage | FormatAccess]
) -> OpenedImage:
    filename = storage.filename
    footer, footer_at = await read_footer(storage)
    size = disk_size(footer, filename)
    if footer.disk_type == TYPE_FIXED:
        if footer_at < size:
            raise CorruptImageError(
                filename, footer_at, f"the fixed disk ({size} bytes) is longer than the file holds before its footer"
            )
        return OpenedImage(footer, footer_at, size, None, None, None, None, builder.budget)
    at = footer.data_offset
    if at == NO_OFFSET or at % SECTOR or at + DYNAMIC_HEADER_SIZE > storage.size:
        raise CorruptImageError(filename, 16, f"the dynamic header's offset {at:#x} lies outside the file")
    header = parse_dynamic_header(
        await read_at(storage, at, DYNAMIC_HEADER_SIZE), filename, at, size, footer_at or storage.size
    )
    builder.budget.hold(filename, "its block allocation table", 4 * header.max_table_entries)
    bat = array("I", await read_at(storage, header.table_offset, 4 * header.max_table_entries))
    if sys.byteorder == "little":
        bat.byteswap()
    _check_bat(filename, header, bat, at, footer_at or storage.size)
    backing = None
    parent_name = None
    if builder.writable and (footer.disk_type == TYPE_DIFFERENCING or footer_at == 0):
        what = "differencing VHDs" if footer_at else "VHDs without a footer at the end (only its copy)"
        raise UnsupportedFeatureError(f"writing {what} (read-only here)", filename)
    if footer.disk_type == TYPE_DIFFERENCING:
        parent_name = await _parent_name(storage, header)
        if builder.opens_backing:
            backing = await _open_parent(builder, gate, storage, parent_name, header.parent_uuid)
            opened.append(backing)
    return OpenedImage(footer, footer_at, size, header, bat, backing, parent_name, builder.budget)


def _check_bat(filename: str | None, header: DynamicHeader, bat: array[int], header_at: int, data_end: int) -> None:
    """Every allocated block after the metadata, before the footer, and apart from the others.

    (Whole-table operations, not a loop in Python per entry: a crafted BAT of millions of
    entries is checked in bounded time.)
    """
    metadata_end = max(header_at + DYNAMIC_HEADER_SIZE, header.table_offset + header.table_bytes, FOOTER_SIZE)
    span = header.bitmap_size + header.block_size
    allocated = sorted(entry for entry in bat if entry != UNALLOCATED)
    if not allocated:
        return
    first, last = allocated[0] * SECTOR, allocated[-1] * SECTOR
    if first < metadata_end or last + span > data_end:
        bad = allocated[0] if first < metadata_end else allocated[-1]
        index = bat.index(bad)
        raise CorruptImageError(
            filename,
            header.table_offset + 4 * index,
            f"block {index} ({span} bytes at {bad * SECTOR:#x}) lies in the image's metadata or past its data "
            f"(metadata ends at {metadata_end:#x}, data at {data_end:#x})",
        )
    step = span // SECTOR
    for previous, entry in itertools.pairwise(allocated):
        if entry < previous + step:
            index, other = bat.index(previous), bat.index(entry)
            if index == other:
                other = bat.index(entry, index + 1)
            where = header.table_offset + 4 * other
            raise CorruptImageError(filename, where, f"blocks {index} and {other} overlap (at {entry * SECTOR:#x})")


async def _parent_name(storage: Storage, header: DynamicHeader) -> str:
    """The parent's relative file name, from the first locator that gives one."""
    filename = storage.filename
    for locator in header.locators:
        if locator.data_length > MAX_LOCATOR_BYTES or locator.data_offset + locator.data_length > storage.size:
            raise CorruptImageError(
                filename,
                locator.data_offset,
                f"a parent locator ({locator.data_length} bytes at {locator.data_offset:#x}) lies outside the file "
                f"or is longer than {MAX_LOCATOR_BYTES} bytes",
            )
        name = decode_locator(locator, await read_at(storage, locator.data_offset, locator.data_length), filename)
        if name is not None:
            return name
    raise UnsupportedFeatureError(
        f"a differencing VHD whose parent ({header.parent_name!r}) has no relative locator (W2ru, W2ku)", filename
    )


async def _open_parent(
    builder: FormatDriverBuilder[Vpc], gate: ImplicitOpenGate, storage: Storage, name: str, uuid: bytes
) -> FormatAccess:
    from .driver import Vpc

    parent = await open_named_image(builder, gate, storage, name, Vpc, role="parent")
    if parent.uuid != uuid:
        await parent.close()
        raise CorruptImageError(
            storage.filename,
            None,
            f"the parent {name!r} has UUID {parent.uuid.hex()}, but the image expects {uuid.hex()} "
            "(the parent changed since this differencing image was made)",
        )
    return FormatAccess(parent)
