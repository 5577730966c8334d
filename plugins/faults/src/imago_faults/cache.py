"""The volatile write cache of a simulated disk: what a power loss may drop.

Every change (write, write-zeroes, discard, resize) is kept in order, in memory, until a flush
writes them back to the durable storage below. Reads see the durable bytes with the pending
changes applied over them in order (read-your-writes). The durable storage only ever receives
changes in their order, or (early write-back) a change no older pending change overlaps, so the
pending list applied over it always yields what the disk reads as.

A power loss keeps any subset of the pending changes, applied in their order: what a disk
cache may have written back, in any order, by the time the power went (a later write to the
same bytes never reaches the disk before an earlier one is superseded by it). Optionally each
change is split into sectors first, so that a multi-sector write may be torn.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from imago import PreallocateMode, Record

__all__ = ["CachedChange", "VolatileCache"]

_set = object.__setattr__

#: The kinds of change: data, zeroes (``unmap`` allowed or not), a discard, a resize.
KINDS = ("write", "zeroes", "zeroes-unmap", "discard", "resize")


class CachedChange(Record, kw_only=True):
    """One pending change. ``resize`` changes carry the new size in ``offset`` (``length`` 0)."""

    __slots__ = ("data", "kind", "length", "offset", "prealloc")

    kind: str
    offset: int
    length: int
    data: bytes
    prealloc: PreallocateMode

    def __init__(
        self,
        *,
        kind: str,
        offset: int,
        length: int = 0,
        data: bytes = b"",
        prealloc: PreallocateMode = PreallocateMode.NONE,
    ) -> None:
        assert kind in KINDS, kind
        _set(self, "kind", kind)
        _set(self, "offset", offset)
        _set(self, "length", len(data) if kind == "write" else length)
        _set(self, "data", data)
        _set(self, "prealloc", prealloc)

    @property
    def end(self) -> int:
        """The end of the bytes it changes (a resize: everything from the new size on)."""
        return self.offset + self.length

    def overlaps(self, other: CachedChange) -> bool:
        """Whether the two changes must keep their order (resizes keep theirs with everything)."""
        if self.kind == "resize" or other.kind == "resize":
            return True
        return self.offset < other.end and other.offset < self.end

    def size_after(self, size: int) -> int:
        """The storage size after this change, from *size* before it."""
        if self.kind == "resize":
            return self.offset
        if self.kind == "discard" or self.length == 0:
            return size  # discards never grow the storage
        return max(size, self.end)

    def pieces(self, sector: int) -> list[CachedChange]:
        """The change cut at *sector* boundaries (a resize stays whole): what may be torn apart."""
        if self.kind == "resize" or self.length <= sector:
            return [self]
        cuts = [self.offset, *range((self.offset // sector + 1) * sector, self.end, sector), self.end]
        parts = []
        for start, stop in itertools.pairwise(cuts):
            data = self.data[start - self.offset : stop - self.offset] if self.kind == "write" else b""
            parts.append(CachedChange(kind=self.kind, offset=start, length=stop - start, data=data))
        return parts

    def apply(self, content: bytearray) -> None:
        """Apply this change to a disk image held in memory."""
        if self.kind == "resize":
            if self.offset < len(content):
                del content[self.offset :]
            else:
                content.extend(bytes(self.offset - len(content)))
            return
        end = self.end
        if self.kind == "discard":
            end = min(end, len(content))  # a discard never grows the storage
            if end <= self.offset:
                return
        elif end > len(content):
            content.extend(bytes(end - len(content)))
        if self.kind == "write":
            content[self.offset : end] = self.data
        else:
            content[self.offset : end] = bytes(end - self.offset)

    def overlay(self, buf: memoryview, offset: int) -> None:
        """Show this change in *buf*, which holds the bytes from *offset* before it."""
        start = offset
        end = offset + buf.nbytes
        if self.kind == "resize":
            if self.offset < end:
                cut = max(self.offset, start)
                buf[cut - start :] = bytes(end - cut)
            return
        low, high = max(start, self.offset), min(end, self.end)
        if low >= high:
            return
        if self.kind == "write":
            buf[low - start : high - start] = self.data[low - self.offset : high - self.offset]
        else:
            # Discarded bytes read as zero, as from a punched hole.
            buf[low - start : high - start] = bytes(high - low)


class VolatileCache:
    """The pending changes, oldest first, and the size they give the storage."""

    def __init__(self) -> None:
        self.changes: list[CachedChange] = []
        self._size: int | None = None  # None: no change pending, the durable size holds

    def size(self, durable_size: int) -> int:
        """The size the storage reads as, given the durable storage's *durable_size*."""
        return durable_size if self._size is None else self._size

    def add(self, change: CachedChange, durable_size: int) -> None:
        """Append a change."""
        self._size = change.size_after(self.size(durable_size))
        self.changes.append(change)

    def overlay(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Apply the pending changes over *bufs*, which hold the durable bytes from *offset*."""
        if not self.changes:
            return
        position = offset
        for buf in bufs:
            for change in self.changes:
                change.overlay(buf, position)
            position += buf.nbytes

    def written_back(self, changes: Sequence[CachedChange]) -> None:
        """Forget *changes* (the oldest ones, or early write-backs): they reached the durable storage."""
        done = {id(change) for change in changes}
        self.changes = [change for change in self.changes if id(change) not in done]
        if not self.changes:
            self._size = None

    def early_candidates(self) -> list[CachedChange]:
        """The changes a disk may write back now, out of order: those no older pending change overlaps."""
        candidates = []
        for index, change in enumerate(self.changes):
            if not any(older.overlaps(change) for older in self.changes[:index]):
                candidates.append(change)
        return candidates

    def survivors(self, rng: random.Random | None, keep: float, sector: int | None) -> list[CachedChange]:
        """What a power loss leaves of the pending changes, in their order.

        ``rng`` ``None``: nothing. Otherwise each change (each *sector*-sized piece of it, if
        *sector* is given) survives with probability *keep*.
        """
        if rng is None:
            return []
        units = [piece for change in self.changes for piece in (change.pieces(sector) if sector else [change])]
        return [unit for unit in units if rng.random() < keep]

    def drop(self) -> None:
        """Forget everything pending (the power went)."""
        self.changes = []
        self._size = None
