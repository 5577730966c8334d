"""The reference walk: which host clusters an L1 tree, or the whole image's metadata, uses.

Refcounts count every path from an L1 table, as QEMU counts them (and ``qemu-img check``
verifies): a data cluster reached from the active L1 table and from a snapshot's has
refcount 2, even through one shared L2 table. COPIED flags (refcount exactly 1) are kept in
the active tables only. Snapshot operations use the walk to change refcounts (after checking
that the tree uses no metadata cluster as data, or as an L2 table unless it is one: changing
such refcounts would free metadata); opening for writing uses it to find the clusters metadata
occupies.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from imago import CorruptImageError

from .overlap import Metadata, MetadataMap, describe
from .refcounts import REFTABLE_OFFSET_MASK
from .snapshot_table import Snapshot
from .state import Qcow2State
from .tables import L2_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, entry_clusters, read_l1, table_clusters

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

    async def tree_references(self, l1: Sequence[int], l1_offset: int | None = None) -> dict[int, int]:
        """How many references each host cluster gets through *l1* (its L2 tables included).

        *l1_offset*: where the L1 table lies, for errors. A tree that uses metadata as data,
        or as an L2 table where it is no L2 table, marks the image corrupt.
        """
        state = self._state
        guard = state.guard
        cluster_bits = state.cluster_bits
        counts: dict[int, int] = {}
        data: dict[int, int] = {}
        for index, l2_offset in enumerate(l1):
            if not l2_offset:
                continue
            await guard.check_l2_table(l2_offset, index, l1_offset)
            counts[l2_offset >> cluster_bits] = counts.get(l2_offset >> cluster_bits, 0) + 1
            table = await state.tables.get(l2_offset)
            # (Snapshots keep all data in the image file: every descriptor counts.)
            for descriptor in state.entries.descriptors(table):
                for cluster in entry_clusters(descriptor, cluster_bits):
                    data[cluster] = data.get(cluster, 0) + 1
        # Checked once per cluster, not per entry: changing these refcounts must not free metadata.
        await guard.check_data_clusters(
            data, "the L1 table" if l1_offset is None else f"the L1 table at {l1_offset:#x}"
        )
        for cluster, count in data.items():
            counts[cluster] = counts.get(cluster, 0) + count
        return counts

    async def tree_releases(self, l1: Sequence[int], l1_offset: int, l1_entries: int) -> dict[int, int]:
        """The refcount decrements that dropping the tree under *l1* (and *l1* itself) makes."""
        releases = {cluster: -count for cluster, count in (await self.tree_references(l1, l1_offset)).items()}
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
            await state.write_l1_entries(0, len(state.l1))

    async def scan_metadata(self) -> None:
        """Before the first write: every cluster metadata occupies must be counted as in use.

        Otherwise allocation could hand metadata out as free space. The clusters found are
        the guard's map from now on (:mod:`imago_qcow2.overlap`): no write, free or allocation
        may touch them.
        """
        state = self._state
        cluster_bits = state.cluster_bits
        metadata = await state.guard.start()
        await self._check_refcount_blocks(metadata)
        for cluster in metadata:
            if not await state.refcounts.get(cluster << cluster_bits):
                raise CorruptImageError(
                    state.filename,
                    cluster << cluster_bits,
                    f"the {describe(metadata.kinds(cluster))} lies in a cluster whose refcount is 0; repair the "
                    "image (qemu-img check -r all) before writing to it",
                )

    async def _check_refcount_blocks(self, metadata: MetadataMap) -> None:
        """Each refcount block counts its own clusters: none named twice, none holding other metadata.

        A block named by several refcount table entries (``qemu-img check`` counts it as used
        more often than its refcount says) would make every entry's clusters share its
        refcounts: allocation would scan the same block over and over, and one change would
        change them all. The image is open for a repair only.
        """
        state = self._state
        table = await state.refcounts.table()
        offsets = [entry & REFTABLE_OFFSET_MASK for entry in table if entry]
        table_offset = state.header.refcount_table_offset
        if len(set(offsets)) != len(offsets):  # (decided in C; the walk below only names the pair)
            seen: dict[int, int] = {}
            for index, entry in enumerate(table):
                offset = entry & REFTABLE_OFFSET_MASK
                if not offset:
                    continue
                if offset in seen:
                    raise CorruptImageError(
                        state.filename,
                        table_offset + 8 * index,
                        f"refcount table entries {seen[offset]} and {index} both name the refcount block at "
                        f"{offset:#x}; repair the image (qemu-img check -r all) before writing to it",
                    )
                seen[offset] = index
        cluster_bits = state.cluster_bits
        for offset in offsets:
            others = metadata.bits(offset >> cluster_bits) & ~Metadata.REFCOUNT_BLOCK
            if others:
                raise CorruptImageError(
                    state.filename,
                    offset,
                    f"the refcount block at {offset:#x} overlaps the {describe(others)}; repair the image "
                    "(qemu-img check -r all) before writing to it",
                )
