"""An in-memory storage: the fuzz targets' images live in a bytearray, not in a file."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from imago import ClosedError, PreallocateMode, ReadOnlyError, Storage, StorageOpenOptions

__all__ = ["MAX_STORAGE_SIZE", "MemoryStorage"]

#: How far a fuzzed image may grow its storage. Past it, writes fail as a full disk does
#: (``OSError(ENOSPC)``), an OS error imago passes through unchanged.
MAX_STORAGE_SIZE = 64 << 20


class MemoryStorage(Storage):
    """A storage over a bytearray (copied from the input), bounded by :data:`MAX_STORAGE_SIZE`."""

    name = "fuzz-memory"

    def __init__(self, data: bytes | bytearray, *, writable: bool = False, label: str = "fuzz-input") -> None:
        self.data = bytearray(data)
        self._writable = writable
        self._closed = False
        self._label = label

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> MemoryStorage:
        """Not opened by options: the targets construct it around their input."""
        raise ReadOnlyError("fuzz memory storages are made by the fuzz targets, not opened by name")

    @property
    def size(self) -> int:
        """The bytes held."""
        return len(self.data)

    @property
    def writable(self) -> bool:
        """Whether writes are accepted."""
        return self._writable

    @property
    def filename(self) -> str | None:
        """A label naming the input in error messages."""
        return self._label

    def resolve_relative_path(self, name: str) -> str:
        """Names the image records resolve inside a directory that does not exist."""
        return os.path.join("/nonexistent-fuzz-dir", name)

    def _check(self, offset: int, length: int, *, write: bool) -> None:
        if self._closed:
            raise ClosedError(f"{self._label} is closed")
        if write and not self._writable:
            raise ReadOnlyError(self._label)
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")  # a bug above us: a finding
        if write and offset + length > MAX_STORAGE_SIZE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._label)

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Copy into *bufs*; past the end reads as zero."""
        self.readv_inline(bufs, offset)

    def readv_inline(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Copy into *bufs*; past the end reads as zero."""
        total = sum(len(buf) for buf in bufs)
        self._check(offset, total, write=False)
        data = self.data
        pos = offset
        for buf in bufs:
            length = len(buf)
            chunk = data[pos : pos + length]
            buf[: len(chunk)] = chunk
            if len(chunk) < length:
                buf[len(chunk) :] = bytes(length - len(chunk))
            pos += length

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Copy *bufs* in, growing the storage if needed."""
        total = sum(len(buf) for buf in bufs)
        self._check(offset, total, write=True)
        end = offset + total
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        pos = offset
        for buf in bufs:
            self.data[pos : pos + len(buf)] = buf
            pos += len(buf)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero the range, growing the storage if needed."""
        self._check(offset, length, write=True)
        await self.writev([memoryview(bytes(length))], offset)

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Truncate or extend with zeroes."""
        self._check(0, new_size, write=True)
        if new_size < len(self.data):
            del self.data[new_size:]
        else:
            self.data.extend(bytes(new_size - len(self.data)))

    async def close(self) -> None:
        """Further I/O raises :class:`ClosedError`."""
        self._closed = True
