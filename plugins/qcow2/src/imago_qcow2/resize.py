"""Resizing: growing (L1 table first, the size last), shrinking, and preallocating the new area.

Growing moves the L1 table to a larger place when it cannot map the new size: the new table
is written and flushed before the header points to it, and the old one is released after.
The size is recorded last. Shrinking releases the clusters past the new end first, and
records the smaller size only once that is on disk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from imago import FormatAccess, FormatDriver, InvalidRequestError, PreallocateMode, UnsupportedFeatureError

from .allocation import Allocation
from .l2_entries import ZeroMode
from .layout import MAX_L1_BYTES
from .overlap import Metadata
from .state import Qcow2State
from .tables import OFLAG_COPIED, encode_l1, table_clusters
from .zeroing import Zeroing

__all__ = ["Resizer"]

# Zeroes written at once when preallocating with PreallocateMode.FULL.
_ZERO_CHUNK = 1 << 20


class Resizer:
    """Changes the virtual size of one image."""

    def __init__(self, state: Qcow2State, driver: FormatDriver, allocation: Allocation, zeroing: Zeroing) -> None:
        self._state = state
        # The engine writes the zeroes that keep old data from reappearing in a grown disk.
        self._driver = driver
        self._allocation = allocation
        self._zeroing = zeroing
        # How preallocation binds host clusters, by what the L2 entry width can express.
        self._bind = self._reserve_hosts if state.entries.reserves_hosts else self._allocate_data

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Grow (L1 table first, the size last) or shrink (clusters past the end released).

        Shrinking below the disk size an internal snapshot records is refused. Growing over a
        larger backing file makes the new area read as zero, not as the backing file.
        """
        state = self._state
        if new_size % 512:
            # QEMU counts qcow2 disks in sectors: it refuses such a size too.
            raise InvalidRequestError(f"{state.filename}: the new size ({new_size} bytes) must be a multiple of 512")
        cluster_bits = state.cluster_bits
        old_size = state.size
        if new_size < old_size:
            cut = [s.name or s.id for s in state.snapshots if s.disk_size > new_size]
            if cut:
                raise UnsupportedFeatureError(
                    f"shrinking below the size of internal snapshots ({', '.join(cut)})", state.filename
                )
            # Whole clusters past the new end are released, the old last partial one included.
            first_gone = -(-new_size >> cluster_bits) << cluster_bits
            if first_gone < old_size:
                await self._zeroing.zero(first_gone, old_size - first_gone, ZeroMode.UNMAP)
                # The released L2 entries reach the disk before the smaller size does: else a
                # crash could leave them behind, and growing again would bring the old data back.
                await state.flush()
            await self._set_size(new_size)
            return
        if new_size == old_size:
            return
        needed = state.header.l1_entries_needed(new_size)
        if needed * 8 > MAX_L1_BYTES:
            raise InvalidRequestError(f"{state.filename}: {new_size} bytes is too large for this cluster size")
        async with state.lock:
            if needed > len(state.l1):
                await self._grow_l1(needed)
        # What the old last cluster holds past the old end must not reappear.
        cluster_size = state.cluster_size
        tail_end = min(new_size, -(-old_size // cluster_size) * cluster_size)
        await self._set_size(new_size)
        if tail_end > old_size:
            await FormatAccess(self._driver).write_zeroes(old_size, tail_end - old_size)
        backing = state.backing
        if backing is not None and backing.size > old_size:
            await FormatAccess(self._driver).write_zeroes(old_size, min(new_size, backing.size) - old_size)
        if prealloc in (PreallocateMode.METADATA, PreallocateMode.FALLOC, PreallocateMode.FULL):
            await self._preallocate(old_size, new_size, prealloc)

    async def _grow_l1(self, entries: int) -> None:
        """Move the L1 table to a larger place: written and flushed before the header points to it."""
        state = self._state
        host = await state.refcounts.allocate_table(entries * 8)
        # The new entries are zero: the table is written whole, up to its clusters' end.
        raw = encode_l1(state.l1, state.l1_copied)
        raw += bytes(-(-entries * 8 >> state.cluster_bits << state.cluster_bits) - len(raw))
        await state.refcounts.flush()
        await state.tables.flush()
        await state.write_metadata(Metadata.ACTIVE_L1, host, raw)
        await state.storage.flush()
        old_offset, old_entries = state.header.l1_table_offset, len(state.l1)
        await state.update_header(l1_size=entries, l1_table_offset=host)
        state.l1.extend([0] * (entries - len(state.l1)))
        state.l1_copied.extend(bytes(entries - len(state.l1_copied)))
        old_clusters = table_clusters(old_offset, old_entries * 8, state.cluster_bits)
        if old_clusters:
            state.frees.append((old_clusters.start, len(old_clusters)))

    async def _set_size(self, new_size: int) -> None:
        """Record the disk size in the header (after the L1 table can map it)."""
        state = self._state
        await state.update_header(size=new_size)
        state.size = new_size
        await state.placement.resized(new_size)
        self._driver.mappings_changed()

    # --- preallocation ------------------------------------------------------------------------

    async def _preallocate(self, start: int, end: int, prealloc: PreallocateMode) -> None:
        """Bind host clusters to the clusters of ``[start, end)``.

        FULL writes zeroes into them, FALLOC reserves them, METADATA only maps them; the data
        storage grows to hold them.
        """
        storage = self._state.data_storage
        host_end = 0
        # Past the file's end new clusters read as zero by themselves; inside it they may be freed
        # clusters that still hold old data.
        old_end = storage.size
        async for host, length in self._bind(start, end):
            if prealloc is PreallocateMode.FULL:
                zeroes = memoryview(bytes(min(length, _ZERO_CHUNK)))
                for done in range(0, length, zeroes.nbytes):
                    step = min(zeroes.nbytes, length - done)
                    await storage.writev([zeroes[:step]], host + done)
            elif host < old_end:
                await storage.write_zeroes(host, min(length, old_end - host))
            host_end = max(host_end, host + length)
        if host_end > storage.size:
            mode = PreallocateMode.FALLOC if prealloc is PreallocateMode.FALLOC else PreallocateMode.NONE
            await storage.resize(host_end, mode)

    async def _allocate_data(self, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """Allocate the range as written data (standard entries cannot bind a host cluster otherwise).

        Yields each host span ``(offset, length)`` as soon as it is mapped.
        """
        position = start
        while position < end:
            mapping, length = await self._allocation.ensure_data_mapping(position, end - position)
            yield mapping.offset, length
            position += length

    async def _reserve_hosts(self, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """Bind host clusters to the clusters without one, as QEMU does with extended L2 entries.

        Their subclusters keep their state (unallocated ones still read from the backing file,
        or as zero). Yields the host spans ``(offset, length)`` bound, once all are.
        """
        state = self._state
        entries = state.entries
        cluster_bits = state.cluster_bits
        spans: list[tuple[int, int]] = []
        async with state.lock:
            position = start
            while position < end:
                table_end = min(end, ((position >> state.table_shift) + 1) << state.table_shift)
                table = await self._allocation.writable_table(position)
                descriptors = entries.descriptors(table)
                cluster, stop = position >> cluster_bits, -(-table_end >> cluster_bits)
                while cluster < stop:
                    slot = cluster & state.l2_mask
                    count = 0
                    while cluster + count < stop and not descriptors[slot + count]:
                        count += 1
                    if not count:
                        cluster += 1  # already bound (or compressed): left as it is
                        continue
                    host, count = await state.placement.allocate(cluster << cluster_bits, count)
                    for step in range(count):
                        entries.set(table, slot + step, (host + (step << cluster_bits)) | OFLAG_COPIED)
                    spans.append((host, count << cluster_bits))
                    cluster += count
                state.tables.mark_dirty(table.offset)
                position = table_end
            self._driver.mappings_changed()
        for span in spans:
            yield span
