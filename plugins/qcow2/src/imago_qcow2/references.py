"""The reference walk: which host clusters an L1 tree, or the whole image's metadata, uses.

Refcounts count every path from an L1 table, as QEMU counts them (and ``qemu-img check``
verifies): a data cluster reached from the active L1 table and from a snapshot's has
refcount 2, even through one shared L2 table. COPIED flags (refcount exactly 1) are kept in
the active tables only. Snapshot operations use the walk to change refcounts; opening for
writing uses it to find the clusters metadata occupies.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from imago import CorruptImageError

from .refcounts import REFTABLE_OFFSET_MASK
from .snapshot_table import Snapshot, snapshot_table_length
from .state import Qcow2State
from .tables import L2_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, encode_l1, entry_clusters, read_l1, table_clusters

__all__ = ["References"]


class References:
    """Reference counting by walking the metadata of one image."""

    def __init__(self, state: Qcow2State) -> None:
        self._state = state

    async def snapshot_l1(self, snapshot: Snapshot) -> tuple[array[int], bytearray]:
        """A snapshot's L1 table, validated: its L2 table offsets (0: none) and COPIED flags."""
        state = self._state
        return await read_l1(
            state.storage,
            table_offset=snapshot.l1_table_offset,
            entries=snapshot.l1_size,
            cluster_bits=state.cluster_bits,
            filename=state.filename,
        )

    async def tree_references(self, l1: Sequence[int]) -> dict[int, int]:
        """How many references each host cluster gets through *l1* (its L2 tables included)."""
        state = self._state
        cluster_bits = state.cluster_bits
        counts: dict[int, int] = {}
        for l2_offset in l1:
            if not l2_offset:
                continue
            counts[l2_offset >> cluster_bits] = counts.get(l2_offset >> cluster_bits, 0) + 1
            table = await state.tables.get(l2_offset)
            # (Snapshots keep all data in the image file: every descriptor counts.)
            for descriptor in state.entries.descriptors(table):
                for cluster in entry_clusters(descriptor, cluster_bits):
                    counts[cluster] = counts.get(cluster, 0) + 1
        return counts

    async def tree_releases(self, l1: Sequence[int], l1_offset: int, l1_entries: int) -> dict[int, int]:
        """The refcount decrements that dropping the tree under *l1* (and *l1* itself) makes."""
        releases = {cluster: -count for cluster, count in (await self.tree_references(l1)).items()}
        for cluster in table_clusters(l1_offset, l1_entries * 8, self._state.cluster_bits):
            releases[cluster] = releases.get(cluster, 0) - 1
        return releases

    async def update_copied(self) -> None:
        """Set the active tables' COPIED flags exactly where the refcount is 1.

        Tables shared with snapshots are updated too: flags only count in the active tables,
        and ``qemu-img check`` verifies them in every table the active L1 table reaches.
        """
        state = self._state
        refcounts = state.refcounts
        entries = state.entries
        l1_changed = False
        for index, l2_offset in enumerate(state.l1):
            if not l2_offset:
                continue
            ours = await refcounts.get(l2_offset) == 1
            if ours != bool(state.l1_copied[index]):
                state.l1_copied[index] = ours
                l1_changed = True
            table = await state.tables.get(l2_offset)
            changed = False
            for slot, entry in enumerate(entries.descriptors(table)):
                host = entry & L2_OFFSET_MASK
                if not host or entry & OFLAG_COMPRESSED:
                    continue
                wanted = entry | OFLAG_COPIED if await refcounts.get(host) == 1 else entry & ~OFLAG_COPIED
                if wanted != entry:
                    changed = True
                    entries.set(table, slot, wanted)
            if changed:
                state.tables.mark_dirty(l2_offset)
        if l1_changed:
            # The tables (and refcounts) first: the L1 entries then vouch for them.
            await state.tables.flush()
            raw = encode_l1(state.l1, state.l1_copied)
            await state.storage.writev([memoryview(raw)], state.header.l1_table_offset)

    async def scan_metadata(self) -> None:
        """Before the first write: every cluster metadata occupies must be counted as in use.

        Otherwise allocation could hand metadata out as free space. The clusters are kept in
        :attr:`Qcow2State.metadata`, so that damaged L2 entries mapping data onto them are
        refused too.
        """
        state = self._state
        cluster_bits = state.cluster_bits
        header = state.header
        clusters: set[int] = {0}
        clusters.update(table_clusters(header.l1_table_offset, header.l1_size * 8, cluster_bits))
        clusters.update(
            table_clusters(header.refcount_table_offset, header.refcount_table_clusters << cluster_bits, cluster_bits)
        )
        clusters.update(
            (entry & REFTABLE_OFFSET_MASK) >> cluster_bits for entry in await state.refcounts.table() if entry
        )
        clusters.update(offset >> cluster_bits for offset in state.l1 if offset)
        if state.snapshots:
            length = snapshot_table_length(state.snapshots, header.snapshots_offset)
            clusters.update(table_clusters(header.snapshots_offset, length, cluster_bits))
            for snapshot in state.snapshots:
                clusters.update(table_clusters(snapshot.l1_table_offset, snapshot.l1_size * 8, cluster_bits))
                l1, _ = await self.snapshot_l1(snapshot)
                clusters.update(offset >> cluster_bits for offset in l1 if offset)
        for cluster in sorted(clusters):
            if not await state.refcounts.get(cluster << cluster_bits):
                raise CorruptImageError(
                    state.filename,
                    cluster << cluster_bits,
                    "metadata lies in a cluster whose refcount is 0; repair the image "
                    "(qemu-img check -r all) before writing to it",
                )
        state.metadata.update(clusters)  # (the set the refcounts report frees to)
