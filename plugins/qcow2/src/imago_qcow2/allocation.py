"""Allocation for writes: L2 tables made ours, data clusters bound, copy-on-write.

Clusters of our own (COPIED) are written in place. Others (unallocated, zero, compressed,
shared with a snapshot) get new host clusters, and what the write leaves unwritten in them is
first filled with what the guest reads there now (copy-on-write, through the backing chain and
compressed data). An L2 table shared with a snapshot is copied before it is changed. Which
clusters a write binds, and what it copies, is the L2 entry width's business
(:mod:`imago_qcow2.l2_entries`); where new host clusters come from is the data placement's
(:mod:`imago_qcow2.placement`).

No write lands on metadata, whatever the tables claim (:mod:`imago_qcow2.overlap`): guest data
mapped onto a metadata cluster, an L2 table in a cluster holding other metadata, and an entry
whose release would free metadata each mark the image corrupt before anything changes.

The entries a write binds change in the cached L2 table before the engine writes the data. When
that data write fails (:meth:`Allocation.data_write_failed`), the binding is taken back, as long
as nothing made it permanent: no write-back ran since (it may have applied the releases of the
replaced entries), the table is still the cached one, no other write used the clusters, and the
entries are as the write left them. Otherwise the failed range keeps undefined content, but the
next flush would record entries naming space never written (past the end of the file, or a
freed cluster holding other bytes).
"""

from __future__ import annotations

from imago import FormatDriver, ShallowRaw, read_through

from .l2_entries import Fill, Update
from .overlap import Metadata
from .state import Qcow2State
from .tables import L2Table

__all__ = ["Allocation"]

#: How many guest clusters' unconfirmed bindings are remembered; beyond, all are forgotten (far more
#: than the requests a caller keeps in flight: a write succeeds or fails long before).
_UNWRITTEN_LIMIT = 4096


class _Unwritten:
    """A binding made for a write whose data is not known to be written: what undoes it."""

    __slots__ = ("bound", "frees", "live", "owned", "replaced", "table")

    def __init__(
        self, table: L2Table, bound: list[Update], replaced: list[Update], frees: list[tuple[int, int]], owned: bool
    ) -> None:
        self.table = table
        self.bound = bound
        self.replaced = replaced
        #: The releases (of the replaced entries) it scheduled.
        self.frees = frees
        #: Whether the host clusters were ours before (only the bitmaps changed).
        self.owned = owned
        #: Still undoable: no other write used its clusters.
        self.live = True


class Allocation:
    """Prepares writes: :meth:`ensure_data_mapping`, and L2 tables for any metadata change."""

    def __init__(self, state: Qcow2State, driver: FormatDriver) -> None:
        self._state = state
        # Copy-on-write reads what the driver's own mappings say; allocation changes them.
        self._driver = driver
        # Fixed for the image's life: bound once for the write path.
        self._in_place = state.entries.in_place
        self._metadata_under = state.placement.metadata_under
        self._guard = state.guard
        # Guest cluster -> the binding a write not yet seen to succeed made (see the module).
        self._unwritten: dict[int, _Unwritten] = {}
        self._write_backs = state.write_backs

    async def writable_table(self, offset: int) -> L2Table:
        """The L2 table for *offset*, made ours: created, or copied when shared with a snapshot.

        Called with the lock held.
        """
        state = self._state
        l1_index = offset >> state.table_shift
        current = state.l1[l1_index]
        if current:
            # An "L2 table" in the refcount table's cluster, say, is neither changed nor freed.
            await self._guard.check_l2_table(current, l1_index, state.header.l1_table_offset)
            if state.l1_copied[l1_index]:
                return await state.tables.get(current)
        host, _ = await state.refcounts.allocate(1)
        self._guard.placed(Metadata.ACTIVE_L2, (host >> state.cluster_bits,))
        raw = (await state.tables.get(current)).to_bytes() if current else bytes(state.cluster_size)
        table = state.new_table(raw, host)
        state.tables.put(host, table, dirty=True)
        # The table (and the refcounts allocating it) reach the disk before the L1 entry.
        await state.tables.flush()
        copied = state.l1_copied[l1_index]
        state.l1[l1_index] = host
        state.l1_copied[l1_index] = 1
        try:
            await state.write_l1_entries(l1_index, l1_index + 1)
        except BaseException:
            # The L1 entry on disk may still name the old table: so does this one, and the copy
            # is only a leak. (A failure before this point leaves the same.)
            state.l1[l1_index] = current
            state.l1_copied[l1_index] = copied
            raise
        if current:
            # Released only once no L1 entry names it any more: a failed copy must not drop the
            # reference the active table still holds.
            state.frees.append((current >> state.cluster_bits, 1))
        if current and current not in state.l1:
            self._guard.retired(Metadata.ACTIVE_L2, (current >> state.cluster_bits,))
        return table

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool = False) -> tuple[ShallowRaw, int]:
        """A writable mapping for (a prefix of) the range.

        Clusters of our own are written in place; others are allocated, with copy-on-write of
        the parts of the first and last cluster that the caller does not write (even with
        *overwrite*). A damaged image whose L2 entries map guest data onto its metadata is
        marked corrupt and the write refused; so is every write once the image is marked corrupt.
        """
        state = self._state
        guard = self._guard
        if guard.unsettled:
            await guard.settle()
        table = await state.table(offset)
        host, count = (0, 0) if table is None else self._in_place(table, offset, length)
        if count:
            mapping = ShallowRaw(state.data_storage, host, True)
            if self._unwritten:
                self._used(offset, count)
        else:
            async with state.lock:
                mapping, count = await self._allocate(offset, length, table)
        overlap = self._metadata_under(mapping.offset, count)
        if overlap is not None:
            await guard.refuse_data_write(mapping.offset, offset, overlap)
        return mapping, count

    async def _allocate(self, offset: int, length: int, seen: L2Table | None) -> tuple[ShallowRaw, int]:
        """Allocate for (a prefix of) the range; *seen*: its L2 table as looked up before the lock was taken."""
        state = self._state
        entries = state.entries
        cluster_bits = state.cluster_bits
        index = (offset >> cluster_bits) & state.l2_mask
        table_end = ((offset >> state.table_shift) + 1) << state.table_shift
        end = min(offset + length, table_end)
        last = ((end - 1) >> cluster_bits) & state.l2_mask
        first_guest = offset >> cluster_bits << cluster_bits
        # Decided on the table as it is, before it is made ours (a copy has the same entries):
        # nothing is written when the entries the write replaces cannot be released.
        # (The table seen before the lock, if it is still the cached one of this L1 entry.)
        l2_offset = state.l1[offset >> state.table_shift]
        current = seen if seen is not None and state.tables.peek(l2_offset) is seen else await state.table(offset)
        if current is not None:
            host, count = entries.in_place(current, offset, length)
            if count:  # allocated meanwhile
                if self._unwritten:
                    self._used(offset, count)
                return ShallowRaw(state.data_storage, host, True), count
            owned_host, count = entries.write_run(current, index, last)
            if owned_host is None:
                # The entries replaced are released: none may use metadata (it would be freed).
                await self._guard.check_entries(current, index, index + count, first_guest)
        table = await self.writable_table(offset)
        if current is None:
            owned_host, count = entries.write_run(table, index, last)
        if owned_host is None:
            host, count = await state.placement.allocate(first_guest, count)
        else:
            host = owned_host
        write_end = min(end, first_guest + (count << cluster_bits))
        fills, updates = entries.write_updates(table, index, count, host, offset, write_end, owned_host is not None)
        await self.copy_on_write(fills, host - first_guest)
        replaced = [entries.update(table, slot) for slot, _, _ in updates]
        scheduled = len(state.frees)
        entries.apply_updates(table, updates, state.placement.release if owned_host is None else None)
        state.tables.mark_dirty(table.offset)
        self._driver.mappings_changed()
        self._remember(
            first_guest >> cluster_bits,
            _Unwritten(table, updates, replaced, state.frees[scheduled:], owned_host is not None),
        )
        return ShallowRaw(state.data_storage, host + offset - first_guest, True), write_end - offset

    # --- bindings whose data write may still fail ----------------------------------------------

    def _forget(self) -> None:
        for record in self._unwritten.values():
            record.live = False
        self._unwritten.clear()

    def _current(self) -> bool:
        """Whether the remembered bindings are still undoable (else forget them: a write-back ran)."""
        if self._state.write_backs != self._write_backs:
            self._write_backs = self._state.write_backs
            self._forget()
            return False
        return True

    def _remember(self, first_cluster: int, record: _Unwritten) -> None:
        unwritten = self._unwritten
        if len(unwritten) > _UNWRITTEN_LIMIT or not self._current():
            self._forget()
        for cluster in range(first_cluster, first_cluster + len(record.bound)):
            earlier = unwritten.get(cluster)
            if earlier is not None:  # bound again since: undoing it would undo this write's binding too
                earlier.live = False
            unwritten[cluster] = record

    def _used(self, offset: int, length: int) -> None:
        """Another write uses the clusters of guest ``[offset, offset + length)``: their bindings stay."""
        if not self._current():
            return
        bits = self._state.cluster_bits
        unwritten = self._unwritten
        for cluster in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            record = unwritten.pop(cluster, None)
            if record is not None:
                record.live = False

    def data_write_failed(self, offset: int, length: int) -> None:
        """The data write of guest ``[offset, offset + length)`` failed: undo the binding made for it, if it may be.

        The replaced entries come back, their releases are cancelled and the new host clusters
        released (at the next flush, as every release is).
        """
        if not self._unwritten or not self._current():
            return
        state = self._state
        bits = state.cluster_bits
        records: list[_Unwritten] = []
        for cluster in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            record = self._unwritten.pop(cluster, None)
            if record is not None and record.live and record not in records:
                records.append(record)
        for record in records:
            record.live = False
            table = record.table
            entries = state.entries
            if state.tables.peek(table.offset) is not table:
                continue  # written back and evicted: the entries on disk are the ones made
            if any(entries.update(table, update[0]) != update for update in record.bound):
                continue
            if any(free not in state.frees for free in record.frees):
                continue
            entries.apply_updates(table, record.replaced, None)
            for free in record.frees:
                state.frees.remove(free)
            if not record.owned:
                for _, descriptor, _ in record.bound:
                    state.placement.release(descriptor)
            state.tables.mark_dirty(table.offset)
            self._driver.mappings_changed()

    async def copy_on_write(self, fills: list[Fill], delta: int) -> None:
        """Copy each guest range, as it reads now, to its new place (host offset = guest offset + *delta*)."""
        data_storage = self._state.data_storage
        for start, stop in fills:
            old = bytearray(stop - start)
            await read_through(self._driver, [memoryview(old)], start)
            await data_storage.writev([memoryview(old)], start + delta)
