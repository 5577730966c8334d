"""``ReceiveBuffer``: bytes received but not decoded yet, taken off the front in whole messages."""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["ReceiveBuffer"]

# Consumed bytes are dropped from the front only past this much, so that a stream of small
# messages does not move the rest of the buffer once per message.
_COMPACT_AT = 64 * 1024


class ReceiveBuffer:
    """A growing byte buffer read from the front; ``position`` counts every byte ever taken."""

    __slots__ = ("_data", "_start", "position")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0
        #: Bytes taken (or skipped) since the buffer was made: the stream offset of the next byte.
        self.position = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._data += data

    def peek(self, length: int) -> bytes | None:
        """The next *length* bytes, left in place; ``None`` while fewer are buffered."""
        if len(self) < length:
            return None
        return bytes(self._data[self._start : self._start + length])

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...] | None:
        """The next ``layout.size`` bytes decoded by *layout*, removed; ``None`` while fewer are buffered."""
        if len(self._data) - self._start < layout.size:
            return None
        fields = layout.unpack_from(self._data, self._start)
        self._advance(layout.size)
        return fields

    def peek_unpack(self, layout: struct.Struct) -> tuple[Any, ...] | None:
        """The next ``layout.size`` bytes decoded by *layout*, left in place; ``None`` while fewer are buffered."""
        if len(self._data) - self._start < layout.size:
            return None
        return layout.unpack_from(self._data, self._start)

    def take(self, length: int) -> bytes | None:
        """The next *length* bytes, removed; ``None`` (nothing removed) while fewer are buffered."""
        if len(self) < length:
            return None
        start = self._start
        with memoryview(self._data) as view:  # one copy, not a bytearray slice and then bytes
            chunk = bytes(view[start : start + length])
        self._advance(length)
        return chunk

    def skip(self, length: int) -> int:
        """Drop up to *length* bytes from the front; returns how many were dropped."""
        dropped = min(length, len(self))
        self._advance(dropped)
        return dropped

    def take_all(self) -> bytes:
        """Every buffered byte, removed."""
        rest = bytes(self._data[self._start :])
        self._advance(len(rest))
        return rest

    def _advance(self, length: int) -> None:
        self._start += length
        self.position += length
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        elif self._start >= _COMPACT_AT:
            del self._data[: self._start]
            self._start = 0
