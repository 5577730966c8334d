"""Memory budgets: what an opened image, with its whole backing chain, may hold in memory.

One :class:`MemoryBudget` is shared by every layer of a chain: a builder makes it
(:attr:`~imago.FormatDriverBuilder.budget`, from :meth:`~imago.FormatDriverBuilder.cache_size` and
:meth:`~imago.FormatDriverBuilder.memory_limit`) and :meth:`~imago.FormatDriverBuilder.below`
hands the parent's to each backing file. It has two limits:

* ``cache_size``: the bytes every :class:`~imago.MetadataCache` made with ``budget=`` holds,
  summed over all of them (every layer's L2 tables and refcount blocks, say). When a cache
  loads an entry that does not fit, the least recently used entries of *any* cache in the
  budget are evicted (dirty ones written back first, in their cache's dependency order).
* ``memory_limit``: the bytes drivers hold whole, outside caches (tables read at opening: a
  qcow2 L1 or refcount table), summed over the chain. A driver calls :meth:`MemoryBudget.hold`
  *before* reading such a table; what would exceed the limit raises
  :class:`~imago.ResourceLimitError` naming the file and what it would have held.

Both default to sizes no legitimate image needs more of (:data:`DEFAULT_CACHE_SIZE`,
:data:`DEFAULT_MEMORY_LIMIT`), so that a crafted image (or a deep chain of them) costs at most
that much memory, whatever it claims.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .errors import InvalidOptionError, ResourceLimitError

if TYPE_CHECKING:
    from .cache import MetadataCache

__all__ = ["DEFAULT_CACHE_SIZE", "DEFAULT_MEMORY_LIMIT", "MIN_CACHE_SIZE", "MemoryBudget"]

#: The default cap on the metadata caches of a chain, all layers together.
DEFAULT_CACHE_SIZE = 32 << 20
#: The default cap on what a chain holds whole (L1 tables, refcount tables, ...).
#: A qcow2 L1 table is at most 32 MiB (QEMU's limit); this admits a dozen such images.
DEFAULT_MEMORY_LIMIT = 512 << 20
#: The smallest cache size accepted (a cache must also hold two of its largest entries).
MIN_CACHE_SIZE = 64 << 10


def check_size(option: str, value: object, minimum: int) -> int:
    """*value* if it is an integer of at least *minimum* bytes; else :class:`InvalidOptionError` naming *option*."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidOptionError(option, f"must be a number of bytes, got {value!r}")
    if value < minimum:
        raise InvalidOptionError(option, f"must be at least {minimum} bytes, got {value}")
    return value


class MemoryBudget:
    """The memory one chain of images may use: ``cache_size`` for caches, ``memory_limit`` for whole tables.

    Made by the builder of the image the caller opens and shared down its chain (see the
    module's description). Drivers use it through :class:`~imago.MetadataCache` (``budget=``)
    and :meth:`hold`; the counters (:attr:`cached`, :attr:`peak_cached`, :attr:`held`) say what
    is used. Not thread-safe: a chain is used from one thread (or one event loop) at a time.
    """

    def __init__(self, *, cache_size: int = DEFAULT_CACHE_SIZE, memory_limit: int = DEFAULT_MEMORY_LIMIT) -> None:
        self._cache_size = check_size("cache_size", cache_size, MIN_CACHE_SIZE)
        self._memory_limit = check_size("memory_limit", memory_limit, 1)
        self._held = 0
        self._cached = 0
        self._peak_cached = 0
        # The largest entry a cache in the budget declared: what a load leaves room for.
        self._headroom = 0
        # Every cached entry of every cache in the budget, least recently used first: its size.
        self._order: OrderedDict[tuple[MetadataCache[Any, Any], Any], int] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"MemoryBudget(cache_size={self._cache_size}, memory_limit={self._memory_limit}, "
            f"cached={self._cached}, held={self._held})"
        )

    @property
    def cache_size(self) -> int:
        """The bytes the caches in this budget may hold together."""
        return self._cache_size

    @property
    def memory_limit(self) -> int:
        """The bytes :meth:`hold` may grant in total."""
        return self._memory_limit

    @property
    def cached(self) -> int:
        """The bytes the caches hold now."""
        return self._cached

    @property
    def peak_cached(self) -> int:
        """The most bytes the caches held at any time (:meth:`~imago.MetadataCache.put` says when it passes the cap)."""
        return self._peak_cached

    @property
    def held(self) -> int:
        """The bytes granted by :meth:`hold` and not released."""
        return self._held

    # --- whole tables ----------------------------------------------------------------------------

    def hold(self, filename: str | None, what: str, nbytes: int) -> None:
        """Grant *nbytes* for *what* (``"its L1 table"``) of the image *filename*, before it is read.

        Raises :class:`~imago.ResourceLimitError` (and grants nothing) when the chain would then
        hold more than :attr:`memory_limit`.
        """
        if nbytes < 0:
            raise ValueError(f"cannot hold a negative number of bytes: {nbytes}")
        if self._held + nbytes > self._memory_limit:
            raise ResourceLimitError(filename, what, nbytes, held=self._held, limit=self._memory_limit)
        self._held += nbytes

    def release(self, nbytes: int) -> None:
        """Give back *nbytes* granted by :meth:`hold` (a table replaced by a smaller one, or dropped)."""
        if not 0 <= nbytes <= self._held:
            raise ValueError(f"cannot release {nbytes} bytes: {self._held} are held")
        self._held -= nbytes

    # --- caches (used by MetadataCache) ------------------------------------------------------------

    def check_entry_size(self, entry_size: int, what: str) -> None:
        """Refuse a cache whose entries are too large for this budget to hold two of them.

        Raises :class:`~imago.InvalidOptionError` naming ``cache_size``. Accepted, the entry size
        is room every load leaves free (:attr:`headroom`).
        """
        if 2 * entry_size > self._cache_size:
            raise InvalidOptionError(
                "cache_size",
                f"{self._cache_size} bytes cannot hold two of the {entry_size}-byte entries of {what} "
                f"(at least {2 * entry_size} needed)",
            )
        self._headroom = max(self._headroom, entry_size)

    @property
    def headroom(self) -> int:
        """What a cache load leaves free: room for one entry put without a load (a new table).

        (The largest entry size of the caches in the budget.) So a table created right after
        loads (a new L2 table, put dirty) fits even when every cached entry is dirty.
        """
        return self._headroom

    def entry_added(self, cache: MetadataCache[Any, Any], key: object, size: int) -> None:
        """*cache* now holds *key* (*size* bytes), as its most recently used entry."""
        self._order[cache, key] = size
        self._cached += size
        if self._cached > self._peak_cached:
            self._peak_cached = self._cached

    def entry_used(self, cache: MetadataCache[Any, Any], key: object) -> None:
        """*cache*'s entry *key* was used: it is evicted last."""
        self._order.move_to_end((cache, key))

    def entry_removed(self, cache: MetadataCache[Any, Any], key: object) -> int:
        """*cache* no longer holds *key*: the bytes it was counted at."""
        size = self._order.pop((cache, key), 0)
        self._cached -= size
        return size

    def over(self, extra: int = 0) -> bool:
        """Whether the caches hold more than :attr:`cache_size` (counting *extra* bytes more)."""
        return self._cached + extra > self._cache_size

    def oldest(self) -> tuple[MetadataCache[Any, Any], Any] | None:
        """The least recently used entry some cache may evict now (not one being written back)."""
        for cache, key in self._order:
            if cache.evictable(key):
                return cache, key
        return None

    def drop_clean(self, keep: tuple[MetadataCache[Any, Any], Any] | None = None) -> None:
        """Evict clean entries, least recently used first, until the caches fit with :attr:`headroom` to spare.

        Nothing is written; *keep* (an entry just put) stays.
        """
        excess = self._cached + self._headroom - self._cache_size
        if excess <= 0:
            return
        victims = []
        for (cache, key), size in self._order.items():
            if (cache, key) != keep and cache.evictable(key) and not cache.is_dirty(key):
                victims.append((cache, key))
                excess -= size
                if excess <= 0:
                    break
        for cache, key in victims:
            cache.drop(key)
