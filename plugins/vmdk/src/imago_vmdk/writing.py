"""Writes into hosted sparse extents: grains allocated at the end of the file, grain table entries.

A write to a grain the extent does not hold (unallocated, or a zeroed grain) gets new grains at
the end of the extent file; what the write leaves unwritten in them is first filled with what
the guest reads there now (the parent's data through :func:`imago.read_through`, or zeroes).
The grain table entries change in the cached table only; the table is written back (the
redundant copy, then the primary one) at the next flush or eviction, after the extent file was
flushed: a grain's data reaches the disk before an entry names it. Grain tables are never
allocated: images QEMU and VMware make have all of theirs preallocated.

Zeroing and discards set whole grains' entries: ``1`` (a zeroed grain) where the extent has
zeroed-grain support, ``0`` (unallocated: the parent's data, or zeroes) where that is what the
range must read. The space a grain loses is not reused (VMDK keeps no reference counts).
"""

from __future__ import annotations

import asyncio

from imago import FormatDriver, UnsupportedFeatureError, read_through

from .extents import SparseExtent
from .header import SECTOR

__all__ = ["SparseWriter"]

# Grain table entries with a meaning of their own.
UNALLOCATED = 0
ZEROED = 1


class SparseWriter:
    """Allocation and entry changes for one writable sparse extent at guest offset *start*."""

    def __init__(self, extent: SparseExtent, driver: FormatDriver, start: int, *, parent_missing: bool = False) -> None:
        self._extent = extent
        # A delta opened without its parent: what a partial grain write keeps is unknown.
        self._parent_missing = parent_missing
        self._driver = driver
        self._start = start
        self._storage = extent.storage_checked
        layout = extent.layout
        self._grain = layout.grain_size
        self._coverage = layout.gt_coverage
        end = -(-self._storage.size // SECTOR) * SECTOR
        self._next_free = max(end, layout.overhead)
        self._lock = asyncio.Lock()
        #: Whether the grains written since the last flush reached the disk (tables may be written).
        self._data_flushed = True
        extent.before_table_write = self._flush_data
        #: Guest grain index -> (the entry a write replaced, the one it set), until the write is known.
        self._unconfirmed: dict[int, tuple[int, int]] = {}

    @property
    def zero_grains(self) -> bool:
        """Whether the extent records zeroed grains."""
        return self._extent.layout.zero_grain

    async def _flush_data(self) -> None:
        if not self._data_flushed:
            await self._storage.flush()
            self._data_flushed = True

    def _table_sector(self, offset: int) -> int:
        sector = self._extent.directory[offset // self._coverage]
        if sector == 0:
            raise UnsupportedFeatureError(
                f"writing where the sparse extent has no grain table (guest offset {self._start + offset:#x})",
                self._storage.filename,
            )
        return sector

    async def ensure_data(self, offset: int, length: int) -> tuple[int, int]:
        """Host offset and length of a writable run at extent offset *offset* (at most *length* bytes)."""
        extent = self._extent
        grain = self._grain
        async with self._lock:
            sector = self._table_sector(offset)
            table = await extent.tables.get(sector)
            first = offset % self._coverage // grain
            if table[first] > ZEROED:
                run = await extent.lookup(offset, length)
                return run.host_offset, run.length
            # New grains for the part of the range within this table whose grains are not ours.
            table_start = offset - offset % self._coverage
            end = min(offset + length, table_start + self._coverage, extent.size)
            last = first
            while table_start + (last + 1) * grain < end and table[last + 1] <= ZEROED:
                last += 1
            count = last - first + 1
            host = self._next_free
            grain_start = table_start + first * grain
            grains_end = grain_start + count * grain
            end = min(end, grains_end)
            # Fill what the write leaves untouched with what the guest reads there now.
            for part_start, part_end in ((grain_start, offset), (end, grains_end)):
                if part_end > part_start:
                    if self._parent_missing and part_start < extent.size:
                        raise UnsupportedFeatureError(
                            "writing part of a grain of a delta image opened without its parent "
                            f"(guest offset {self._start + part_start:#x}: the rest of the grain is the parent's)",
                            self._storage.filename,
                        )
                    fill = bytearray(part_end - part_start)
                    if part_start < extent.size:
                        await read_through(self._driver, [memoryview(fill)], self._start + part_start)
                    await self._storage.writev([memoryview(fill)], host + part_start - grain_start)
            self._next_free = host + count * grain
            extent.grew(self._next_free)
            self._data_flushed = False
            # (Fetched again: the reads above may have evicted it; no await from here to mark_dirty.)
            table = await extent.tables.get(sector)
            for k in range(count):
                entry = (host + k * grain) // SECTOR
                self._unconfirmed[(self._start + grain_start) // grain + k] = (table[first + k], entry)
                table[first + k] = entry
            extent.tables.mark_dirty(sector)
            if len(self._unconfirmed) > 4096:
                self._unconfirmed.clear()
            return host + offset - grain_start, end - offset

    def write_failed(self, offset: int, length: int) -> None:
        """Take back the grains a failed write was given, where nothing else wrote into them since."""
        extent = self._extent
        grain = self._grain
        first = offset // grain
        last = (offset + length - 1) // grain
        for index in range(first, last + 1):
            binding = self._unconfirmed.pop((self._start + index * grain) // grain, None)
            if binding is None:
                continue
            sector = extent.directory[index * grain // self._coverage]
            table = extent.tables.peek(sector)
            slot = index % (self._coverage // grain)
            if table is not None and table[slot] == binding[1]:
                table[slot] = binding[0]

    def confirm(self) -> None:
        """The writes so far succeeded or were reported: their grains stay."""
        self._unconfirmed.clear()

    def whole_grains(self, offset: int, length: int) -> tuple[int, int]:
        """The whole grains of extent range ``[offset, offset + length)`` (the last one may end the extent)."""
        grain = self._grain
        start = -(-offset // grain) * grain
        end = offset + length
        if end < self._extent.size:
            end -= end % grain
        return start, max(start, end)

    async def set_entries(self, offset: int, length: int, entry: int, *, only_allocated_stay: bool = False) -> int:
        """Set the entries of the whole grains from *offset* (grain-aligned) on; how many bytes were handled.

        *only_allocated_stay*: stop at the first allocated grain (its data is kept, the caller
        writes zeroes into it); otherwise every grain's entry changes.
        """
        extent = self._extent
        grain = self._grain
        position = offset
        end = offset + length
        async with self._lock:
            while position < end:
                sector = self._table_sector(position)
                table = await extent.tables.get(sector)
                slot = position % self._coverage // grain
                if only_allocated_stay and table[slot] > ZEROED:
                    break
                if table[slot] != entry:
                    table[slot] = entry
                    extent.tables.mark_dirty(sector)
                position = min(position + grain, end)
        return position - offset
