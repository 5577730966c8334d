"""Guest offset -> mapping: the read path.

A request costs an L1 look-up, a cache probe and the L2 entry width's own look-up (bound once);
this module is kept free of anything else, as every read goes through it.
"""

from __future__ import annotations

import re

from imago import ShallowEof, ShallowMapping

from .state import Qcow2State
from .tables import UNALLOCATED

__all__ = ["Mapper"]

#: Any byte that is not zero: finds the next L1 entry with an L2 table.
_NOT_ZERO = re.compile(b"[^\x00]")


class Mapper:
    """Answers :meth:`~imago.FormatDriver.get_mapping` for one image."""

    def __init__(self, state: Qcow2State) -> None:
        self._state = state
        # Fixed for the image's life: bound once, not looked up per request.
        self._tables = state.tables
        self._table_shift = state.table_shift
        self._lookup = state.entries.lookup
        self._not_data = state.entries.not_data

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """Where guest *offset* lives, and the length of its run.

        A run ends with its L2 table, except where no L2 table is allocated: then it reaches
        over every following L1 entry without one that *max_length* asks about.
        """
        state = self._state
        size = state.size
        if offset >= size:
            return ShallowEof(), max_length
        shift = self._table_shift
        l1_index = offset >> shift
        # Qcow2State.table, inlined: this is the hot path.
        l1 = state.l1
        l2_offset = l1[l1_index] if l1_index < len(l1) else 0
        if not l2_offset:
            return self._not_data(UNALLOCATED, offset), self._unallocated_end(l1_index, offset, max_length) - offset
        table_end = (l1_index + 1) << shift
        end = table_end if table_end < size else size
        tables = self._tables
        table = tables.peek(l2_offset)
        if table is None:
            table = await tables.get(l2_offset)
        return self._lookup(table, offset, end, max_length)

    def _unallocated_end(self, l1_index: int, offset: int, max_length: int) -> int:
        """Where the L1 entries without a table from *l1_index* end (for *max_length* bytes from *offset*)."""
        shift = self._table_shift
        size = self._state.size
        wanted = min(size, offset + max(max_length, 1))
        last = (wanted - 1) >> shift  # the last L1 entry asked about
        l1 = self._state.l1
        if last > l1_index and l1_index + 1 < len(l1):
            window = l1[l1_index + 1 : last + 1].tobytes()
            found = _NOT_ZERO.search(window)
            if found is not None:
                return (l1_index + 1 + found.start() // 8) << shift
        return min(size, (last + 1) << shift)
