"""Sparse extent headers: hosted sparse (``KDMV``, versions 1-3, with its footer) and VMFS sparse (``COWD``).

Both are reduced to one :class:`SparseLayout`: the extent's capacity, its grain size, the
grain directory (where, how many entries, entries per grain table) and the flags that change
how grains are read. Every field that sizes memory or work is checked here, before any table
is read: grain sizes of 0 or over 1 GiB, more than 512 entries per grain table, a grain
directory of more than 32 Mi entries, tables or descriptors outside the file.
"""

from __future__ import annotations

import struct

from imago import CorruptImageError, Record, UnsupportedFeatureError

from .descriptor import MAX_DESCRIPTOR_BYTES

__all__ = [
    "COWD_MAGIC",
    "KDMV_MAGIC",
    "SECTOR",
    "SparseLayout",
    "parse_cowd",
    "parse_kdmv",
]

SECTOR = 512
KDMV_MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_DEFLATE = 1
#: ``gdOffset`` of a stream-optimized image whose grain directory follows the grains (footer).
GD_AT_END = 0xFFFFFFFFFFFFFFFF

# Sizes beyond which a header is refused (QEMU's limits).
MAX_GRAIN_SECTORS = 0x200000  # 1 GiB
MAX_GTES_PER_GT = 512
MAX_GD_ENTRIES = 32 * 1024 * 1024
COWD_GTES_PER_GT = 4096

# magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize, numGTEsPerGT,
# rgdOffset, gdOffset, overHead, uncleanShutdown, the four line-ending check bytes, compressAlgorithm.
_KDMV = struct.Struct("<4sIIQQQQIQQQB4sH")
# magic, version, flags, disk sectors, granularity, L1 directory offset and size, file sectors,
# cylinders, heads, sectors per track.
_COWD = struct.Struct("<4s10I")
# A stream marker: value (LBA or sector count), size, type (for metadata markers, size is 0).
_MARKER = struct.Struct("<QII")
MARKER_END_OF_STREAM = 0
MARKER_FOOTER = 3


class SparseLayout(Record):
    """What reading a sparse extent needs to know; offsets and sizes in bytes unless named sectors."""

    __slots__ = (
        "capacity",
        "compressed",
        "descriptor_offset",
        "descriptor_size",
        "gd_entries",
        "gd_offset",
        "grain_size",
        "gtes_per_gt",
        "has_markers",
        "kind",
        "overhead",
        "rgd_offset",
        "version",
        "zero_grain",
    )

    kind: str
    version: int
    capacity: int
    grain_size: int
    gtes_per_gt: int
    gd_offset: int
    rgd_offset: int
    gd_entries: int
    overhead: int
    compressed: bool
    has_markers: bool
    zero_grain: bool
    descriptor_offset: int
    descriptor_size: int

    def __init__(self, **fields: object) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, fields[name])

    @property
    def gt_coverage(self) -> int:
        """Guest bytes one grain table covers."""
        return self.gtes_per_gt * self.grain_size


def _check_grain(grain_sectors: int, filename: str | None, at: int) -> None:
    if grain_sectors == 0 or grain_sectors > MAX_GRAIN_SECTORS:
        raise CorruptImageError(
            filename, at, f"invalid grain size of {grain_sectors} sectors (1 to {MAX_GRAIN_SECTORS} allowed)"
        )


def _gd_entries(capacity_sectors: int, coverage_sectors: int, filename: str | None) -> int:
    entries = -(-capacity_sectors // coverage_sectors)
    if entries > MAX_GD_ENTRIES:
        raise CorruptImageError(
            filename,
            12,
            f"the capacity needs {entries} grain directory entries, more than {MAX_GD_ENTRIES}",
        )
    return entries


def _check_inside(filename: str | None, what: str, offset: int, length: int, file_size: int, at: int) -> None:
    if offset + length > file_size:
        raise CorruptImageError(
            filename, at, f"{what} ({length} bytes at {offset:#x}) lies past the end of the file ({file_size} bytes)"
        )


def parse_kdmv(head: bytes, footer: bytes | None, file_size: int, filename: str | None) -> SparseLayout:
    """Parse a hosted sparse header (the first sector *head*; *footer*: the last 1536 bytes, if needed).

    *footer* is asked for (``None`` given) by raising ``LookupError`` when the header's
    ``gdOffset`` says the grain directory lies at the end; the caller reads it and calls again.
    """
    if len(head) < _KDMV.size:
        raise CorruptImageError(filename, 0, f"the file ({file_size} bytes) is shorter than a sparse header")
    fields = _KDMV.unpack_from(head)
    header = fields
    if fields[9] == GD_AT_END:
        if footer is None:
            raise LookupError("footer")
        header = _footer_header(footer, file_size, filename)
        # The footer takes precedence; both must describe the same disk.
        for index, name in ((3, "capacity"), (4, "grainSize"), (7, "numGTEsPerGT")):
            if fields[index] != header[index]:
                raise CorruptImageError(
                    filename,
                    file_size - 1024,
                    f"the footer's {name} ({header[index]}) differs from the header's ({fields[index]})",
                )
        if header[9] == GD_AT_END:
            raise CorruptImageError(filename, file_size - 1024, "the footer does not say where the grain directory is")
    _, version, flags, capacity, grain, desc_offset, desc_size, gtes, rgd, gd, overhead, _, check, algorithm = header
    if not 1 <= version <= 3:
        raise UnsupportedFeatureError(f"VMDK sparse extent version {version}", filename)
    if flags & FLAG_NL_DETECT and check != b"\n \r\n":
        raise CorruptImageError(filename, 73, "the line-ending check bytes are damaged (a text-mode transfer?)")
    if algorithm not in (0, COMPRESSION_DEFLATE):
        raise UnsupportedFeatureError(f"VMDK compression algorithm {algorithm}", filename)
    if gtes == 0 or gtes > MAX_GTES_PER_GT:
        raise CorruptImageError(filename, 44, f"{gtes} entries per grain table (1 to {MAX_GTES_PER_GT} allowed)")
    _check_grain(grain, filename, 20)
    if overhead > -(-file_size // SECTOR):
        raise CorruptImageError(
            filename,
            64,
            f"the file is truncated: the grains start at sector {overhead}, past its end ({file_size} bytes)",
        )
    entries = _gd_entries(capacity, gtes * grain, filename)
    gd_bytes = entries * 4
    if entries:
        _check_inside(filename, "the grain directory", gd * SECTOR, gd_bytes, file_size, 56)
        if flags & FLAG_RGD and rgd:
            _check_inside(filename, "the redundant grain directory", rgd * SECTOR, gd_bytes, file_size, 48)
    if desc_size * SECTOR > MAX_DESCRIPTOR_BYTES:
        raise CorruptImageError(
            filename, 36, f"the embedded descriptor is {desc_size} sectors long, more than {MAX_DESCRIPTOR_BYTES} bytes"
        )
    if desc_offset:
        _check_inside(filename, "the embedded descriptor", desc_offset * SECTOR, desc_size * SECTOR, file_size, 28)
    return SparseLayout(
        kind="KDMV",
        version=version,
        capacity=capacity * SECTOR,
        grain_size=grain * SECTOR,
        gtes_per_gt=gtes,
        gd_offset=gd * SECTOR,
        rgd_offset=rgd * SECTOR if flags & FLAG_RGD else 0,
        gd_entries=entries,
        overhead=overhead * SECTOR,
        compressed=algorithm == COMPRESSION_DEFLATE,
        has_markers=bool(flags & FLAG_MARKERS),
        zero_grain=bool(flags & FLAG_ZERO_GRAIN),
        descriptor_offset=desc_offset * SECTOR,
        descriptor_size=desc_size * SECTOR,
    )


def footer_offset(file_size: int) -> int:
    """Where the footer's marker starts: three sectors before the end (marker, header, end of stream)."""
    return -(-file_size // SECTOR) * SECTOR - 3 * SECTOR


def _footer_header(footer: bytes, file_size: int, filename: str | None) -> tuple[object, ...]:
    at = footer_offset(file_size)
    if at < SECTOR or len(footer) < 3 * SECTOR:
        raise CorruptImageError(filename, at, "the file is too short for the footer its header announces")
    _, size, marker_type = _MARKER.unpack_from(footer, 0)
    value, end_size, end_type = _MARKER.unpack_from(footer, 2 * SECTOR)
    if footer[SECTOR : SECTOR + 4] != KDMV_MAGIC or size != 0 or marker_type != MARKER_FOOTER:
        raise CorruptImageError(filename, at, "invalid footer (no footer marker and header copy before the end)")
    if value != 0 or end_size != 0 or end_type != MARKER_END_OF_STREAM:
        raise CorruptImageError(filename, at + 2 * SECTOR, "invalid footer (no end-of-stream marker after it)")
    return _KDMV.unpack_from(footer, SECTOR)


def parse_cowd(head: bytes, file_size: int, filename: str | None) -> SparseLayout:
    """Parse a VMFS sparse (``COWD``) header: 4096 entries per grain table, no compression."""
    if len(head) < _COWD.size:
        raise CorruptImageError(filename, 0, f"the file ({file_size} bytes) is shorter than a COWD header")
    _, version, _flags, capacity, grain, gd, gd_size, *_ = _COWD.unpack_from(head)
    _check_grain(grain, filename, 16)
    entries = _gd_entries(capacity, COWD_GTES_PER_GT * grain, filename)
    if gd_size < entries:
        raise CorruptImageError(
            filename, 24, f"the grain directory has {gd_size} entries; the capacity needs {entries}"
        )
    if gd_size > MAX_GD_ENTRIES:
        raise CorruptImageError(filename, 24, f"the grain directory has {gd_size} entries, more than {MAX_GD_ENTRIES}")
    if entries:
        _check_inside(filename, "the grain directory", gd * SECTOR, entries * 4, file_size, 20)
    return SparseLayout(
        kind="COWD",
        version=version,
        capacity=capacity * SECTOR,
        grain_size=grain * SECTOR,
        gtes_per_gt=COWD_GTES_PER_GT,
        gd_offset=gd * SECTOR,
        rgd_offset=0,
        gd_entries=entries,
        overhead=0,
        compressed=False,
        has_markers=False,
        zero_grain=False,
        descriptor_offset=0,
        descriptor_size=0,
    )
