"""Annotated storage: a wrapper that forwards everything and carries a tag.

Mappings point at storages; wrap each layer's storage in :class:`AnnotatedStorage` with a tag of
your choosing and ``mapping.storage.tag`` tells which layer a mapping points into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from .storage import PreallocateMode, Storage, StorageOpenOptions

__all__ = ["AnnotatedStorage"]

Tag = TypeVar("Tag")


class AnnotatedStorage(Storage, Generic[Tag]):
    """Wraps *inner*, forwards every operation to it, and carries *tag*."""

    name = "annotated"

    def __init__(self, inner: Storage, tag: Tag) -> None:
        if not isinstance(inner, Storage):
            raise TypeError(f"AnnotatedStorage wraps a Storage, got {type(inner).__name__}")
        self.inner = inner
        self.tag = tag

    @classmethod
    async def open(cls, options: StorageOpenOptions) -> AnnotatedStorage[Any]:
        """Not openable by options: construct it around an opened storage."""
        raise TypeError("Annotated storages are made with AnnotatedStorage(storage, tag), not opened by options")

    @property
    def size(self) -> int:
        """The inner storage's size."""
        return self.inner.size

    @property
    def writable(self) -> bool:
        """Whether the inner storage is writable."""
        return self.inner.writable

    @property
    def filename(self) -> str | None:
        """The inner storage's file name."""
        return self.inner.filename

    @property
    def mem_align(self) -> int:
        """The inner storage's memory alignment."""
        return self.inner.mem_align

    @property
    def req_align(self) -> int:
        """The inner storage's request alignment."""
        return self.inner.req_align

    async def readv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Forwarded."""
        await self.inner.readv(bufs, offset)

    def readv_inline(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Forwarded."""
        self.inner.readv_inline(bufs, offset)

    async def writev(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Forwarded."""
        await self.inner.writev(bufs, offset)

    async def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Forwarded."""
        await self.inner.write_zeroes(offset, length, unmap=unmap)

    async def discard(self, offset: int, length: int) -> None:
        """Forwarded."""
        await self.inner.discard(offset, length)

    async def flush(self) -> None:
        """Forwarded."""
        await self.inner.flush()

    async def sync(self) -> None:
        """Forwarded."""
        await self.inner.sync()

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Forwarded."""
        await self.inner.resize(new_size, prealloc)

    async def close(self) -> None:
        """Forwarded."""
        await self.inner.close()

    def resolve_relative_path(self, name: str) -> str:
        """Forwarded."""
        return self.inner.resolve_relative_path(name)

    def __repr__(self) -> str:
        return f"<AnnotatedStorage {self.tag!r} {self.inner!r}>"
