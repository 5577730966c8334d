"""Writing into dynamic VHDs: blocks allocated at the end of the file, the footer moved after them.

New blocks take the footer's place: the footer is written at the new end (the file grows:
the blocks' data is a hole, zeroes), then each block's bitmap with every sector present (the
block's zeroes are its data, as QEMU writes them), the first over the old footer, and only then
the blocks' BAT entries. A crash at any point leaves an image that opens: the BAT names no block
before its bitmap is on disk, and an end without a footer falls back to the footer's copy at
offset 0 (as QEMU reads dynamic images). A write over several unallocated blocks allocates them
together, side by side (one footer move, one BAT write), so the file is written in long runs.
Only the footer's move is serialised (a :class:`~imago.RangeLock` held over the file's end);
bitmaps, BAT entries and data are not.
"""

from __future__ import annotations

import sys
from array import array

from imago import RangeLock, Storage

from .dynamic import DynamicHeader
from .footer import SECTOR, Footer
from .opening import UNALLOCATED

__all__ = ["BlockAllocator"]


class BlockAllocator:
    """Allocates the blocks of a dynamic image in *storage* (its BAT *bat*, its footer at *footer_at*)."""

    def __init__(
        self, storage: Storage, header: DynamicHeader, bat: array[int], footer: Footer, footer_at: int
    ) -> None:
        self._storage = storage
        self._header = header
        self._bat = bat
        self._footer = footer.pack()
        self._end = footer_at
        self._lock = RangeLock()
        self._span = header.bitmap_size + header.block_size
        self._bitmap = b"\xff" * header.bitmap_size

    async def block(self, index: int, count: int = 1) -> int:
        """The file offset of block *index*'s bitmap, the block allocated first if it was not.

        A new block is allocated with the unallocated ones that follow it, up to *count* blocks
        in all (those a request goes on to write), side by side: one footer move and one BAT
        write for the run, the file written in long runs.
        """
        bat = self._bat
        entry = bat[index]
        if entry != UNALLOCATED:
            return entry * SECTOR
        token = await self._lock.acquire(0, 1)
        try:
            entry = bat[index]
            if entry != UNALLOCATED:  # (allocated while this request waited)
                return entry * SECTOR
            stop = index + 1
            while stop < min(index + count, len(bat)) and bat[stop] == UNALLOCATED:
                stop += 1
            at = self._end
            end = at + (stop - index) * self._span
            # (The file grows: the blocks' data is a hole, zeroes. Only this step is serialised:
            # the next allocation's footer lies past these blocks.)
            await self._storage.writev([memoryview(self._footer)], end)
            self._end = end
            entries = array("I", range(at // SECTOR, end // SECTOR, self._span // SECTOR))
            bat[index:stop] = entries
        finally:
            self._lock.release(token)
        for bitmap in range(at, end, self._span):
            await self._storage.writev([memoryview(self._bitmap)], bitmap)
        if sys.byteorder == "little":
            entries.byteswap()  # (big-endian on disk)
        await self._storage.writev([memoryview(entries).cast("B")], self._header.table_offset + 4 * index)
        return at

    def unallocated_run(self, offset: int, length: int) -> tuple[int, int]:
        """The first run of whole unallocated blocks inside ``[offset, offset + length)`` (length 0: none)."""
        block_size = self._header.block_size
        end = offset + length
        index = -(-offset // block_size)
        last = end // block_size
        while index < last and self._bat[index] != UNALLOCATED:
            index += 1
        stop = index
        while stop < last and self._bat[stop] == UNALLOCATED:
            stop += 1
        if stop == index:
            return offset, 0
        return index * block_size, (stop - index) * block_size
