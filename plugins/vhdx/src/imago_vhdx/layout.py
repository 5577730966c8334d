"""The fixed parts of a VHDX file: file identifier, headers, region table, metadata table and items.

Every structure is parsed from bytes and validated here, with refusals naming the file offset;
nothing in this module does I/O. GUIDs are stored in Microsoft's mixed-endian layout
(``uuid.UUID.bytes_le``).
"""

from __future__ import annotations

import itertools
import struct
import uuid

from imago import CorruptImageError, Record, UnsupportedFeatureError

__all__ = [
    "FILE_PARAMETERS",
    "LOGICAL_SECTOR_SIZE",
    "PHYSICAL_SECTOR_SIZE",
    "REGION_TABLE_SIZE",
    "VIRTUAL_DISK_ID",
    "VIRTUAL_DISK_SIZE",
    "PARENT_LOCATOR",
    "VHDX_PARENT_LOCATOR_TYPE",
    "BAT_GUID",
    "HEADER_OFFSETS",
    "MAX_BLOCK_SIZE",
    "MAX_DISK_SIZE",
    "METADATA_GUID",
    "MIN_BLOCK_SIZE",
    "MiB",
    "REGION_OFFSETS",
    "SIGNATURE",
    "Header",
    "Metadata",
    "ParentLocator",
    "Region",
    "checksum",
    "parse_header",
    "parse_metadata",
    "parse_region_table",
    "with_checksum",
]

KiB = 1024
MiB = 1024 * KiB
SIGNATURE = b"vhdxfile"
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
MAX_ENTRIES = 2047
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
MAX_DISK_SIZE = 64 * 1024**4

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
_REGION_HEADER = struct.Struct("<4sIII")
_REGION_ENTRY = struct.Struct("<16sQII")
_METADATA_HEADER = struct.Struct("<8sHH20x")
_METADATA_ENTRY = struct.Struct("<16sIII4x")


def checksum(data: bytes | bytearray | memoryview, at: int) -> int:
    """CRC-32C of *data* with its 4-byte checksum field at *at* taken as zero."""
    import crc32c  # (here: the package imports importlib.metadata, which probing other formats need not pay)

    value = crc32c.crc32c(bytes(data[:at]))
    value = crc32c.crc32c(b"\0\0\0\0", value)
    return int(crc32c.crc32c(bytes(data[at + 4 :]), value))


def with_checksum(data: bytearray, at: int) -> bytearray:
    """*data* with its checksum field at *at* filled in."""
    struct.pack_into("<I", data, at, checksum(data, at))
    return data


class Header(Record):
    """One of the two headers."""

    __slots__ = (
        "data_write_guid",
        "file_write_guid",
        "log_guid",
        "log_length",
        "log_offset",
        "sequence",
        "slot",
    )

    slot: int
    sequence: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_length: int
    log_offset: int

    def __init__(self, **fields: object) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, fields[name])

    def encode(self) -> bytearray:
        """The header's 4 KiB, checksum included."""
        data = bytearray(HEADER_SIZE)
        _HEADER.pack_into(
            data,
            0,
            b"head",
            0,
            self.sequence,
            self.file_write_guid.bytes_le,
            self.data_write_guid.bytes_le,
            self.log_guid.bytes_le,
            0,
            1,
            self.log_length,
            self.log_offset,
        )
        return with_checksum(data, 4)


def parse_header(data: bytes, slot: int, file_size: int, filename: str | None) -> Header | None:
    """Header *slot* (0 or 1) if its signature and checksum hold; ``None`` otherwise.

    A header whose checksum holds but whose fields are impossible is refused outright: it would
    be chosen.
    """
    at = HEADER_OFFSETS[slot]
    if len(data) < HEADER_SIZE or data[:4] != b"head":
        return None
    stored = struct.unpack_from("<I", data, 4)[0]
    if checksum(data[:HEADER_SIZE], 4) != stored:
        return None
    _, _, sequence, fwg, dwg, lg, log_version, version, log_length, log_offset = _HEADER.unpack_from(data)
    if version != 1:
        raise UnsupportedFeatureError(f"VHDX header version {version} (header {slot + 1})", filename)
    if log_version != 0:
        raise UnsupportedFeatureError(f"VHDX log version {log_version} (header {slot + 1})", filename)
    if log_offset % MiB or log_length % MiB or log_offset < MiB:
        raise CorruptImageError(
            filename, at, f"the log ({log_length} bytes at {log_offset:#x}) is not aligned to 1 MiB past the headers"
        )
    if log_offset + log_length > file_size:
        raise CorruptImageError(
            filename, at, f"the log ({log_length} bytes at {log_offset:#x}) ends past the end of the file"
        )
    return Header(
        slot=slot,
        sequence=sequence,
        file_write_guid=uuid.UUID(bytes_le=fwg),
        data_write_guid=uuid.UUID(bytes_le=dwg),
        log_guid=uuid.UUID(bytes_le=lg),
        log_length=log_length,
        log_offset=log_offset,
    )


class Region(Record):
    """A region table entry: the BAT or the metadata region."""

    __slots__ = ("guid", "length", "offset", "required")

    guid: uuid.UUID
    offset: int
    length: int
    required: bool

    def __init__(self, guid: uuid.UUID, offset: int, length: int, required: bool) -> None:
        object.__setattr__(self, "guid", guid)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "length", length)
        object.__setattr__(self, "required", required)


def parse_region_table(data: bytes, at: int, filename: str | None) -> dict[uuid.UUID, Region] | None:
    """The regions of the table at file offset *at*; ``None`` if its signature or checksum fails."""
    if len(data) < REGION_TABLE_SIZE or data[:4] != b"regi":
        return None
    signature, stored, count, _ = _REGION_HEADER.unpack_from(data)
    del signature
    if checksum(data[:REGION_TABLE_SIZE], 4) != stored:
        return None
    if count > MAX_ENTRIES:
        raise CorruptImageError(filename, at + 8, f"the region table has {count} entries, more than {MAX_ENTRIES}")
    regions: dict[uuid.UUID, Region] = {}
    for index in range(count):
        where = at + _REGION_HEADER.size + index * _REGION_ENTRY.size
        guid_bytes, offset, length, flags = _REGION_ENTRY.unpack_from(data, where - at)
        guid = uuid.UUID(bytes_le=guid_bytes)
        region = Region(guid, offset, length, bool(flags & 1))
        if offset % MiB or length % MiB or offset < MiB or length == 0:
            raise CorruptImageError(
                filename, where, f"region {guid} ({length} bytes at {offset:#x}) is not 1 MiB-aligned past the headers"
            )
        if guid in regions:
            raise CorruptImageError(filename, where, f"region {guid} is listed twice")
        if guid not in (BAT_GUID, METADATA_GUID) and region.required:
            raise UnsupportedFeatureError(f"VHDX required region {guid}", filename)
        regions[guid] = region
    for guid in (BAT_GUID, METADATA_GUID):
        if guid not in regions:
            name = "BAT" if guid == BAT_GUID else "metadata"
            raise CorruptImageError(filename, at, f"the region table has no {name} region")
    return regions


class ParentLocator(Record):
    """The parent locator's entries (key -> value, decoded from UTF-16)."""

    __slots__ = ("entries",)

    entries: dict[str, str]

    def __init__(self, entries: dict[str, str]) -> None:
        object.__setattr__(self, "entries", entries)


class Metadata(Record):
    """The metadata items that matter: block size, sizes, disk id, parent locator."""

    __slots__ = (
        "block_size",
        "disk_id",
        "has_parent",
        "leave_blocks_allocated",
        "logical_sector_size",
        "parent_locator",
        "physical_sector_size",
        "virtual_size",
    )

    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    disk_id: uuid.UUID
    logical_sector_size: int
    physical_sector_size: int
    parent_locator: ParentLocator | None

    def __init__(self, **fields: object) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, fields[name])


def parse_metadata(region: bytes, at: int, filename: str | None) -> Metadata:
    """The metadata region *region* (read whole, at file offset *at*), validated."""
    if region[:8] != b"metadata":
        raise CorruptImageError(filename, at, "the metadata table has no 'metadata' signature")
    _, _, count = _METADATA_HEADER.unpack_from(region)
    if count > MAX_ENTRIES:
        raise CorruptImageError(filename, at + 10, f"the metadata table has {count} entries, more than {MAX_ENTRIES}")
    items: dict[uuid.UUID, bytes] = {}
    spans: list[tuple[int, int, int]] = []
    for index in range(count):
        where = at + _METADATA_HEADER.size + index * _METADATA_ENTRY.size
        guid_bytes, offset, length, flags = _METADATA_ENTRY.unpack_from(region, where - at)
        guid = uuid.UUID(bytes_le=guid_bytes)
        if length and (offset < METADATA_TABLE_SIZE or offset + length > len(region)):
            raise CorruptImageError(
                filename,
                where,
                f"metadata item {guid} ({length} bytes at {offset:#x}) lies outside the metadata region's data area",
            )
        if guid in items:
            raise CorruptImageError(filename, where, f"metadata item {guid} is listed twice")
        if guid not in _KNOWN_ITEMS and flags & 4:
            raise UnsupportedFeatureError(f"VHDX required metadata item {guid}", filename)
        items[guid] = region[offset : offset + length]
        if length:
            spans.append((offset, offset + length, where))
    spans.sort()
    for (_, end, _), (start, _, where) in itertools.pairwise(spans):
        if start < end:
            raise CorruptImageError(filename, where, "metadata items overlap")

    def item(guid: uuid.UUID, name: str, size: int) -> bytes:
        data = items.get(guid)
        if data is None:
            raise CorruptImageError(filename, at, f"the metadata has no {name} item")
        if len(data) < size:
            raise CorruptImageError(filename, at, f"the {name} item is {len(data)} bytes long, not {size}")
        return data

    block_size, param_flags = struct.unpack_from("<II", item(FILE_PARAMETERS, "file parameters", 8))
    (virtual_size,) = struct.unpack_from("<Q", item(VIRTUAL_DISK_SIZE, "virtual disk size", 8))
    disk_id = uuid.UUID(bytes_le=item(VIRTUAL_DISK_ID, "virtual disk id", 16)[:16])
    (logical,) = struct.unpack_from("<I", item(LOGICAL_SECTOR_SIZE, "logical sector size", 4))
    (physical,) = struct.unpack_from("<I", item(PHYSICAL_SECTOR_SIZE, "physical sector size", 4))
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise CorruptImageError(
            filename, at, f"block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )
    if logical not in (512, 4096):
        # (CVE-2014-0148: the chunk ratio divides by what this and the block size make.)
        raise CorruptImageError(filename, at, f"logical sector size {logical} is neither 512 nor 4096")
    if physical not in (512, 4096):
        raise CorruptImageError(filename, at, f"physical sector size {physical} is neither 512 nor 4096")
    if virtual_size > MAX_DISK_SIZE or virtual_size % logical:
        raise CorruptImageError(
            filename, at, f"virtual size {virtual_size} is not a multiple of {logical} up to 64 TiB"
        )
    has_parent = bool(param_flags & 2)
    locator = None
    if has_parent:
        locator = _parse_locator(items.get(PARENT_LOCATOR), at, filename)
    return Metadata(
        block_size=block_size,
        leave_blocks_allocated=bool(param_flags & 1),
        has_parent=has_parent,
        virtual_size=virtual_size,
        disk_id=disk_id,
        logical_sector_size=logical,
        physical_sector_size=physical,
        parent_locator=locator,
    )


_KNOWN_ITEMS = frozenset(
    {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, VIRTUAL_DISK_ID, LOGICAL_SECTOR_SIZE, PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR}
)
_LOCATOR_HEADER = struct.Struct("<16s2xH")
_LOCATOR_ENTRY = struct.Struct("<IIHH")


def _parse_locator(data: bytes | None, at: int, filename: str | None) -> ParentLocator:
    if data is None or len(data) < _LOCATOR_HEADER.size:
        raise CorruptImageError(filename, at, "a differencing image without a parent locator")
    type_bytes, count = _LOCATOR_HEADER.unpack_from(data)
    if uuid.UUID(bytes_le=type_bytes) != VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedFeatureError(f"VHDX parent locator type {uuid.UUID(bytes_le=type_bytes)}", filename)
    if _LOCATOR_HEADER.size + count * _LOCATOR_ENTRY.size > len(data):
        raise CorruptImageError(filename, at, f"the parent locator's {count} entries do not fit in it")
    entries: dict[str, str] = {}
    for index in range(count):
        key_at, value_at, key_len, value_len = _LOCATOR_ENTRY.unpack_from(
            data, _LOCATOR_HEADER.size + index * _LOCATOR_ENTRY.size
        )
        if key_at + key_len > len(data) or value_at + value_len > len(data):
            raise CorruptImageError(filename, at, f"parent locator entry {index} lies outside the locator")
        try:
            key = data[key_at : key_at + key_len].decode("utf-16-le")
            value = data[value_at : value_at + value_len].decode("utf-16-le")
        except UnicodeDecodeError as error:
            raise CorruptImageError(filename, at, f"parent locator entry {index} is not UTF-16: {error}") from None
        if key in entries:
            raise CorruptImageError(filename, at, f"parent locator key {key!r} appears twice")
        entries[key] = value
    return ParentLocator(entries)
