"""Extents: where a range of the disk lives (a flat file, a sparse extent's grains, nothing).

Each extent answers :meth:`Extent.lookup` for an offset inside it with what lies there
(:class:`Run`): data at a host offset of its file, a compressed grain, zeroes recorded as
such, or nothing (the parent's data, or zeroes), and for how many bytes. Sparse extents read
their grain directory whole at open (charged to the chain's memory budget) and their grain
tables through a cache in that budget; every entry is checked against the file before it is
used (into the header and tables, past the end of the file).
"""

from __future__ import annotations

import enum
import sys
from array import array
from collections.abc import Awaitable, Callable

from imago import CorruptImageError, MemoryBudget, MetadataCache, Record, Storage

from .descriptor import ExtentType
from .header import SECTOR, SparseLayout

__all__ = ["Extent", "FlatExtent", "RunKind", "SparseExtent", "ZeroExtent"]


class RunKind(enum.Enum):
    """What a run of an extent holds."""

    DATA = "data"
    COMPRESSED = "compressed"
    ZERO = "zero"
    UNALLOCATED = "unallocated"


class Run(Record):
    """*length* bytes of *kind*; for data, at *host_offset* of the extent's file."""

    __slots__ = ("host_offset", "kind", "length")

    kind: RunKind
    host_offset: int
    length: int

    def __init__(self, kind: RunKind, host_offset: int, length: int) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "host_offset", host_offset)
        object.__setattr__(self, "length", length)


class Extent:
    """Base of the extents: *size* bytes of the disk; *type* as the descriptor names it (``""`` embedded)."""

    storage: Storage | None = None
    #: The grain size of sparse extents (``None`` for the others).
    grain_size: int | None = None
    compressed = False

    def __init__(self, size: int, type_name: str) -> None:
        self.size = size
        self.type_name = type_name

    async def lookup(self, offset: int, length: int) -> Run:
        """What lies at *offset* (inside the extent), for at most *length* bytes."""
        raise NotImplementedError


class ZeroExtent(Extent):
    """A ZERO extent (or a NOACCESS one): reads as zeroes, has no file."""

    def __init__(self, size: int, extent_type: ExtentType | None, *, recorded: bool) -> None:
        super().__init__(size, extent_type.value if extent_type else "")
        self._kind = RunKind.ZERO if recorded else RunKind.UNALLOCATED

    async def lookup(self, offset: int, length: int) -> Run:
        """Zeroes for the rest of the extent."""
        return Run(self._kind, 0, min(length, self.size - offset))


class FlatExtent(Extent):
    """Raw sectors of *storage* from *start* on (FLAT and VMFS extents)."""

    def __init__(self, storage: Storage, size: int, start: int, type_name: str) -> None:
        super().__init__(size, type_name)
        self.storage = storage
        self.start = start

    async def lookup(self, offset: int, length: int) -> Run:
        """The same offset of the file (shifted by the start), for the rest of the extent."""
        return Run(RunKind.DATA, self.start + offset, min(length, self.size - offset))


def _entries(raw: bytes | bytearray) -> array[int]:
    table = array("I", raw)
    if sys.byteorder == "big":
        table.byteswap()
    return table


class SparseExtent(Extent):
    """A hosted sparse (KDMV) or VMFS sparse (COWD) extent in *storage*."""

    def __init__(
        self,
        storage: Storage,
        layout: SparseLayout,
        directory: array[int],
        budget: MemoryBudget,
        type_name: str,
        redundant: array[int] | None = None,
    ) -> None:
        super().__init__(layout.capacity, type_name)
        self.storage = storage
        self.layout = layout
        self.grain_size = layout.grain_size
        self.compressed = layout.compressed
        self._directory = directory
        self._filename = storage.filename
        self._file_size = storage.size
        # Writable extents: the primary table's sector -> its redundant copy's (0: none).
        self._copies: dict[int, int] | None = None
        if redundant is not None:
            self._copies = {
                sector: (redundant[i] if i < len(redundant) else 0) for i, sector in enumerate(directory) if sector
            }
        #: Called before dirty grain tables are written: the grains they name reach the disk first.
        self.before_table_write: Callable[[], Awaitable[None]] | None = None
        self._tables: MetadataCache[int, array[int]] = MetadataCache(
            None,
            self._load_table,
            self._write_table if redundant is not None else None,
            budget=budget,
            entry_size=4 * layout.gtes_per_gt,
            name=f"the grain table cache of {storage.filename or 'the image'}",
        )

    @classmethod
    async def read_directory(
        cls, storage: Storage, layout: SparseLayout, budget: MemoryBudget, *, redundant: bool = False
    ) -> array[int]:
        """The grain directory (*redundant*: its redundant copy), read whole (charged to *budget* first)."""
        nbytes = 4 * layout.gd_entries
        budget.hold(storage.filename, "its redundant grain directory" if redundant else "its grain directory", nbytes)
        raw = bytearray(nbytes)
        if raw:
            await storage.readv([memoryview(raw)], layout.rgd_offset if redundant else layout.gd_offset)
        return _entries(raw)

    def grew(self, file_end: int) -> None:
        """A writer placed grains up to *file_end*: entries up to there are valid (their data is coming)."""
        self._file_size = max(self._file_size, file_end)

    @property
    def directory(self) -> array[int]:
        """The grain directory: the sector of each grain table (0: none)."""
        return self._directory

    @property
    def tables(self) -> MetadataCache[int, array[int]]:
        """The grain tables, by sector, as cached (writers change entries and mark them dirty)."""
        return self._tables

    async def _write_table(self, sector: int, table: array[int]) -> None:
        """Write a changed grain table: the redundant copy first, then the primary one."""
        if self.before_table_write is not None:
            await self.before_table_write()
        raw = array("I", table)
        if sys.byteorder == "big":
            raw.byteswap()
        data = memoryview(raw.tobytes())
        assert self._copies is not None
        copy = self._copies.get(sector, 0)
        if copy:
            await self.storage_checked.writev([data], copy * SECTOR)
        await self.storage_checked.writev([data], sector * SECTOR)

    async def _load_table(self, sector: int) -> array[int]:
        layout = self.layout
        offset = sector * SECTOR
        nbytes = 4 * layout.gtes_per_gt
        if offset < SECTOR or offset + nbytes > self._file_size:
            raise CorruptImageError(
                self._filename,
                offset,
                f"a grain table ({nbytes} bytes at {offset:#x}) lies outside the file ({self._file_size} bytes)",
            )
        raw = bytearray(nbytes)
        await self.storage_checked.readv([memoryview(raw)], offset)
        return _entries(raw)

    @property
    def storage_checked(self) -> Storage:
        """The extent's file."""
        assert self.storage is not None
        return self.storage

    def _classify(self, entry: int, guest_offset: int) -> tuple[RunKind, int]:
        layout = self.layout
        if entry == 0:
            return RunKind.UNALLOCATED, 0
        if entry == 1 and layout.zero_grain:
            return RunKind.ZERO, 0
        host = entry * SECTOR
        if host < layout.overhead or host < SECTOR:
            raise CorruptImageError(
                self._filename,
                host,
                f"the grain of guest offset {guest_offset:#x} points into the extent's metadata (sector {entry})",
            )
        if host >= self._file_size:
            raise CorruptImageError(
                self._filename,
                host,
                f"the grain of guest offset {guest_offset:#x} lies past the end of the file ({self._file_size} bytes)",
            )
        return (RunKind.COMPRESSED if layout.compressed else RunKind.DATA), host

    async def grain(self, offset: int) -> tuple[RunKind, int]:
        """The kind and host offset of the grain holding *offset* (extent-relative)."""
        layout = self.layout
        gt_sector = self._directory[offset // layout.gt_coverage]
        if gt_sector == 0:
            return RunKind.UNALLOCATED, 0
        table = await self._tables.get(gt_sector)
        return self._classify(table[offset % layout.gt_coverage // layout.grain_size], offset)

    async def lookup(self, offset: int, length: int) -> Run:
        """The run at *offset*: grains of one kind (contiguous on the host for data), within one grain table."""
        layout = self.layout
        grain_size = layout.grain_size
        coverage = layout.gt_coverage
        end = min(offset + length, self.size)
        directory = self._directory
        index = offset // coverage
        if directory[index] == 0:
            # No grain table: nothing allocated, as far as further tables are missing too.
            stop = (index + 1) * coverage
            while stop < end and directory[stop // coverage] == 0:
                stop += coverage
            return Run(RunKind.UNALLOCATED, 0, min(stop, end) - offset)
        table = await self._tables.get(directory[index])
        first = offset % coverage // grain_size
        kind, host = self._classify(table[first], offset)
        table_start = index * coverage
        position = table_start + (first + 1) * grain_size
        stop = min(end, table_start + coverage)
        next_host = host + grain_size
        entry_index = first + 1
        while position < stop:
            next_kind, next_at = self._classify(table[entry_index], position)
            if next_kind is not kind or (kind is RunKind.DATA and next_at != next_host):
                break
            position += grain_size
            next_host += grain_size
            entry_index += 1
        run_length = min(position, end) - offset
        within = offset % grain_size
        if kind is RunKind.DATA:
            host += within
            if host + run_length > self._file_size:
                raise CorruptImageError(
                    self._filename,
                    host,
                    f"the grains of guest offsets {offset:#x}+{run_length:#x} lie past the end of the file "
                    f"({self._file_size} bytes)",
                )
        return Run(kind, host, run_length)
