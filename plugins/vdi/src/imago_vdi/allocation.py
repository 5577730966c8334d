"""Writes into dynamic VDI images: new blocks at the end of the file, the block map after the data.

A write to a guest block the map does not name gets the next image block (one past the highest
in use, as QEMU's ``blocks_allocated`` counter gives it in well-formed images): the file grows to
its end, so what the write leaves untouched reads as zeroes. The map entries change in memory;
at the next flush the data is flushed first, then the header's ``blocks_allocated``, then
the changed map sectors, each flushed, so the map never names a block whose data did not
reach the disk. A failed data write takes its blocks back.
"""

from __future__ import annotations

import asyncio

from imago import AllocationError, Storage

from .blockmap import DISCARDED, BlockMap
from .header import SECTOR, VdiHeader

__all__ = ["BlockAllocator"]

_ENTRIES_PER_SECTOR = SECTOR // 4


class BlockAllocator:
    """Block allocation and map write-back for one writable image."""

    def __init__(self, header: VdiHeader, block_map: BlockMap, storage: Storage) -> None:
        self._header = header
        self._map = block_map
        self._storage = storage
        self._block = header.block_size
        used = [entry for _, entry in block_map.allocated()]
        self._next = max(used) + 1 if used else 0
        self._allocated = len(used)
        self._lock = asyncio.Lock()
        self._dirty_sectors: set[int] = set()
        self._header_dirty = False
        #: Guest block -> (the entry it had, the image block it was given), until a flush.
        self._unconfirmed: dict[int, tuple[int, int]] = {}

    async def allocate(self, first_block: int, count: int, whole: bool) -> int:
        """Give guest blocks ``[first_block, first_block + count)`` (all unmapped) new image blocks.

        Returns how many got one (the run may stop early); *whole*: every block will be
        overwritten entirely. The blocks are contiguous in the file.
        """
        header = self._header
        entries = self._map.entries
        async with self._lock:
            # (Another request may have mapped some of them while this one waited.)
            taken = 0
            while taken < count and entries[first_block + taken] >= DISCARDED:
                taken += 1
            if taken == 0:
                return 0
            index = self._next
            room = header.blocks_in_image - index
            if room <= 0:
                # The last image block is in use but some before it are not (another writer left
                # gaps): the lowest free one, one block at a time.
                used = {entry for _, entry in self._map.allocated()}
                index = next((i for i in range(header.blocks_in_image) if i not in used), -1)
                if index < 0:
                    raise AllocationError(self._storage.filename, "a data block", "every image block is in use")
                room = 1
            taken = min(taken, room)
            host = header.offset_data + index * self._block
            end = host + taken * self._block
            size = self._storage.size
            if host < size and not whole:
                # (Space a failed write left behind: zeroed, as a new block must read.)
                await self._storage.write_zeroes(host, min(end, size) - host)
            if end > size:
                await self._storage.resize(end)
            for k in range(taken):
                block = first_block + k
                self._unconfirmed[block] = (entries[block], index + k)
                entries[block] = index + k
                self._dirty_sectors.add(block // _ENTRIES_PER_SECTOR)
            self._next = max(self._next, index + taken)
            self._allocated += taken
            self._map.blocks_in_file = max(self._map.blocks_in_file, index + taken)
            self._header_dirty = True
            if len(self._unconfirmed) > 4096:
                self._unconfirmed.clear()
            return taken

    def write_failed(self, first_block: int, last_block: int) -> None:
        """Take back the blocks a failed write was given (the last ones given, only)."""
        entries = self._map.entries
        for block in range(last_block, first_block - 1, -1):
            binding = self._unconfirmed.pop(block, None)
            if binding is None or entries[block] != binding[1]:
                continue
            entries[block] = binding[0]
            self._allocated -= 1
            if binding[1] == self._next - 1:
                self._next -= 1

    async def flush(self) -> None:
        """Data, then the header, then the changed map sectors, each flushed before the next.

        The header goes first: a crash after it leaves ``blocks_allocated`` too high, which
        wastes a block, never too low, which would make QEMU give a block in use to a new one.
        """
        if not self._header_dirty:
            return
        async with self._lock:
            storage = self._storage
            await storage.flush()
            header = self._header
            blocks = header.blocks_in_image
            header.blocks_allocated = self._allocated
            raw = header.with_blocks_allocated(self._allocated)
            header.raw = raw
            await storage.writev([memoryview(raw)], 0)
            await storage.flush()
            for sector in sorted(self._dirty_sectors):
                first = sector * _ENTRIES_PER_SECTOR
                data = self._map.encode(first, min(_ENTRIES_PER_SECTOR, blocks - first))
                await storage.writev([memoryview(data)], header.offset_bmap + 4 * first)
            self._dirty_sectors.clear()
            await storage.flush()
            self._header_dirty = False
            self._unconfirmed.clear()
