"""Metadata caches: LRU, write-back, flush ordering between caches, and memory budgets.

Format drivers keep metadata tables (qcow2 L2 tables, refcount blocks) in a
:class:`MetadataCache`. Entries are loaded on demand, evicted least-recently-used beyond the
capacity, and, when marked dirty, written back before eviction and on :meth:`flush`. A cache
can depend on others (``l2_cache.depends_on(refcount_cache)``): its dirty entries are only
written after the caches it depends on have been flushed, which is how metadata update order
is kept crash-safe.

A cache made with ``budget=`` (a :class:`~imago.MemoryBudget`) counts its entries' bytes
against the budget's ``cache_size``, shared with every other cache of the budget (all the
layers of a backing chain): loading an entry that does not fit evicts the least recently used
entries of any of them. A cache may thus shrink to very few entries; an entry evicted while a
caller still holds it (a table being changed) is not lost: while any reference to it lives, the
cache hands out that same object again (:meth:`MetadataCache.get`) and takes it back when it is
marked dirty (:meth:`MetadataCache.mark_dirty`). (Entries must support weak references for
that; classes with ``__slots__`` list ``"__weakref__"``.)
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from .budget import MemoryBudget

__all__ = ["MetadataCache"]

K = TypeVar("K")
V = TypeVar("V")


class MetadataCache(Generic[K, V]):
    """An LRU cache of up to *capacity* entries, loaded by *load* and written back by *write*.

    *barrier* (typically the storage's ``flush``) runs after entries were written back, so
    that what depends on this cache reaches the disk only after it.

    With *budget* the entries' bytes count against ``budget.cache_size`` (see the module's
    description); *capacity* may then be ``None`` (no limit of its own). *entry_size* is the
    largest size of one entry (the budget must hold two), *sizeof* tells an entry's actual size
    (default: *entry_size*), *name* says what the cache holds, for messages.
    """

    def __init__(
        self,
        capacity: int | None,
        load: Callable[[K], Awaitable[V]],
        write: Callable[[K, V], Awaitable[None]] | None = None,
        barrier: Callable[[], Awaitable[None]] | None = None,
        *,
        budget: MemoryBudget | None = None,
        entry_size: int = 0,
        sizeof: Callable[[V], int] | None = None,
        name: str = "a metadata cache",
    ) -> None:
        if capacity is None and budget is None:
            raise ValueError("a cache without a budget needs a capacity")
        if capacity is not None and capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        if budget is not None:
            if entry_size < 1:
                raise ValueError(f"a cache in a budget needs its entry size, got {entry_size}")
            budget.check_entry_size(entry_size, name)
        self._capacity = capacity
        self._load = load
        self._write = write
        self._barrier = barrier
        self._budget = budget
        self._entry_size = entry_size
        self._sizeof = sizeof
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._dirty: set[K] = set()
        self._dependencies: list[MetadataCache[Any, Any]] = []
        # Entries being written back for eviction: not chosen again meanwhile.
        self._evicting: set[K] = set()
        # Evicted entries some caller still holds: handed out again rather than read anew.
        self._evicted: weakref.WeakValueDictionary[K, Any] = weakref.WeakValueDictionary()
        self._nbytes = 0
        self._evictions_written = 0

    @property
    def capacity(self) -> int | None:
        """How many entries are kept at most (``None``: as many as the budget allows)."""
        return self._capacity

    @property
    def budget(self) -> MemoryBudget | None:
        """The budget the entries count against, if any."""
        return self._budget

    @property
    def evictions_written(self) -> int:
        """How many dirty entries were written back to be evicted (rather than by :meth:`flush`)."""
        return self._evictions_written

    @property
    def nbytes(self) -> int:
        """The bytes this cache's entries are counted at (0 without a budget)."""
        return self._nbytes

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
            if self._budget is not None:
                self._budget.entry_used(self, key)
            return value
        # An entry evicted while a caller holds it is that caller's, changes and all.
        value = self._evicted.get(key)
        if value is None:
            value = await self._load(key)
        if self._budget is not None:
            # Room for this entry and one more (see MemoryBudget.headroom).
            size = self._size(value) + self._budget.headroom
            while self._budget.over(size) and key not in entries:
                victim = self._budget.oldest()
                if victim is None:
                    break  # everything else is being written back: over the budget for now
                await victim[0].evict(victim[1])
        # A concurrent request may have loaded the same key meanwhile: keep the first copy.
        existing = entries.get(key)
        if existing is not None:
            entries.move_to_end(key)
            return existing
        held = self._evicted.pop(key, None)
        if held is not None:
            value = held  # (evicted and held while this one was read: the held one is newer)
        self._insert(key, value)
        capacity = self._capacity
        while capacity is not None and len(entries) > capacity:
            await self.evict(next(iter(entries)))
        return value

    def peek(self, key: K) -> V | None:
        """The cached entry for *key*, without loading or reordering."""
        return self._entries.get(key)

    def put(self, key: K, value: V, *, dirty: bool = False) -> None:
        """Insert or replace an entry (a newly created table, say).

        The cache may exceed its capacity until the next :meth:`get` evicts. In a budget, an
        entry put right after a load fits in the room every load leaves
        (:attr:`MemoryBudget.headroom`), and clean entries are evicted at once to restore that
        room. Only when every other entry is dirty and several are put without a load between
        them is the budget exceeded, until the next :meth:`get` or :meth:`flush` writes them back.
        """
        if key in self._entries:
            self._forget(key)
        self._evicted.pop(key, None)  # (superseded: never handed back)
        self._insert(key, value)
        if self._budget is not None and self._budget.over(self._budget.headroom):
            self._budget.drop_clean(keep=(self, key))
        if dirty:
            self.mark_dirty(key)

    def mark_dirty(self, key: K) -> None:
        """Record that the cached entry for *key* differs from what is stored.

        An entry evicted while its caller held it (and changed it) is taken back first.
        """
        if key not in self._entries:
            evicted = self._evicted.pop(key, None)
            if evicted is None:
                raise KeyError(f"cannot mark an uncached entry dirty: {key!r}")
            self.put(key, evicted)
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

    def is_dirty(self, key: K) -> bool:
        """Whether the entry for *key* waits to be written back."""
        return key in self._dirty

    def evictable(self, key: K) -> bool:
        """Whether the entry for *key* may be evicted now (it is not being written back)."""
        return key not in self._evicting

    def discard(self, key: K) -> None:
        """Forget the entry for *key* without writing it back (nor handing it out again)."""
        if key in self._entries:
            self._forget(key)
        self._dirty.discard(key)
        self._evicted.pop(key, None)

    def clear(self) -> None:
        """Forget every entry without writing anything back."""
        for key in list(self._entries):
            self._forget(key)
        self._dirty.clear()
        self._evicted.clear()

    def drop(self, key: K) -> None:
        """Evict the clean entry for *key* (nothing to write); a caller holding it keeps it."""
        if key in self._dirty:
            raise ValueError(f"cannot drop a dirty entry: {key!r}")
        value = self._forget(key)
        if value is not None:
            self._remember(key, value)

    async def evict(self, key: K) -> None:
        """Evict the entry for *key*, written back first if dirty (after the caches it depends on)."""
        if key in self._dirty:
            self._evicting.add(key)
            try:
                await self._write_entry(key)
            finally:
                self._evicting.discard(key)
            self._evictions_written += 1
            if key in self._dirty:
                # Changed again while it was written: kept, as the most recently used.
                self._entries.move_to_end(key)
                if self._budget is not None:
                    self._budget.entry_used(self, key)
                return
        self.drop(key)

    # --- internals -------------------------------------------------------------------------------

    def _size(self, value: V) -> int:
        return self._entry_size if self._sizeof is None else self._sizeof(value)

    def _insert(self, key: K, value: V) -> None:
        self._entries[key] = value
        if self._budget is not None:
            size = self._size(value)
            self._nbytes += size
            self._budget.entry_added(self, key, size)

    def _forget(self, key: K) -> V | None:
        value = self._entries.pop(key, None)
        if value is not None and self._budget is not None:
            self._nbytes -= self._budget.entry_removed(self, key)
        return value

    def _remember(self, key: K, value: V) -> None:
        # (Entries without weak references are simply gone.)
        with contextlib.suppress(TypeError):
            self._evicted[key] = value

    async def _write_entry(self, key: K) -> None:
        for dependency in self._dependencies:
            await dependency.flush()
        assert self._write is not None
        value = self._entries.get(key)
        if value is None or key not in self._dirty:
            return  # (written back or discarded meanwhile)
        self._dirty.discard(key)
        try:
            await self._write(key, value)
        except BaseException:
            self._dirty.add(key)
            raise
        if self._barrier is not None:
            await self._barrier()

    async def flush(self) -> None:
        """Write back every dirty entry (after flushing the caches this one depends on)."""
        if self._dirty:
            for dependency in self._dependencies:
                await dependency.flush()
            assert self._write is not None
            for key in list(self._dirty):
                value = self._entries.get(key)
                self._dirty.discard(key)  # (before writing: a change made meanwhile marks it again)
                if value is not None:
                    try:
                        await self._write(key, value)
                    except BaseException:
                        self._dirty.add(key)
                        raise
            if self._barrier is not None:
                await self._barrier()
        if self._budget is not None and self._budget.over(self._budget.headroom):
            self._budget.drop_clean()  # (room put() could not make, or the next put needs)
