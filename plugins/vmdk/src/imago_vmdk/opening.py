"""Opening a VMDK image: the first file (descriptor or sparse extent), the extents and the parent.

Every file the image names is an implicit open through the gate: extent files (names checked
by :func:`~imago_vmdk.descriptor.check_extent_name` first, a refusal naming the descriptor
line) and the parent of a delta link (``parentFileNameHint``, opened as a vmdk image below this
one, so loops and over-deep chains are refused by the builder; its CID must be this image's
``parentCID``). What was opened is closed again when opening fails.
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING

from imago import (
    CorruptImageError,
    FormatAccess,
    FormatDriverBuilder,
    ImplicitOpenDeniedError,
    ImplicitOpenGate,
    Record,
    Storage,
    UnopenedFile,
    UnsupportedFeatureError,
    open_named_image,
)

from .descriptor import (
    DESCRIPTOR_FILE_TYPES,
    FLAT_TYPES,
    MAX_DESCRIPTOR_BYTES,
    NO_PARENT_CID,
    SPARSE_TYPES,
    Access,
    Descriptor,
    ExtentLine,
    ExtentType,
    looks_like_descriptor,
    parse_descriptor,
)
from .extents import Extent, FlatExtent, SparseExtent, ZeroExtent
from .header import COWD_MAGIC, KDMV_MAGIC, SECTOR, SparseLayout, footer_offset, parse_cowd, parse_kdmv
from .sesparse import open_sesparse_extent
from .stream_append import StreamAppender

if TYPE_CHECKING:
    from .driver import Vmdk

__all__ = ["OpenedImage", "open_image"]

# What is read of a sparse extent to parse its header (COWD's is 2 KiB long, KDMV's one sector).
_HEAD_BYTES = 2048


class OpenedImage(Record):
    """What the open path found: the extents, the descriptor's facts, the parent."""

    __slots__ = (
        "appender",
        "backing",
        "cid",
        "create_type",
        "descriptor_area",
        "extents",
        "parent_cid",
        "parent_hint",
        "storages",
        "writable",
    )

    extents: tuple[Extent, ...]
    storages: tuple[Storage, ...]
    cid: int
    parent_cid: int
    create_type: str
    parent_hint: str | None
    backing: FormatAccess | None
    #: Where the descriptor text lies in the image's file, and how long it may be.
    descriptor_area: tuple[int, int]
    writable: bool
    #: For a stream-optimized image opened for writing: what appends its grains.
    appender: StreamAppender | None

    def __init__(self, **fields: object) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, fields[name])


async def open_image(driver_class: type[Vmdk], builder: FormatDriverBuilder[Vmdk], gate: ImplicitOpenGate) -> Vmdk:
    """Open the image *builder* describes; its extents and parent (read-only) through *gate*."""
    storage = await builder.open_storage(gate)
    opened: list[Storage | FormatAccess] = [storage] if builder.path is not None else []
    try:
        image = await _open(builder, gate, storage, opened)
    except BaseException:
        for resource in reversed(opened):
            await resource.close()
        raise
    return driver_class(storage, image)


async def _read(storage: Storage, offset: int, length: int) -> bytes:
    buf = bytearray(max(0, min(length, storage.size - offset)))
    if buf:
        await storage.readv([memoryview(buf)], offset)
    return bytes(buf)


async def _open(
    builder: FormatDriverBuilder[Vmdk], gate: ImplicitOpenGate, storage: Storage, opened: list[Storage | FormatAccess]
) -> OpenedImage:
    filename = storage.filename
    head = await _read(storage, 0, _HEAD_BYTES)
    magic = head[:4]
    extents: list[Extent]
    create_type: str
    descriptor_area = (0, storage.size)
    if magic == KDMV_MAGIC:
        layout = await _kdmv_layout(storage, head)
        descriptor = await _embedded_descriptor(storage, layout)
        descriptor_area = (layout.descriptor_offset, layout.descriptor_size)
        if layout.capacity == 0 and layout.descriptor_offset:
            # A descriptor file kept in a sparse file's descriptor area (QEMU opens these too).
            if descriptor is None:
                raise CorruptImageError(filename, 28, "the file holds neither a disk nor a descriptor")
            extents, create_type = await _descriptor_extents(builder, gate, storage, descriptor, opened)
        else:
            extents = [await _sparse_extent(builder, storage, layout, "")]
            create_type = "streamOptimized" if layout.compressed else "monolithicSparse"
    elif magic == COWD_MAGIC:
        extents = [await _sparse_extent(builder, storage, parse_cowd(head, storage.size, filename), "")]
        descriptor = None
        create_type = "vmfsSparse"
    elif looks_like_descriptor(head, strict=False):
        if storage.size > MAX_DESCRIPTOR_BYTES:
            raise CorruptImageError(
                filename, None, f"the descriptor file is {storage.size} bytes long, more than {MAX_DESCRIPTOR_BYTES}"
            )
        descriptor = parse_descriptor(await _read(storage, 0, storage.size), filename)
        extents, create_type = await _descriptor_extents(builder, gate, storage, descriptor, opened)
    else:
        raise CorruptImageError(filename, 0, "not a VMDK image (no sparse header magic, no text descriptor)")

    cid = descriptor.cid if descriptor is not None else 0
    parent_cid = descriptor.parent_cid if descriptor is not None else NO_PARENT_CID
    parent_hint = descriptor.parent_hint if descriptor is not None else None
    backing = None
    if parent_hint is not None and builder.opens_backing:
        backing = await _open_parent(builder, gate, storage, parent_hint, parent_cid)
        opened.append(backing)
    appender = None
    if builder.writable:
        if _is_stream(extents, storage):
            appender = await StreamAppender.open(storage)
        else:
            _check_writable(extents, filename)
    storages: list[Storage] = [storage]
    for extent in extents:
        if extent.storage is not None and all(extent.storage is not s for s in storages):
            storages.append(extent.storage)
    return OpenedImage(
        extents=tuple(extents),
        storages=tuple(storages),
        cid=cid,
        parent_cid=parent_cid,
        create_type=create_type,
        parent_hint=parent_hint,
        backing=backing,
        descriptor_area=descriptor_area if descriptor is not None else (0, 0),
        writable=builder.writable,
        appender=appender,
    )


def _is_stream(extents: list[Extent], storage: Storage) -> bool:
    """A monolithic stream-optimized file: written by appending compressed grains (:mod:`imago_vmdk.stream_append`)."""
    if len(extents) != 1:
        return False
    extent = extents[0]
    return (
        isinstance(extent, SparseExtent)
        and extent.storage is storage
        and extent.compressed
        and extent.layout.has_markers
        and extent.layout.version == 3
    )


def _check_writable(extents: list[Extent], filename: str | None) -> None:
    """Writing needs every extent writable: flat, or hosted sparse without compression."""
    for extent in extents:
        if isinstance(extent, FlatExtent):
            continue
        if isinstance(extent, SparseExtent) and extent.layout.kind == "KDMV" and not extent.compressed:
            continue
        what = extent.type_name or ("compressed" if extent.compressed else extent.__class__.__name__)
        raise UnsupportedFeatureError(f"writing vmdk images with {what} extents (read-only here)", filename)


async def _kdmv_layout(storage: Storage, head: bytes) -> SparseLayout:
    file_size = storage.size
    if len(head) < SECTOR:
        raise CorruptImageError(storage.filename, 0, f"the file ({file_size} bytes) is shorter than a sparse header")
    try:
        return parse_kdmv(head, None, file_size, storage.filename)
    except LookupError:
        at = footer_offset(file_size)
        footer = await _read(storage, at, 3 * SECTOR) if at >= SECTOR else b""
        return parse_kdmv(head, footer, file_size, storage.filename)


async def _embedded_descriptor(storage: Storage, layout: SparseLayout) -> Descriptor | None:
    if not layout.descriptor_offset or not layout.descriptor_size:
        return None
    data = await _read(storage, layout.descriptor_offset, layout.descriptor_size)
    return parse_descriptor(data, storage.filename, offset=layout.descriptor_offset)


async def _sparse_extent(
    builder: FormatDriverBuilder[Vmdk], storage: Storage, layout: SparseLayout, type_name: str
) -> SparseExtent:
    directory = await SparseExtent.read_directory(storage, layout, builder.budget)
    redundant = None
    if builder.writable and layout.kind == "KDMV" and not layout.compressed:
        if layout.rgd_offset:
            redundant = await SparseExtent.read_directory(storage, layout, builder.budget, redundant=True)
        else:
            redundant = array("I", bytes(4 * len(directory)))
        _check_tables(storage, layout, directory, redundant)
    return SparseExtent(storage, layout, directory, builder.budget, type_name, redundant)


def _check_tables(storage: Storage, layout: SparseLayout, directory: array[int], redundant: array[int]) -> None:
    """Refuse grain tables a writer would write over the header, descriptor or directories.

    They must lie in the metadata area, before the grains, clear of the rest of the metadata.
    """
    nbytes = 4 * layout.gtes_per_gt
    gd_bytes = 4 * layout.gd_entries
    reserved = [(0, SECTOR), (layout.gd_offset, gd_bytes)]
    if layout.descriptor_offset:
        reserved.append((layout.descriptor_offset, layout.descriptor_size))
    if layout.rgd_offset:
        reserved.append((layout.rgd_offset, gd_bytes))
    for table in (directory, redundant):
        for index, sector in enumerate(table):
            offset = sector * SECTOR
            if not sector:
                continue
            clash = offset + nbytes > layout.overhead or any(
                offset < start + length and start < offset + nbytes for start, length in reserved
            )
            if clash:
                raise CorruptImageError(
                    storage.filename,
                    offset,
                    f"grain table {index} ({nbytes} bytes at {offset:#x}) overlaps the header, the descriptor "
                    f"or a grain directory, or lies past the metadata area (grains at {layout.overhead:#x}): "
                    "the image cannot be written",
                )


async def _descriptor_extents(
    builder: FormatDriverBuilder[Vmdk],
    gate: ImplicitOpenGate,
    storage: Storage,
    descriptor: Descriptor,
    opened: list[Storage | FormatAccess],
) -> tuple[list[Extent], str]:
    filename = storage.filename
    create_type = descriptor.create_type
    if create_type is None:
        raise CorruptImageError(filename, None, "the descriptor has no createType")
    if create_type not in DESCRIPTOR_FILE_TYPES:
        raise UnsupportedFeatureError(f"VMDK descriptor files of createType {create_type!r}", filename)
    if not descriptor.extents:
        raise CorruptImageError(filename, None, "the descriptor lists no extents")
    extents: list[Extent] = []
    files: dict[str, Storage] = {}  # each file opened once, however many extents it holds
    for line in descriptor.extents:
        extents.append(await _open_extent(builder, gate, storage, line, opened, files))
    return extents, create_type


async def _open_extent(
    builder: FormatDriverBuilder[Vmdk],
    gate: ImplicitOpenGate,
    storage: Storage,
    line: ExtentLine,
    opened: list[Storage | FormatAccess],
    files: dict[str, Storage],
) -> Extent:
    descriptor = storage.filename
    size = line.sectors * SECTOR
    if builder.writable and (line.access is not Access.RW or line.type is ExtentType.ZERO):
        # The descriptor forbids writing there (ZERO: there is no file to write): refused before any file opens.
        raise UnsupportedFeatureError(
            f"writing a VMDK with {line.access.value} {line.type.value} extents: {line.where(descriptor)}", descriptor
        )
    if line.type is ExtentType.ZERO or line.access is Access.NOACCESS:
        # NOACCESS: the data is not ours to read; the extent reads as unallocated, its file unopened.
        return ZeroExtent(size, line.type, recorded=line.type is ExtentType.ZERO)
    assert line.filename is not None
    if line.type in FLAT_TYPES and builder.opens_metadata_only:
        # Guest data only: not opened (nor shown to the gate) when only metadata is asked for.
        name = storage.resolve_relative_path(line.filename)
        unopened = UnopenedFile(name, descriptor, role="extent", what="flat extent file", counted=True)
        return FlatExtent(unopened, size, line.start_sector * SECTOR, line.type.value)
    if line.type is ExtentType.SESPARSE and builder.writable:
        # (As QEMU: seSparse is read-only; refused before its file is opened for writing.)
        raise UnsupportedFeatureError(f"writing seSparse extents (read-only): {line.where(descriptor)}", descriptor)
    name = storage.resolve_relative_path(line.filename)
    extent_storage = files.get(name)
    if extent_storage is None:
        with _naming_the_descriptor(storage, line, line.filename):
            options = builder.given_storage_options.__replace__(filename=name, writable=builder.writable)
            extent_storage = files[name] = await gate.open_storage(options)
        opened.append(extent_storage)
    where = line.where(descriptor)
    if line.type in FLAT_TYPES:
        start = line.start_sector * SECTOR
        if start + size > extent_storage.size:
            raise CorruptImageError(
                extent_storage.filename,
                start,
                f"the extent ({size} bytes from {start:#x}) is longer than its file "
                f"({extent_storage.size} bytes): {where}",
            )
        return FlatExtent(extent_storage, size, start, line.type.value)
    if line.type is ExtentType.SESPARSE:
        return await open_sesparse_extent(extent_storage, size, builder.budget, where)
    assert line.type in SPARSE_TYPES
    head = await _read(extent_storage, 0, _HEAD_BYTES)
    if head[:4] == KDMV_MAGIC:
        layout = await _kdmv_layout(extent_storage, head)
    elif head[:4] == COWD_MAGIC:
        layout = parse_cowd(head, extent_storage.size, extent_storage.filename)
    else:
        raise CorruptImageError(extent_storage.filename, 0, f"not a sparse extent (no KDMV or COWD magic): {where}")
    if layout.capacity != size:
        raise CorruptImageError(
            extent_storage.filename,
            12,
            f"the extent's capacity ({layout.capacity // SECTOR} sectors) differs from its size in the descriptor: "
            f"{where}",
        )
    return await _sparse_extent(builder, extent_storage, layout, line.type.value)


async def _open_parent(
    builder: FormatDriverBuilder[Vmdk], gate: ImplicitOpenGate, storage: Storage, hint: str, parent_cid: int
) -> FormatAccess:
    from .driver import Vmdk

    parent = await open_named_image(builder, gate, storage, hint, Vmdk, role="parent, parentFileNameHint,")
    if parent.cid != parent_cid:
        await parent.close()
        raise CorruptImageError(
            storage.filename,
            None,
            f"the parent {hint!r} has CID {parent.cid:08x}, but the image expects parentCID {parent_cid:08x} "
            "(the parent changed since this delta was made)",
        )
    return FormatAccess(parent)


@contextlib.contextmanager
def _naming_the_descriptor(storage: Storage, line: ExtentLine, recorded: str) -> Iterator[None]:
    """A gate's refusal of an extent file also names the descriptor line that names it."""
    try:
        yield
    except ImplicitOpenDeniedError as error:
        raise ImplicitOpenDeniedError(
            error.filename, f"{error.reason} (the extent on {line.where(storage.filename)})", allowable=error.allowable
        ) from error
