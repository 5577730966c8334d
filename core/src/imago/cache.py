"""Metadata caches: LRU, write-back, and flush ordering between caches.

Format drivers keep metadata tables (qcow2 L2 tables, refcount blocks) in a
:class:`MetadataCache`. Entries are loaded on demand, evicted least-recently-used beyond the
capacity, and, when marked dirty, written back before eviction and on :meth:`flush`. A cache
can depend on others (``l2_cache.depends_on(refcount_cache)``): its dirty entries are only
written after the caches it depends on have been flushed, which is how metadata update order
is kept crash-safe.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["MetadataCache"]

K = TypeVar("K")
V = TypeVar("V")


class MetadataCache(Generic[K, V]):
    """An LRU cache of up to *capacity* entries, loaded by *load* and written back by *write*.

    *barrier* (typically the storage's ``flush``) runs after entries were written back, so
    that what depends on this cache reaches the disk only after it.
    """

    def __init__(
        self,
        capacity: int,
        load: Callable[[K], Awaitable[V]],
        write: Callable[[K, V], Awaitable[None]] | None = None,
        barrier: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._load = load
        self._write = write
        self._barrier = barrier
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._dirty: set[K] = set()
        self._dependencies: list[MetadataCache[Any, Any]] = []

    @property
    def capacity(self) -> int:
        """How many entries are kept at most."""
        return self._capacity

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    async def get(self, key: K) -> V:
        """The entry for *key*, loading it (and evicting the least recently used) if needed."""
        entries = self._entries
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
            return value
        value = await self._load(key)
        # A concurrent request may have loaded the same key meanwhile: keep the first copy.
        existing = entries.get(key)
        if existing is not None:
            entries.move_to_end(key)
            return existing
        entries[key] = value
        while len(entries) > self._capacity:
            await self._evict_oldest()
        return value

    def peek(self, key: K) -> V | None:
        """The cached entry for *key*, without loading or reordering."""
        return self._entries.get(key)

    def put(self, key: K, value: V, *, dirty: bool = False) -> None:
        """Insert or replace an entry (a newly created table, say).

        The cache may exceed its capacity until the next :meth:`get` evicts.
        """
        self._entries[key] = value
        self._entries.move_to_end(key)
        if dirty:
            self.mark_dirty(key)

    def mark_dirty(self, key: K) -> None:
        """Record that the cached entry for *key* differs from what is stored."""
        if key not in self._entries:
            raise KeyError(f"cannot mark an uncached entry dirty: {key!r}")
        if self._write is None:
            raise TypeError("this cache has no write-back function")
        self._dirty.add(key)

    def depends_on(self, other: MetadataCache[Any, Any]) -> None:
        """Flush *other* before writing any entry of this cache."""
        if other is self:
            raise ValueError("a cache cannot depend on itself")
        self._dependencies.append(other)

    @property
    def dirty(self) -> bool:
        """Whether entries wait to be written back."""
        return bool(self._dirty)

    def discard(self, key: K) -> None:
        """Forget the entry for *key* without writing it back."""
        self._entries.pop(key, None)
        self._dirty.discard(key)

    def clear(self) -> None:
        """Forget every entry without writing anything back."""
        self._entries.clear()
        self._dirty.clear()

    async def _write_entry(self, key: K) -> None:
        for dependency in self._dependencies:
            await dependency.flush()
        assert self._write is not None
        await self._write(key, self._entries[key])
        self._dirty.discard(key)
        if self._barrier is not None:
            await self._barrier()

    async def _evict_oldest(self) -> None:
        key = next(iter(self._entries))
        if key in self._dirty:
            await self._write_entry(key)
        self._entries.pop(key, None)

    async def flush(self) -> None:
        """Write back every dirty entry (after flushing the caches this one depends on)."""
        if not self._dirty:
            return
        for dependency in self._dependencies:
            await dependency.flush()
        assert self._write is not None
        for key in list(self._dirty):
            if key in self._entries:
                await self._write(key, self._entries[key])
            self._dirty.discard(key)
        if self._barrier is not None:
            await self._barrier()
