"""The ``null`` storage driver."""

from __future__ import annotations

from collections.abc import Sequence

from imago import (
    ClosedError,
    InvalidOptionError,
    PreallocateMode,
    ReadOnlyError,
    Storage,
    StorageCreateOptions,
    StorageOpenOptions,
)
from imago.io_buffers import zero_fill

__all__ = ["Null"]


def _size_option(options: StorageOpenOptions | StorageCreateOptions, default: int) -> int:
    size = options.driver_options.get("size", default)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidOptionError("size", f"null storage size must be a non-negative integer, got {size!r}")
    return size


class Null(Storage):
    """*size* bytes of nothing: reads return zeroes, writes are discarded.

    Construct it directly (``Null(1 << 30)``), or open it by options with
    ``StorageOpenOptions(driver="null", driver_options={"size": ...})``.
    """

    name = "null"

    def __init__(self, size: int, *, writable: bool = True) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidOptionError("size", f"null storage size must be a non-negative integer, got {size!r}")
        self._size = size
        self._writable = writable
        self._closed = False

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> Null:
        """A null storage of ``driver_options["size"]`` bytes (default 0)."""
        return cls(_size_option(options, 0), writable=options.writable)

    @classmethod
    async def create(cls, options: StorageCreateOptions) -> Null:
        """A writable null storage of ``options.size`` bytes."""
        return cls(options.size)

    @property
    def size(self) -> int:
        """The size given at construction (or by :meth:`resize`)."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether writes are accepted (and dropped)."""
        return self._writable

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("null storage is closed")

    def _check_writable(self) -> None:
        self._check()
        if not self._writable:
            raise ReadOnlyError("null storage")

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill *bufs* with zeroes."""
        self._check()
        zero_fill(bufs)

    def readv_inline(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill *bufs* with zeroes."""
        self._check()
        zero_fill(bufs)

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Drop the data."""
        self._check_writable()

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Nothing to do: everything reads as zero."""
        self._check_writable()

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Change the size."""
        self._check_writable()
        self._size = new_size

    async def close(self) -> None:
        """Further I/O raises :class:`ClosedError`."""
        self._closed = True

    def __repr__(self) -> str:
        return f"<Null size={self._size}>"
