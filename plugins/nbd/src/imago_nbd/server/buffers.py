"""``BufferPool``: request buffers reused across the requests of every connection of an export.

A fresh multi-megabyte ``bytearray`` costs a page fault per page on first touch; reusing the
buffers of finished requests keeps a copy at memcpy speed. The pool is bounded in bytes, and
only buffers a reply or a write no longer references are given back.
"""

from __future__ import annotations

__all__ = ["BufferPool"]

#: Buffers smaller than this are not worth keeping.
MIN_POOLED = 64 * 1024


class BufferPool:
    """Free buffers by exact size, at most *capacity* bytes of them."""

    def __init__(self, capacity: int = 64 * 1024 * 1024) -> None:
        self.capacity = capacity
        self._free: dict[int, list[bytearray]] = {}
        self._held = 0

    def take(self, length: int) -> bytearray:
        """A buffer of *length* bytes (its content is whatever it held before)."""
        free = self._free.get(length)
        if free:
            self._held -= length
            return free.pop()
        return bytearray(length)

    def give(self, buffer: bytearray) -> None:
        """Hand back a buffer nothing references any more."""
        length = len(buffer)
        if length >= MIN_POOLED and self._held + length <= self.capacity:
            self._free.setdefault(length, []).append(buffer)
            self._held += length
