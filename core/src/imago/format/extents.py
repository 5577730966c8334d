"""A cache of raw extents: guest ranges the engine already resolved to a storage range.

Reads that fall inside a cached extent skip the driver entirely (the synchronous API's fast
path). The cache is valid for one mapping epoch of the driver; any mapping change drops it.
"""

# No ``from __future__ import annotations``: NamedTuple would turn every field's annotation
# string into a typing.ForwardRef, which compiles it (the first compile of a process is slow).
from bisect import bisect_right
from typing import NamedTuple

from ..storage import Storage

__all__ = ["Extent", "ExtentCache"]

# Extents kept at most; past that the cache starts over (cheaper than an eviction policy).
_MAX_EXTENTS = 64


class Extent(NamedTuple):
    """Guest ``[start, end)`` lives in *storage* at guest offset + *delta*."""

    start: int
    end: int
    storage: Storage
    delta: int


class ExtentCache:
    """Sorted, non-nested raw extents of one mapping epoch."""

    __slots__ = ("epoch", "extents", "starts")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.starts: list[int] = []
        self.extents: list[Extent] = []

    def find(self, offset: int, length: int) -> Extent | None:
        """The extent holding all of ``[offset, offset + length)``, if cached."""
        index = bisect_right(self.starts, offset) - 1
        if index >= 0:
            extent = self.extents[index]
            if offset + length <= extent.end:
                return extent
        return None

    def add(self, extent: Extent) -> None:
        """Remember *extent*; extents it contains are dropped, and it is dropped if contained."""
        starts, extents = self.starts, self.extents
        index = bisect_right(starts, extent.start)
        if index and extents[index - 1].end >= extent.end:
            return
        # The same run seen from a lower offset supersedes the entries it covers.
        high = index
        while high < len(extents) and extents[high].end <= extent.end:
            high += 1
        if len(extents) - (high - index) >= _MAX_EXTENTS:
            starts.clear()
            extents.clear()
            index = high = 0
        starts[index:high] = [extent.start]
        extents[index:high] = [extent]
