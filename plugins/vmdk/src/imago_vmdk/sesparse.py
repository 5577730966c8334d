"""seSparse extents (ESXi's space-efficient sparse snapshots), read-only as QEMU reads them.

An seSparse extent file starts with a constant header (magic ``0xcafebabe``, version
``0x200000001``, sizes and offsets in sectors of its regions) and names a volatile header
(magic ``0xcafecafe``; a journal to replay means the image is dirty). Grains are 4 KiB (8
sectors) and grain tables 32 KiB (4096 64-bit entries, 16 MiB of disk each). Every entry keeps
its type in its top nibble:

- grain directory: ``0`` no table, ``0x1`` plus the table's index in the grain tables region
  in the low 32 bits (the rest must be zero);
- grain table: ``0`` unallocated (the parent's data), ``0x1`` unmapped by the guest (SCSI
  UNMAP) and ``0x2`` zeroed, both reading as zeroes, ``0x3`` allocated: the grain's index in
  the grains region, its 12 low bits stored in bits 48-59 and the rest in bits 0-47.

QEMU's strict header checks are kept (the format is not documented: anything unexpected is
refused). Beyond QEMU, regions must not overlap the header or each other, and every table
and grain an entry names must lie inside its region and inside the file; refusals name the
file and offset. Writing is refused, as in QEMU.
"""

from __future__ import annotations

import struct
import sys
from array import array

from imago import CorruptImageError, MemoryBudget, MetadataCache, Record, Storage, UnsupportedFeatureError

from .extents import Extent, Run, RunKind
from .header import SECTOR

__all__ = [
    "GRAIN_SIZE",
    "GT_COVERAGE",
    "GTES_PER_GT",
    "SeSparseExtent",
    "SeSparseLayout",
    "check_volatile_header",
    "open_sesparse_extent",
    "parse_const_header",
]

CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
VERSION = 0x0000000200000001
#: The only grain size (in sectors) and grain table size (in sectors) QEMU and ESXi use.
GRAIN_SECTORS = 8
GT_SECTORS = 64
GRAIN_SIZE = GRAIN_SECTORS * SECTOR
GTES_PER_GT = GT_SECTORS * SECTOR // 8
GT_BYTES = GT_SECTORS * SECTOR
#: Guest bytes one grain table covers (16 MiB).
GT_COVERAGE = GTES_PER_GT * GRAIN_SIZE
#: At most this many grain directory entries (QEMU's limit on L1 tables: 64 TiB at 4 KiB grains).
MAX_GD_ENTRIES = 32 * 1024 * 1024

TYPE_MASK = 0xF000_0000_0000_0000
GD_ALLOCATED = 0x1000_0000
GTE_UNMAPPED = 0x1000_0000_0000_0000
GTE_ZERO = 0x2000_0000_0000_0000
GTE_ALLOCATED = 0x3000_0000_0000_0000

# magic, version, capacity, grain size, grain table size, flags, four reserved words, then
# (offset, size) of: volatile header, journal header, journal, grain directory, grain tables,
# free bitmap, back map, grains; 304 bytes of padding to the end of the sector.
_CONST = struct.Struct("<26Q")
_CONST_PAD = slice(_CONST.size, SECTOR)
# magic, free grain table number, next transaction sequence number, replay journal; padding.
_VOLATILE = struct.Struct("<4Q")

# Byte offsets of the constant header's fields, for messages.
_AT_VERSION = 8
_AT_CAPACITY = 16
_AT_GRAIN = 24
_AT_GT_SIZE = 32
_AT_FLAGS = 40
_AT_RESERVED = 48
_AT_VOLATILE = 80
_AT_GD = 128
_AT_TABLES = 144
_AT_GRAINS = 192


class SeSparseLayout(Record):
    """An seSparse extent's geometry, in bytes: capacity and the regions the reader uses."""

    __slots__ = (
        "capacity",
        "gd_entries",
        "gd_offset",
        "grains_offset",
        "grains_size",
        "tables_offset",
        "tables_size",
        "volatile_offset",
    )

    capacity: int
    volatile_offset: int
    gd_offset: int
    #: Entries the grain directory records (its size); only those the capacity needs are read.
    gd_entries: int
    tables_offset: int
    tables_size: int
    grains_offset: int
    grains_size: int

    def __init__(self, **fields: int) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, fields[name])

    @property
    def needed_entries(self) -> int:
        """Grain directory entries the capacity needs (one per 16 MiB)."""
        return -(-self.capacity // GT_COVERAGE)


def parse_const_header(head: bytes, file_size: int, filename: str | None) -> SeSparseLayout:
    """Parse and check the constant header (the first sector, *head*) of an seSparse extent.

    QEMU's checks (magic, version, 8-sector grains, 64-sector tables, no flags, zero reserved
    words and padding), then bounds: the grain directory within 32 Mi entries, no region
    over the header or another region, the volatile header inside the file.
    """
    if len(head) < SECTOR:
        raise CorruptImageError(filename, 0, f"the file ({file_size} bytes) is shorter than an seSparse header")
    fields = _CONST.unpack_from(head)
    magic, version, capacity, grain, gt_size, flags, *reserved = fields[:10]
    regions = fields[10:]
    if magic != CONST_MAGIC:
        raise CorruptImageError(filename, 0, f"bad seSparse header magic {magic:#018x}")
    if version != VERSION:
        raise UnsupportedFeatureError(f"seSparse version {version:#018x} (at offset {_AT_VERSION})", filename)
    if grain != GRAIN_SECTORS:
        raise UnsupportedFeatureError(
            f"seSparse grain size of {grain} sectors (only {GRAIN_SECTORS}; at offset {_AT_GRAIN})", filename
        )
    if gt_size != GT_SECTORS:
        raise UnsupportedFeatureError(
            f"seSparse grain table size of {gt_size} sectors (only {GT_SECTORS}; at offset {_AT_GT_SIZE})", filename
        )
    if flags:
        raise UnsupportedFeatureError(f"seSparse flags {flags:#x} (at offset {_AT_FLAGS})", filename)
    if any(reserved):
        raise UnsupportedFeatureError(f"seSparse reserved fields set (at offset {_AT_RESERVED})", filename)
    if any(head[_CONST_PAD]):
        raise UnsupportedFeatureError(f"seSparse header padding that is not zero (at offset {_CONST.size})", filename)
    # (The journal, free bitmap and back map serve writers only.)
    volatile, gd, gd_size, tables, tables_size = regions[0], regions[6], regions[7], regions[8], regions[9]
    grains, grains_size = regions[14], regions[15]
    gd_entries = gd_size * SECTOR // 8
    if gd_entries > MAX_GD_ENTRIES:
        raise CorruptImageError(
            filename, _AT_GD + 8, f"the grain directory has {gd_entries} entries, more than {MAX_GD_ENTRIES}"
        )
    needed = -(-capacity // (GTES_PER_GT * GRAIN_SECTORS))
    if needed > MAX_GD_ENTRIES:
        raise CorruptImageError(
            filename,
            _AT_CAPACITY,
            f"the capacity ({capacity} sectors) needs {needed} grain tables, more than {MAX_GD_ENTRIES}",
        )
    areas = (
        ("the volatile header", _AT_VOLATILE, volatile, 1),
        ("the grain directory", _AT_GD, gd, gd_size),
        ("the grain tables", _AT_TABLES, tables, tables_size),
        ("the grains", _AT_GRAINS, grains, grains_size),
    )
    for name, at, start, _length in areas:
        if start < 1:
            raise CorruptImageError(filename, at, f"{name} (at sector {start}) overlap the header")
    for index, (name, at, start, length) in enumerate(areas):
        for other, _, other_start, other_length in areas[index + 1 :]:
            if start < other_start + other_length and other_start < start + length:
                raise CorruptImageError(
                    filename,
                    at,
                    f"{name} (sectors {start}+{length}) and {other} (sectors {other_start}+{other_length}) overlap",
                )
    if (volatile + 1) * SECTOR > file_size:
        raise CorruptImageError(
            filename, _AT_VOLATILE, f"the volatile header (sector {volatile}) lies past the end of the file"
        )
    return SeSparseLayout(
        capacity=capacity * SECTOR,
        volatile_offset=volatile * SECTOR,
        gd_offset=gd * SECTOR,
        gd_entries=gd_entries,
        tables_offset=tables * SECTOR,
        tables_size=tables_size * SECTOR,
        grains_offset=grains * SECTOR,
        grains_size=grains_size * SECTOR,
    )


def check_volatile_header(data: bytes, offset: int, filename: str | None) -> None:
    """Check the volatile header (*data*, read at *offset*): its magic, no journal to replay, zero padding."""
    magic, _free_gt, _next_txn, replay = _VOLATILE.unpack_from(data)
    if magic != VOLATILE_MAGIC:
        raise CorruptImageError(filename, offset, f"bad seSparse volatile header magic {magic:#018x}")
    if replay:
        raise UnsupportedFeatureError(
            f"seSparse extents whose journal must be replayed (the image is dirty; at offset {offset + 24})", filename
        )
    if any(data[_VOLATILE.size : SECTOR]):
        raise UnsupportedFeatureError(
            f"seSparse volatile header padding that is not zero (at offset {offset + _VOLATILE.size})", filename
        )


def _entries(raw: bytes | bytearray) -> array[int]:
    table = array("Q", raw)
    if sys.byteorder == "big":
        table.byteswap()
    return table


class SeSparseExtent(Extent):
    """An seSparse extent in *storage*: the grain directory held whole, grain tables through a cache.

    Read-only: it has no writer, so the driver refuses writes to images holding one.
    """

    grain_size = GRAIN_SIZE

    def __init__(self, storage: Storage, layout: SeSparseLayout, directory: array[int], budget: MemoryBudget) -> None:
        super().__init__(layout.capacity, "SESPARSE")
        self.storage = storage
        self.layout = layout
        self._directory = directory
        self._filename = storage.filename
        self._file_size = storage.size
        self._tables: MetadataCache[int, array[int]] = MetadataCache(
            None,
            self._load_table,
            budget=budget,
            entry_size=GT_BYTES,
            name=f"the grain table cache of {storage.filename or 'the image'}",
        )

    async def _load_table(self, offset: int) -> array[int]:
        if offset + GT_BYTES > self._file_size:
            raise CorruptImageError(
                self._filename,
                offset,
                f"a grain table ({GT_BYTES} bytes at {offset:#x}) lies past the end of the file "
                f"({self._file_size} bytes)",
            )
        raw = bytearray(GT_BYTES)
        assert self.storage is not None
        await self.storage.readv([memoryview(raw)], offset)
        return _entries(raw)

    def _table_offset(self, index: int) -> int:
        """Where the grain table of directory entry *index* lies (0: none), the entry checked."""
        if index >= len(self._directory):
            raise CorruptImageError(
                self._filename,
                self.layout.gd_offset,
                f"the grain directory has {len(self._directory)} entries; guest offset {index * GT_COVERAGE:#x} "
                "needs more",
            )
        entry = self._directory[index]
        if entry == 0:
            return 0
        at = self.layout.gd_offset + 8 * index
        if entry >> 32 != GD_ALLOCATED:
            raise CorruptImageError(self._filename, at, f"invalid grain directory entry {entry:#018x}")
        table = entry & 0xFFFF_FFFF
        if (table + 1) * GT_BYTES > self.layout.tables_size:
            raise CorruptImageError(
                self._filename,
                at,
                f"grain directory entry {index} names grain table {table}, past the grain tables area "
                f"({self.layout.tables_size} bytes)",
            )
        return self.layout.tables_offset + table * GT_BYTES

    def _classify(self, entry: int, guest_offset: int, at: int) -> tuple[RunKind, int]:
        """The kind and host offset of the grain a table *entry* (at *at* in the file) describes."""
        kind = entry & TYPE_MASK
        if kind == GTE_ALLOCATED:
            grain = ((entry >> 48) & 0xFFF) | ((entry & 0xFFFF_FFFF_FFFF) << 12)
            if (grain + 1) * GRAIN_SIZE > self.layout.grains_size:
                raise CorruptImageError(
                    self._filename,
                    at,
                    f"the grain of guest offset {guest_offset:#x} (grain {grain}) lies past the grains area "
                    f"({self.layout.grains_size} bytes)",
                )
            host = self.layout.grains_offset + grain * GRAIN_SIZE
            if host + GRAIN_SIZE > self._file_size:
                raise CorruptImageError(
                    self._filename,
                    at,
                    f"the grain of guest offset {guest_offset:#x} ({host:#x}) lies past the end of the file "
                    f"({self._file_size} bytes)",
                )
            return RunKind.DATA, host
        if kind in (GTE_ZERO, GTE_UNMAPPED):
            return RunKind.ZERO, 0
        if entry == 0:
            return RunKind.UNALLOCATED, 0
        raise CorruptImageError(
            self._filename, at, f"invalid grain table entry {entry:#018x} for guest offset {guest_offset:#x}"
        )

    async def lookup(self, offset: int, length: int) -> Run:
        """The run at *offset*: grains of one kind (contiguous on the host for data), within one grain table.

        A damaged entry after the first ends the run instead of failing it: only reading that
        grain fails (as in QEMU).
        """
        end = min(offset + length, self.size)
        index = offset // GT_COVERAGE
        table_at = self._table_offset(index)
        if table_at == 0:
            stop = (index + 1) * GT_COVERAGE
            entries = len(self._directory)
            while stop < end and stop // GT_COVERAGE < entries and self._directory[stop // GT_COVERAGE] == 0:
                stop += GT_COVERAGE
            return Run(RunKind.UNALLOCATED, 0, min(stop, end) - offset)
        table = await self._tables.get(table_at)
        table_start = index * GT_COVERAGE
        first = (offset - table_start) // GRAIN_SIZE
        kind, host = self._classify(table[first], offset, table_at + 8 * first)
        position = table_start + (first + 1) * GRAIN_SIZE
        stop = min(end, table_start + GT_COVERAGE)
        next_host = host + GRAIN_SIZE
        entry_index = first + 1
        while position < stop:
            try:
                next_kind, next_at = self._classify(table[entry_index], position, table_at + 8 * entry_index)
            except CorruptImageError:
                break
            if next_kind is not kind or (kind is RunKind.DATA and next_at != next_host):
                break
            position += GRAIN_SIZE
            next_host += GRAIN_SIZE
            entry_index += 1
        if kind is RunKind.DATA:
            host += offset % GRAIN_SIZE
        return Run(kind, host, min(position, end) - offset)


async def open_sesparse_extent(storage: Storage, size: int, budget: MemoryBudget, where: str) -> SeSparseExtent:
    """Open the seSparse extent in *storage*, *size* bytes long as the descriptor line *where* says.

    The headers are checked, then the grain directory entries the capacity needs are read
    (charged to *budget* first).
    """
    filename = storage.filename
    head = bytearray(min(SECTOR, storage.size))
    if head:
        await storage.readv([memoryview(head)], 0)
    layout = parse_const_header(bytes(head), storage.size, filename)
    if layout.capacity != size:
        raise CorruptImageError(
            filename,
            _AT_CAPACITY,
            f"the extent's capacity ({layout.capacity // SECTOR} sectors) differs from its size in the descriptor: "
            f"{where}",
        )
    volatile = bytearray(SECTOR)
    await storage.readv([memoryview(volatile)], layout.volatile_offset)
    check_volatile_header(bytes(volatile), layout.volatile_offset, filename)
    entries = min(layout.gd_entries, layout.needed_entries)
    nbytes = 8 * entries
    if layout.gd_offset + nbytes > storage.size:
        raise CorruptImageError(
            filename,
            _AT_GD,
            f"the grain directory ({nbytes} bytes at {layout.gd_offset:#x}) lies past the end of the file "
            f"({storage.size} bytes)",
        )
    budget.hold(filename, "its grain directory", nbytes)
    raw = bytearray(nbytes)
    if raw:
        await storage.readv([memoryview(raw)], layout.gd_offset)
    return SeSparseExtent(storage, layout, _entries(raw), budget)
