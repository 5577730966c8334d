"""Opening a VHDX image: the current header, the log, the region and metadata tables, the BAT, the parent.

The log is replayed before anything it may change is read: in memory for a read-only open (the
file is not touched; :class:`~imago_vhdx.log.Replay` shows its updates over the file), to disk
for a writable one (updates written and flushed, then both headers rewritten without a log,
one at a time, so a crash at any point leaves either the old log to replay again or none).
A differencing image's parent is opened through the gate from the locator's ``relative_path``
(a local relative name: no drive, no root, no ``..``); its DataWriteGuid must be the locator's
``parent_linkage``.
"""

from __future__ import annotations

import uuid
from array import array
from typing import TYPE_CHECKING

from imago import (
    CorruptImageError,
    FormatAccess,
    FormatDriverBuilder,
    ImplicitOpenDeniedError,
    ImplicitOpenGate,
    Record,
    Storage,
    UnsupportedFeatureError,
    check_local_file_name,
    open_named_image,
)

from .bat import BatGeometry, check_bat
from .layout import (
    BAT_GUID,
    HEADER_OFFSETS,
    METADATA_GUID,
    REGION_OFFSETS,
    SIGNATURE,
    Header,
    Metadata,
    MiB,
    parse_header,
    parse_metadata,
    parse_region_table,
)
from .log import Replay, read_log

if TYPE_CHECKING:
    from .driver import Vhdx

__all__ = ["OpenedImage", "open_image", "parent_name"]

_FIXED_PART = 320 * 1024
# The metadata region is read whole; a larger one is refused as absurd.
_MAX_METADATA = 64 * MiB


class OpenedImage(Record):
    """What the open path found."""

    __slots__ = ("backing", "bat", "bat_offset", "geometry", "header", "metadata", "parent_name", "replay", "writable")

    header: Header
    metadata: Metadata
    geometry: BatGeometry
    bat: array[int]
    bat_offset: int
    replay: Replay | None
    backing: FormatAccess | None
    parent_name: str | None
    writable: bool

    def __init__(self, **fields: object) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, fields[name])


async def open_image(driver_class: type[Vhdx], builder: FormatDriverBuilder[Vhdx], gate: ImplicitOpenGate) -> Vhdx:
    """Open the image *builder* describes; a differencing image's parent (read-only) through *gate*."""
    storage = await builder.open_storage(gate)
    opened: list[Storage | FormatAccess] = [storage] if builder.path is not None else []
    try:
        image = await _open(builder, gate, storage, opened)
    except BaseException:
        for resource in reversed(opened):
            await resource.close()
        raise
    return driver_class(storage, image)


async def _read(storage: Storage, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    present = max(0, min(length, storage.size - offset))
    if present:
        await storage.readv([memoryview(buf)[:present]], offset)
    return buf


async def _open(
    builder: FormatDriverBuilder[Vhdx], gate: ImplicitOpenGate, storage: Storage, opened: list[Storage | FormatAccess]
) -> OpenedImage:
    filename = storage.filename
    if storage.size < _FIXED_PART:
        raise CorruptImageError(filename, None, f"the file ({storage.size} bytes) is too short for a VHDX image")
    head = await _read(storage, 0, _FIXED_PART)
    if head[:8] != SIGNATURE:
        raise CorruptImageError(filename, 0, "not a VHDX image (no 'vhdxfile' signature)")
    header = current_header(head, storage.size, filename)

    replay: Replay | None = None
    if header.log_guid.int:
        replay = await read_log(storage, header.log_offset, header.log_length, header.log_guid, builder.budget)
        if builder.writable:
            await replay.apply(storage)
            header = await rewrite_headers(storage, header, log_guid=uuid.UUID(int=0))
            replay = None

    regions = parse_region_table(bytes(head[REGION_OFFSETS[0] :]), REGION_OFFSETS[0], filename)
    if regions is None:
        regions = parse_region_table(bytes(head[REGION_OFFSETS[1] :]), REGION_OFFSETS[1], filename)
    if regions is None:
        raise CorruptImageError(filename, REGION_OFFSETS[0], "neither region table has a valid signature and checksum")
    file_end = max(storage.size, replay.last_file_offset if replay is not None else 0)
    bat_region, meta_region = regions[BAT_GUID], regions[METADATA_GUID]
    reserved = [(0, MiB, "headers"), (header.log_offset, header.log_length, "log")]
    for region, what in ((bat_region, "BAT"), (meta_region, "metadata region")):
        for start, size, other in reserved:
            if region.offset < start + size and start < region.offset + region.length:
                raise CorruptImageError(filename, REGION_OFFSETS[0], f"the {what} overlaps the {other}")
        if region.offset + region.length > file_end:
            raise CorruptImageError(filename, REGION_OFFSETS[0], f"the {what} ends past the end of the file")
        reserved.append((region.offset, region.length, what))

    if meta_region.length > _MAX_METADATA:
        raise CorruptImageError(
            filename, REGION_OFFSETS[0], f"the metadata region is {meta_region.length} bytes long, over 64 MiB"
        )
    builder.budget.hold(filename, "its metadata region", meta_region.length)
    try:
        meta_bytes = await _read_replayed(storage, replay, meta_region.offset, meta_region.length)
        metadata = parse_metadata(bytes(meta_bytes), meta_region.offset, filename)
    finally:
        builder.budget.release(meta_region.length)
    del meta_bytes

    geometry = BatGeometry(
        metadata.virtual_size, metadata.block_size, metadata.logical_sector_size, metadata.has_parent
    )
    bat_bytes = 8 * geometry.entries
    if bat_bytes > bat_region.length:
        raise CorruptImageError(
            filename,
            bat_region.offset,
            f"the BAT region ({bat_region.length} bytes) is shorter than its {geometry.entries} entries",
        )
    builder.budget.hold(filename, "its BAT", bat_bytes)
    try:
        bat = array("Q", bytes(await _read_replayed(storage, replay, bat_region.offset, bat_bytes)))
        check_bat(bat, geometry, metadata.has_parent, file_end, reserved, bat_region.offset, filename)
    except BaseException:
        builder.budget.release(bat_bytes)
        raise

    backing = None
    name: str | None = None
    if metadata.has_parent and builder.writable:
        raise UnsupportedFeatureError("writing differencing VHDX images (read-only here)", filename)
    if metadata.has_parent:
        assert metadata.parent_locator is not None
        entries = metadata.parent_locator.entries
        name = parent_name(entries, filename, meta_region.offset)
        if builder.opens_backing:
            backing = await _open_parent(builder, gate, storage, name, entries.get("parent_linkage", ""))
            opened.append(backing)
    return OpenedImage(
        header=header,
        metadata=metadata,
        geometry=geometry,
        bat=bat,
        bat_offset=bat_region.offset,
        replay=replay,
        backing=backing,
        parent_name=name,
        writable=builder.writable,
    )


async def _read_replayed(storage: Storage, replay: Replay | None, offset: int, length: int) -> bytearray:
    if replay is not None:
        return await replay.read(storage, offset, length)
    return await _read(storage, offset, length)


def current_header(head: bytearray, file_size: int, filename: str | None) -> Header:
    """The header with the higher sequence number of the two whose checksums hold."""
    headers = [
        parse_header(bytes(head[at : at + 4096]), slot, file_size, filename) for slot, at in enumerate(HEADER_OFFSETS)
    ]
    valid = [h for h in headers if h is not None]
    if not valid:
        raise CorruptImageError(filename, HEADER_OFFSETS[0], "neither header has a valid signature and checksum")
    if len(valid) == 2 and valid[0].sequence == valid[1].sequence and valid[0].encode() != valid[1].encode():
        raise CorruptImageError(
            filename, HEADER_OFFSETS[1], "both headers have the same sequence number but different contents"
        )
    return max(valid, key=lambda h: h.sequence)


async def rewrite_headers(storage: Storage, header: Header, **changes: object) -> Header:
    """Write *header* with *changes* over the other slot, then over its own slot: each write flushed.

    A crash between leaves one valid header of each generation; the newer is chosen.
    """
    current = header
    for _ in range(2):
        slot = 1 - current.slot
        current = Header(
            **{
                **{name: getattr(current, name) for name in Header.__slots__},
                **changes,
                "slot": slot,
                "sequence": current.sequence + 1,
            }
        )
        await storage.writev([memoryview(current.encode())], HEADER_OFFSETS[slot])
        await storage.flush()
    return current


def parent_name(entries: dict[str, str], filename: str | None, at: int) -> str:
    """The parent's file name from the locator: ``relative_path`` as a local relative POSIX name."""
    recorded = entries.get("relative_path")
    if recorded is None:
        raise ImplicitOpenDeniedError(
            repr(entries.get("absolute_win32_path") or entries.get("volume_path")),
            f"the parent locator of {filename or 'the image'} has no relative_path (only relative names are opened)",
            allowable=False,
        )
    name = recorded.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    parts = name.split("/")
    if not name or name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise ImplicitOpenDeniedError(
            recorded,
            f"the parent locator of {filename or 'the image'} names no local relative file (a root, drive or '..')",
            allowable=False,
        )
    del at
    return check_local_file_name(name)


async def _open_parent(
    builder: FormatDriverBuilder[Vhdx], gate: ImplicitOpenGate, storage: Storage, name: str, linkage: str
) -> FormatAccess:
    from .driver import Vhdx

    parent = await open_named_image(builder, gate, storage, name, Vhdx, role="parent")
    try:
        expected = uuid.UUID(linkage.strip("{}"))
    except ValueError:
        await parent.close()
        raise CorruptImageError(
            storage.filename, None, f"the parent locator's parent_linkage {linkage!r} is not a GUID"
        ) from None
    if parent.data_write_guid != expected:
        await parent.close()
        raise CorruptImageError(
            storage.filename,
            None,
            f"the parent {name!r} has DataWriteGuid {parent.data_write_guid}, but the image expects {expected} "
            "(the parent changed since this image was made)",
        )
    return FormatAccess(parent)
