"""Atomic switchovers: refcounts, the active L1 table and the snapshot table changed in one write.

``qemu-img check`` requires a data cluster's COPIED flag in the active tables to be set exactly
when its refcount is 1. Creating or deleting a snapshot moves clusters between refcount 1 and
2, so the refcount (in a refcount block) and the flag (in an active L2 table) must change at
the same moment, and with them the snapshot table that explains the new refcount. Changed in
place, one after the other, a crash between them leaves ``ERROR OFLAG_COPIED``, whatever the
order.

A switchover therefore writes everything that changes to free clusters first: copies of the
refcount blocks that change and a new refcount table pointing to them, a new active L1 table
(pointing to new copies of the L2 tables whose flags change), a new snapshot table. Then one
header write (``l1_table_offset`` through ``snapshots_offset`` are adjacent: bytes 40 to 72)
switches all of them at once. A crash before it leaves the new clusters as leaks; after it,
the old structures are leaks until they are released.
"""

from __future__ import annotations

import sys
from array import array

import attrs

from imago import AllocationError, CorruptImageError

from .overlap import Metadata
from .refcounts import REFTABLE_OFFSET_MASK, RefcountBlock
from .snapshot_table import MAX_TABLE_BYTES, Snapshot, encode_snapshot_table, snapshot_table_length
from .state import Qcow2State
from .tables import encode_l1, table_clusters

__all__ = ["ActiveL1", "Switchover"]

# Attempts at placing the new refcount structure before giving up (each retry follows a move
# of the current refcount table, which allocating the new structure may cause).
_ATTEMPTS = 4


@attrs.frozen
class ActiveL1:
    """A new active L1 table: where it goes, its entries and COPIED flags.

    The new L2 tables it points to (copies with other COPIED flags) wait in the L2 cache,
    dirty, until the switchover writes them.
    """

    offset: int
    entries: array[int]
    copied: bytearray
    #: How many of its L2 tables are new copies.
    copies: int = 0


class Switchover:
    """Builds and performs one switchover on an image (with its lock held)."""

    def __init__(self, state: Qcow2State) -> None:
        self._state = state

    async def switch(
        self,
        *,
        changes: dict[int, int],
        snapshots: list[Snapshot],
        l1: ActiveL1 | None = None,
        releases: dict[int, int] | None = None,
    ) -> None:
        """Switch to *snapshots*, refcounts plus *changes*, and the active *l1* (if given), at once.

        *changes* (cluster: delta) must leave every refcount at least 1; what drops to zero is
        in *releases*, applied after the switch with the old snapshot table's, old refcount
        table's and replaced refcount blocks' clusters.
        """
        state = self._state
        refcounts = state.refcounts
        data, placed = encode_snapshot_table(snapshots)
        if len(data) > MAX_TABLE_BYTES:
            raise AllocationError(state.filename, "a snapshot table", "it would exceed 64 MiB")
        table_offset = await refcounts.allocate_table(len(data))
        placed = [s.__replace__(table_offset=table_offset + s.table_offset) for s in placed]
        shadow = await self._shadow(changes) if changes else None

        # Everything the header will point to reaches the disk before the header does (the
        # current refcount blocks too: they hold the new clusters' allocations).
        await refcounts.flush()
        await state.tables.flush()
        storage = state.storage
        if l1 is not None and l1.entries:
            await state.write_metadata(Metadata.ACTIVE_L1, l1.offset, encode_l1(l1.entries, l1.copied))
        if data:
            await state.write_metadata(Metadata.SNAPSHOT_TABLE, table_offset, data)
        # All five fields from byte 40 to 72, changed or not: adjacent, they go in one write.
        header = state.header
        fields = {
            "l1_table_offset": header.l1_table_offset if l1 is None else l1.offset,
            "refcount_table_offset": header.refcount_table_offset,
            "refcount_table_clusters": header.refcount_table_clusters,
            "nb_snapshots": len(placed),
            "snapshots_offset": table_offset,
        }
        old_snapshots = table_clusters(
            state.header.snapshots_offset,
            snapshot_table_length(state.snapshots, state.header.snapshots_offset),
            state.cluster_bits,
        )
        freed = dict(releases or {})
        for cluster in old_snapshots:
            freed[cluster] = freed.get(cluster, 0) - 1
        if shadow is not None:
            new_table, new_offset, blocks, replaced = shadow
            for block in blocks.values():
                await state.write_metadata(Metadata.REFCOUNT_BLOCK, block.offset, block.data)
            raw = array("Q", new_table)
            if sys.byteorder == "little":
                raw.byteswap()
            await state.write_metadata(Metadata.REFCOUNT_TABLE, new_offset, raw.tobytes())
            fields["refcount_table_offset"] = new_offset
            old_table = table_clusters(
                header.refcount_table_offset, header.refcount_table_clusters << state.cluster_bits, state.cluster_bits
            )
            for cluster in [*old_table, *(offset >> state.cluster_bits for offset in replaced)]:
                freed[cluster] = freed.get(cluster, 0) - 1
        await storage.flush()

        # The switch: one write (the fields are adjacent), flushed.
        await state.update_header(**fields)
        state.snapshots = placed
        if shadow is not None:
            # (The new blocks are on disk: they are read again when needed.)
            refcounts.reload(state.header)
        if l1 is not None:
            state.l1 = l1.entries
            state.l1_copied = l1.copied
        await refcounts.apply(freed)

    async def _shadow(self, changes: dict[int, int]) -> tuple[array[int], int, dict[int, RefcountBlock], list[int]]:
        """A new refcount table and copies of the blocks *changes* touch, in new clusters.

        Returns the new table, its offset, the new blocks by table index, and the offsets of
        the blocks they replace (still counted as in use in the new structure).
        """
        state = self._state
        refcounts = state.refcounts
        cluster_bits = state.cluster_bits
        block_bits = refcounts.entries_per_block.bit_length() - 1
        for _ in range(_ATTEMPTS):
            table = await refcounts.table()
            header = state.header
            indexes = sorted({cluster >> block_bits for cluster in changes})
            for index in indexes:
                if index >= len(table) or not table[index]:
                    raise CorruptImageError(
                        state.filename,
                        index << (block_bits + cluster_bits),
                        "clusters in use have no refcount block (repair: qemu-img check -r all)",
                    )
            # The new structure's clusters are allocated in the current one: the copies then
            # count them as in use.
            new_offset = await refcounts.allocate_table(header.refcount_table_clusters << cluster_bits)
            places = [(await refcounts.allocate(1))[0] for _ in indexes]
            if state.header.refcount_table_offset == header.refcount_table_offset:
                break
            # Allocating moved the refcount table: give the clusters back and start over.
            await refcounts.change(new_offset >> cluster_bits, header.refcount_table_clusters, -1)
            for place in places:
                await refcounts.change(place >> cluster_bits, 1, -1)
        else:
            raise AllocationError(state.filename, "a new refcount structure", "the refcount table kept moving")
        table = await refcounts.table()
        new_table = array("Q", table)
        blocks: dict[int, RefcountBlock] = {}
        for index, place in zip(indexes, places, strict=True):
            old = await refcounts.blocks.get(table[index] & REFTABLE_OFFSET_MASK)
            blocks[index] = RefcountBlock(bytearray(old.data), offset=place, refcount_order=header.refcount_order)
            new_table[index] = place
        mask = refcounts.entries_per_block - 1
        for cluster, delta in changes.items():
            block = blocks[cluster >> block_bits]
            value = block.get(cluster & mask) + delta
            if not 1 <= value <= block.max_refcount:
                raise CorruptImageError(
                    state.filename,
                    cluster << cluster_bits,
                    f"refcount would become {value} (repair: qemu-img check -r all)",
                )
            block.set(cluster & mask, value)
        return new_table, new_offset, blocks, [table[index] & REFTABLE_OFFSET_MASK for index in indexes]
