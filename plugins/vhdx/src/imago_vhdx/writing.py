"""Writing dynamic images: blocks allocated at the file's end, BAT changes committed through the log.

Every metadata change is a log entry first, as the specification requires: the entry (the new
4 KiB BAT sectors) is written and flushed, then the sectors are written in place and flushed.
Entries alternate between the two halves of the log and each is a whole sequence by itself (its
tail is itself), with increasing sequence numbers under a log GUID of this session: while one
entry is being written the previous one stays valid, so a crash at any point leaves either the
last committed entry (replaying it rewrites what is already there) or the new one, complete and
flushed, to replay. A new block is the file grown by one block (zeroes) and flushed before its
BAT entry is committed: the entry never names space that is not there, and until the data
lands the block reads as zeroes, as it did before. On close the log is emptied (both headers
rewritten with a zero log GUID).
"""

from __future__ import annotations

import struct
import uuid
from array import array

from imago import RangeLock, Storage

from .bat import BLOCK_FULLY_PRESENT, BLOCK_ZERO, BatGeometry
from .layout import Header, MiB, with_checksum
from .log import LOG_SECTOR
from .opening import rewrite_headers

__all__ = ["BlockWriter"]

_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
_DESCRIPTOR = struct.Struct("<4sIQQQ")


class BlockWriter:
    """Allocates blocks and changes BAT entries of a non-differencing image, through the log."""

    def __init__(
        self, storage: Storage, header: Header, bat: array[int], geometry: BatGeometry, bat_offset: int
    ) -> None:
        self._storage = storage
        self._header = header
        self._bat = bat
        self._geometry = geometry
        self._bat_offset = bat_offset
        self._lock = RangeLock()
        self._started = False
        self._sequence = 1
        self._half = 0
        # Sectors per entry: one for the header and descriptors, the rest data, within half the log.
        self._max_sectors = min(header.log_length // 2 // LOG_SECTOR, 1 + (LOG_SECTOR - 64) // 32) - 1

    @property
    def header(self) -> Header:
        """The current header."""
        return self._header

    async def _start(self) -> None:
        """Before the first change: new file and data write GUIDs and a log GUID for this session."""
        if self._started:
            return
        # A valid entry under the new GUID before the headers name it: a crash right after the
        # header switch leaves a log that replays (to nothing), not one without a valid entry.
        log_guid = uuid.uuid4()
        self._header = self._header.__replace__(log_guid=log_guid)
        await self._log([])
        self._header = await rewrite_headers(
            self._storage,
            self._header,
            file_write_guid=uuid.uuid4(),
            data_write_guid=uuid.uuid4(),
            log_guid=log_guid,
        )
        self._started = True

    async def allocate(self, block: int) -> int:
        """A new block for *block* (a block reading as zeroes): its file offset, its BAT entry committed."""
        token = await self._lock.acquire(0, 1)
        try:
            entry = self._bat[self._geometry.payload_index(block)]
            if entry & 7 == BLOCK_FULLY_PRESENT:  # (allocated while we waited)
                return (entry >> 20) * MiB
            await self._start()
            storage = self._storage
            host = -(-storage.size // MiB) * MiB
            await storage.resize(host + self._geometry.block_size)
            await storage.flush()
            await self._commit({block: host // MiB << 20 | BLOCK_FULLY_PRESENT})
            return host
        finally:
            self._lock.release(token)

    async def set_zero(self, first: int, last: int) -> None:
        """Blocks ``[first, last)`` read as zeroes (their space, if any, is not reused)."""
        token = await self._lock.acquire(0, 1)
        try:
            await self._start()
            changes = {}
            for block in range(first, last):
                if self._bat[self._geometry.payload_index(block)] != BLOCK_ZERO:
                    changes[block] = BLOCK_ZERO
            await self._commit(changes)
        finally:
            self._lock.release(token)

    async def _commit(self, changes: dict[int, int]) -> None:
        """BAT entries changed: logged, flushed, written in place, flushed; the in-memory BAT last."""
        sectors: dict[int, bytearray] = {}
        for block, value in changes.items():
            index = self._geometry.payload_index(block)
            at = self._bat_offset + 8 * index
            sector_at = at - at % LOG_SECTOR
            sector = sectors.get(sector_at)
            if sector is None:
                first = (sector_at - self._bat_offset) // 8
                sector = sectors[sector_at] = bytearray(LOG_SECTOR)
                count = min(LOG_SECTOR // 8, len(self._bat) - first)
                sector[: 8 * count] = self._bat[first : first + count].tobytes()
            struct.pack_into("<Q", sector, at - sector_at, value)
        items = sorted(sectors.items())
        for start in range(0, len(items), self._max_sectors):
            batch = items[start : start + self._max_sectors]
            await self._log(batch)
            for sector_at, data in batch:
                await self._storage.writev([memoryview(data)], sector_at)
            await self._storage.flush()
        for block, value in changes.items():
            self._bat[self._geometry.payload_index(block)] = value

    async def _log(self, writes: list[tuple[int, bytearray]]) -> None:
        """One self-contained log entry holding *writes* (4 KiB sectors), written to the next half and flushed."""
        header = self._header
        position = self._half * (header.log_length // 2)
        self._half ^= 1
        sequence = self._sequence
        self._sequence += 1
        length = (1 + len(writes)) * LOG_SECTOR
        entry = bytearray(length)
        size = self._storage.size
        _ENTRY_HEADER.pack_into(
            entry, 0, b"loge", 0, length, position, sequence, len(writes), 0, header.log_guid.bytes_le, size, size
        )
        for index, (at, data) in enumerate(writes):
            leading = struct.unpack_from("<Q", data, 0)[0]
            trailing = struct.unpack_from("<I", data, LOG_SECTOR - 4)[0]
            _DESCRIPTOR.pack_into(entry, 64 + 32 * index, b"desc", trailing, leading, at, sequence)
            sector = (1 + index) * LOG_SECTOR
            struct.pack_into("<4sI", entry, sector, b"data", sequence >> 32)
            entry[sector + 8 : sector + LOG_SECTOR - 4] = data[8 : LOG_SECTOR - 4]
            struct.pack_into("<I", entry, sector + LOG_SECTOR - 4, sequence & 0xFFFFFFFF)
        with_checksum(entry, 4)
        await self._storage.writev([memoryview(entry)], header.log_offset + position)
        await self._storage.flush()

    async def finish(self) -> None:
        """Empty the log (everything it held is in place): both headers rewritten with a zero log GUID."""
        if self._started:
            await self._storage.flush()
            self._header = await rewrite_headers(self._storage, self._header, log_guid=uuid.UUID(int=0))
            self._started = False
