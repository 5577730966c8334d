"""The VHDX log: finding the active sequence, and its updates replayed in memory or to disk.

The log is a circular buffer of entries (4 KiB sectors: a header with descriptors, then data
sectors). An entry is valid when its signature, checksum, log GUID and sequence numbers hold.
The active sequence is the run of valid entries with consecutive sequence numbers, each
following the one before in the buffer, that ends at the valid entry with the highest sequence
number whose tail (the oldest entry still needed) lies in the run. Its updates, applied in order,
are what the metadata really says: :class:`Replay` holds them, shows them over the file
(:meth:`Replay.read`) or writes them to it (:meth:`Replay.apply`).
"""

from __future__ import annotations

import bisect
import struct
import uuid

from imago import CorruptImageError, MemoryBudget, Storage

from .layout import MAX_DISK_SIZE, REGION_OFFSETS, checksum

__all__ = ["LOG_SECTOR", "Replay", "read_log"]

LOG_SECTOR = 4096
_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")
_DESCRIPTOR = struct.Struct("<4sIQQQ")
# The file identifier, both headers and both region tables are never changed through the log.
_PROTECTED_END = REGION_OFFSETS[0]


class _Entry:
    __slots__ = ("flushed", "last", "length", "position", "sequence", "tail", "updates")

    def __init__(
        self,
        position: int,
        length: int,
        tail: int,
        sequence: int,
        flushed: int,
        last: int,
        updates: list[tuple[int, int, bytes | None]],
    ) -> None:
        self.position = position
        self.length = length
        self.tail = tail
        self.sequence = sequence
        self.flushed = flushed
        self.last = last
        self.updates = updates


class Replay:
    """The updates of the active log sequence, in order: ``(file offset, length, data or None for zeroes)``."""

    __slots__ = ("_ends", "_starts", "last_file_offset", "updates")

    def __init__(self, updates: list[tuple[int, int, bytes | None]], last_file_offset: int) -> None:
        self.updates = updates
        self.last_file_offset = last_file_offset
        spans = sorted((offset, offset + length) for offset, length, _ in updates)
        starts: list[int] = []
        ends: list[int] = []
        for start, end in spans:
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        self._starts = starts
        self._ends = ends

    def touches(self, offset: int, length: int) -> bool:
        """Whether the log changes any byte of file range ``[offset, offset + length)``."""
        index = bisect.bisect_right(self._starts, offset + length - 1) - 1
        return index >= 0 and self._ends[index] > offset

    def patch(self, buf: bytearray | memoryview, offset: int) -> None:
        """Lay the log's updates over *buf*, which holds the file's bytes from *offset*."""
        end = offset + len(buf)
        if not self.touches(offset, len(buf)):
            return
        for at, length, data in self.updates:
            lo, hi = max(at, offset), min(at + length, end)
            if lo >= hi:
                continue
            if data is None:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                buf[lo - offset : hi - offset] = data[lo - at : hi - at]

    async def read(self, storage: Storage, offset: int, length: int) -> bytearray:
        """The file's bytes at ``[offset, offset + length)`` as the replayed log makes them (zeroes past its end)."""
        buf = bytearray(length)
        present = max(0, min(length, storage.size - offset))
        if present:
            await storage.readv([memoryview(buf)[:present]], offset)
        self.patch(buf, offset)
        return buf

    async def apply(self, storage: Storage) -> None:
        """Write the updates into *storage* in order and extend it to the last file offset, then flush.

        Replaying twice writes the same bytes: a crash in the middle leaves the log to replay again.
        """
        for at, length, data in self.updates:
            if data is None:
                await storage.write_zeroes(at, length)
            else:
                await storage.writev([memoryview(data)], at)
        if storage.size < self.last_file_offset:
            await storage.resize(self.last_file_offset)
        await storage.flush()


async def read_log(
    storage: Storage, log_offset: int, log_length: int, log_guid: uuid.UUID, budget: MemoryBudget
) -> Replay:
    """Find the active sequence of the log at *log_offset* and gather its updates.

    A log GUID that is not zero means the log must be replayed: a log holding no complete
    sequence, or whose updates touch the headers or the log, is refused.
    """
    filename = storage.filename
    budget.hold(filename, "its log", log_length)
    try:
        log = bytearray(log_length)
        await storage.readv([memoryview(log)], log_offset)
        entries = _valid_entries(log, log_guid)
    finally:
        budget.release(log_length)
    if not entries:
        raise CorruptImageError(filename, log_offset, "the log must be replayed but holds no valid entry")
    chain = _active_chain(entries, log_length, filename, log_offset)
    if chain is None:
        raise CorruptImageError(filename, log_offset, "the log holds no complete sequence of entries to replay")
    head = chain[-1]
    if head.flushed > storage.size:
        raise CorruptImageError(
            filename,
            log_offset + head.position,
            f"the log says the file was {head.flushed} bytes long, but it is {storage.size} (truncated)",
        )
    updates: list[tuple[int, int, bytes | None]] = []
    bound = max(storage.size, head.last)
    for entry in chain:
        for at, length, data in entry.updates:
            if (
                at + length > bound
                or at < _PROTECTED_END
                or (at < log_offset + log_length and log_offset < at + length)
            ):
                raise CorruptImageError(
                    filename,
                    log_offset + entry.position,
                    f"a log entry updates {length} bytes at {at:#x}: the headers, the log itself or past the file",
                )
            updates.append((at, length, data))
    return Replay(updates, head.last)


def _valid_entries(log: bytearray, log_guid: uuid.UUID) -> dict[int, _Entry]:
    """Every valid entry of the log, by position (entries may wrap around the buffer's end)."""
    size = len(log)
    entries: dict[int, _Entry] = {}
    for position in range(0, size, LOG_SECTOR):
        if log[position : position + 4] != b"loge":
            continue
        entry = _parse_entry(log, position, log_guid)
        if entry is not None:
            entries[position] = entry
    return entries


def _sectors(log: bytearray, position: int, count: int) -> bytearray:
    """*count* sectors from *position*, wrapping around the end of the log."""
    size = len(log)
    out = bytearray()
    for index in range(count):
        at = (position + index * LOG_SECTOR) % size
        out += log[at : at + LOG_SECTOR]
    return out


def _parse_entry(log: bytearray, position: int, log_guid: uuid.UUID) -> _Entry | None:
    size = len(log)
    (_, stored, length, tail, sequence, count, _, guid, flushed, last) = _ENTRY_HEADER.unpack_from(log, position)
    if length == 0 or length % LOG_SECTOR or length > size or tail % LOG_SECTOR or tail >= size:
        return None
    if sequence == 0 or uuid.UUID(bytes_le=guid) != log_guid or flushed > MAX_DISK_SIZE * 2 or last > MAX_DISK_SIZE * 2:
        return None
    descriptor_sectors = -(-(_ENTRY_HEADER.size + count * _DESCRIPTOR.size) // LOG_SECTOR)
    if descriptor_sectors * LOG_SECTOR > length:
        return None
    data = _sectors(log, position, length // LOG_SECTOR)
    if checksum(data, 4) != stored:
        return None
    updates: list[tuple[int, int, bytes | None]] = []
    sector = descriptor_sectors
    for index in range(count):
        kind, trailing, leading_or_length, at, desc_sequence = _DESCRIPTOR.unpack_from(
            data, _ENTRY_HEADER.size + index * _DESCRIPTOR.size
        )
        if desc_sequence != sequence or at % LOG_SECTOR:
            return None
        if kind == b"zero":
            if leading_or_length % LOG_SECTOR or leading_or_length == 0:
                return None
            updates.append((at, leading_or_length, None))
        elif kind == b"desc":
            where = sector * LOG_SECTOR
            if where + LOG_SECTOR > length:
                return None
            raw = data[where : where + LOG_SECTOR]
            high, low = struct.unpack_from("<I", raw, 4)[0], struct.unpack_from("<I", raw, 4092)[0]
            if raw[:4] != b"data" or (high << 32 | low) != sequence:
                return None
            content = struct.pack("<Q", leading_or_length) + bytes(raw[8:4092]) + struct.pack("<I", trailing)
            updates.append((at, LOG_SECTOR, content))
            sector += 1
        else:
            return None
    if sector * LOG_SECTOR != length:
        return None
    return _Entry(position, length, tail, sequence, flushed, last, updates)


def _previous(by_end: dict[int, list[_Entry]], entry: _Entry) -> _Entry | None:
    """The valid entry just before *entry* in its sequence: it ends where *entry* starts, one number lower."""
    for candidate in by_end.get(entry.position, ()):
        if candidate.sequence == entry.sequence - 1:
            return candidate
    return None


def _active_chain(entries: dict[int, _Entry], log_length: int, filename: str | None, at: int) -> list[_Entry] | None:
    """The run from the tail to the entry with the highest sequence number whose run reaches back to its tail."""
    by_end: dict[int, list[_Entry]] = {}
    for entry in entries.values():
        by_end.setdefault((entry.position + entry.length) % log_length, []).append(entry)
    # (Each walk is at most one step per entry; the work over all heads is capped all the same.)
    budget = 16 * len(entries) + 16
    for head in sorted(entries.values(), key=lambda e: e.sequence, reverse=True):
        chain = [head]
        while chain[-1].position != head.tail and len(chain) <= len(entries):
            budget -= 1
            if budget < 0:
                raise CorruptImageError(filename, at, "the log's entries form too many partial sequences to search")
            previous = _previous(by_end, chain[-1])
            if previous is None:
                break
            chain.append(previous)
        if chain[-1].position == head.tail:
            chain.reverse()
            return chain
    return None
