"""Zeroing through metadata: write-zeroes and the three discards.

Whole clusters (whole subclusters, with extended L2 entries) are changed in their L2 entries:
the zero flag, keeping an allocation of our own (write_zeroes) or releasing it
(discard_to_zero), or unallocated (discard_to_any, discard_to_backing). What is left over at the
ends is for the engine to write. Released clusters are freed at the next flush, after the
entries no longer pointing to them are on disk. Entries that use metadata clusters are never
released (:mod:`imago_qcow2.overlap`): the image is marked corrupt instead.
"""

from __future__ import annotations

from imago import FormatDriver

from .allocation import Allocation
from .l2_entries import ZeroMode
from .state import Qcow2State

__all__ = ["Zeroing"]


class Zeroing:
    """Write-zeroes and discards of one image."""

    def __init__(self, state: Qcow2State, driver: FormatDriver, allocation: Allocation) -> None:
        self._state = state
        self._driver = driver
        self._allocation = allocation

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Zero flag on whole clusters, keeping allocations (version 3; version 2 writes zeroes)."""
        if self._state.header.version < 3:
            return offset, 0
        return await self.zero(offset, length, ZeroMode.KEEP)

    async def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        """Zero flag on whole clusters, releasing their space."""
        return await self.zero(offset, length, ZeroMode.ZERO)

    async def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        """Unallocate whole clusters (they read from the backing image, or as zero)."""
        return await self.zero(offset, length, ZeroMode.UNMAP)

    async def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        """Unallocate the range so it reads from the backing image again (whole clusters only)."""
        handled = await self.zero(offset, length, ZeroMode.UNMAP)
        return handled if handled[1] else (offset, 0)

    async def _compressed_at(self, offset: int) -> bool:
        """Whether the cluster at guest *offset* is compressed."""
        state = self._state
        table = await state.table(offset)
        index = (offset >> state.cluster_bits) & state.l2_mask
        return table is not None and bool(state.entries.compressed_descriptor(table, index))

    async def zero(self, offset: int, length: int, mode: ZeroMode) -> tuple[int, int]:
        """Apply *mode* to the whole units (clusters or subclusters) of the range; returns the part handled.

        The disk's last, partial cluster counts as whole. A compressed cluster the range covers
        only in part is left to the caller.
        """
        state = self._state
        cluster_size = state.cluster_size
        cluster_mask = cluster_size - 1
        unit = 1 << state.entries.zero_bits
        request_end = offset + length
        start = -(-offset // unit) * unit
        end = request_end // unit * unit
        if request_end == state.size:
            end = -(-request_end // cluster_size) * cluster_size  # the disk's last cluster, wholly
        zero_flag = state.header.version >= 3
        if end <= start or (mode is not ZeroMode.UNMAP and not zero_flag and state.backing is not None):
            return offset, 0
        if mode is not ZeroMode.UNMAP and not zero_flag:
            mode = ZeroMode.UNMAP  # version 2 without a backing file: unallocated reads as zero
        guard = state.guard
        if guard.unsettled:
            await guard.settle()
        async with state.lock:
            first_cluster = start & ~cluster_mask
            partly = start != first_cluster or end < first_cluster + cluster_size
            if start < end and partly and await self._compressed_at(start):
                start = first_cluster + cluster_size
            if start < end and end & cluster_mask and await self._compressed_at(end - 1):
                end &= ~cluster_mask
            if end <= start or start >= request_end:  # (the latter: inside the disk's last subcluster)
                return offset, 0
            release = state.placement.release
            position = start
            while position < end:
                table_end = min(end, ((position >> state.table_shift) + 1) << state.table_shift)
                if not state.l1[position >> state.table_shift] and (mode is ZeroMode.UNMAP or state.backing is None):
                    position = table_end  # unallocated already reads as asked
                    continue
                current = await state.table(position)
                if current is not None:
                    # Checked before the table is copied or changed: a release must not free metadata.
                    first_slot = (position >> state.cluster_bits) & state.l2_mask
                    stop_slot = (((table_end - 1) >> state.cluster_bits) & state.l2_mask) + 1
                    await guard.check_entries(current, first_slot, stop_slot, position & ~cluster_mask)
                table = await self._allocation.writable_table(position)
                state.entries.zero_entries(table, position, table_end, mode, release)
                state.tables.mark_dirty(table.offset)
                position = table_end
            self._driver.mappings_changed()
        await state.placement.zeroed(start, min(end, state.size) - start, mode)
        return start, min(end, request_end) - start
