"""Guest offset -> mapping: the read path.

A request costs an L1 look-up, a cache probe and the L2 entry width's own look-up (bound once);
this module is kept free of anything else, as every read goes through it.
"""

from __future__ import annotations

from imago import ShallowEof, ShallowMapping

from .state import Qcow2State
from .tables import UNALLOCATED

__all__ = ["Mapper"]


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
        """Where guest *offset* lives, and the length of its run (up to the L2 table's end)."""
        state = self._state
        size = state.size
        if offset >= size:
            return ShallowEof(), max_length
        shift = self._table_shift
        l1_index = offset >> shift
        table_end = (l1_index + 1) << shift
        end = table_end if table_end < size else size
        # Qcow2State.table, inlined: this is the hot path.
        l1 = state.l1
        l2_offset = l1[l1_index] if l1_index < len(l1) else 0
        if not l2_offset:
            return self._not_data(UNALLOCATED, offset), end - offset
        tables = self._tables
        table = tables.peek(l2_offset)
        if table is None:
            table = await tables.get(l2_offset)
        return self._lookup(table, offset, end, max_length)
