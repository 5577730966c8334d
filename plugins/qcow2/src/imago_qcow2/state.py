"""The one state of an opened qcow2 image, and writing it back in crash-safe order.

Every collaborator of :class:`~imago_qcow2.Qcow2` (mapping, allocation, zeroing, compressed
clusters, resizing, snapshots) holds the image's :class:`Qcow2State` and changes it; none keeps
a copy of what it holds.

Update order (what reaches the disk first):

* a new cluster's refcount before any L2 entry that points to it (the L2 cache depends on the
  refcount cache, and each write-back ends with a storage flush);
* a new L2 table before the L1 entry that points to it (the L1 entry is written only after the
  L2 cache was flushed);
* an L2 entry that stops pointing to a cluster before that cluster's refcount is decremented
  (decrements wait in :attr:`Qcow2State.frees` until the next :meth:`Qcow2State.flush` has
  written the L2 tables).

A crash at any point leaves at worst leaked clusters.

Every metadata write is checked first against the other metadata (:mod:`imago_qcow2.overlap`):
an overlap marks the image corrupt and stops all further writes through it.

With lazy refcounts (compatible feature bit 0) the first rule is relaxed: L2 tables may reach
the disk before the refcounts they rely on, and the image is marked dirty on disk before the
first such write. :meth:`Qcow2State.flush` writes the refcounts and marks it clean again. A
dirty image (left by a crash) is refused for writing until repaired (``qemu-img check -r all``).
"""

from __future__ import annotations

import functools
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imago import CorruptImageError, FormatAccess, MemoryBudget, MetadataCache, Storage

from .header import Header
from .l2_entries import ExtendedL2, L2Entries, StandardL2
from .layout import COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY, NO_LIMIT, write_header_fields
from .overlap import L2_TABLES, Metadata, MetadataGuard, MetadataMap
from .placement import DataPlacement, ExternalDataFile, ImageFileData
from .refcounts import Refcounts
from .snapshot_table import Snapshot
from .tables import L2Table, encode_l1, l2_table_bytes

if TYPE_CHECKING:
    import asyncio

__all__ = ["TABLE_FIELDS", "Qcow2State"]

#: Header fields that name tables: when one changes, the overlap guard's metadata map is rebuilt.
TABLE_FIELDS = frozenset(
    {
        "l1_table_offset",
        "l1_size",
        "refcount_table_offset",
        "refcount_table_clusters",
        "snapshots_offset",
        "nb_snapshots",
    }
)


class Qcow2State:
    """An opened image (or a read-only view of one of its snapshots): files, header, tables, caches.

    The L2 entry width (:attr:`entries`) and the data placement (:attr:`placement`) are chosen
    here, once. A snapshot view shares the image's L2 table cache (*tables*).

    The L2 table and refcount block caches count against *budget* (the chain's
    :class:`~imago.MemoryBudget`, shared with every other layer; a new default one if not given).
    """

    def __init__(
        self,
        *,
        storage: Storage,
        header: Header,
        l1: array[int],
        l1_copied: bytearray,
        data_storage: Storage,
        backing: FormatAccess | None,
        snapshots: list[Snapshot],
        writable: bool = False,
        discard_freed: bool = True,
        tables: MetadataCache[int, L2Table] | None = None,
        snapshot: Snapshot | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.storage = storage
        #: Where data clusters live: the image file, or the external data file.
        self.data_storage = data_storage
        self.filename = storage.filename
        #: The chain's memory budget: caches and whole tables.
        self.budget = budget if budget is not None else MemoryBudget()
        self.header = header
        #: The virtual disk size (the header's, kept at hand for the read path).
        self.size = header.size
        #: The active L1 table: L2 table offsets (0: none), and their COPIED flags.
        self.l1 = l1
        self.l1_copied = l1_copied
        self.backing = backing
        self.snapshots = snapshots
        #: The snapshot a read-only view shows (``None``: the image itself).
        self.snapshot = snapshot
        self.writable = writable
        #: Freed clusters are punched out of the file.
        self.discard_freed = discard_freed
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_mask = header.l2_entries - 1
        #: log2 of the guest bytes one L2 table maps.
        self.table_shift = header.cluster_bits + header.l2_entries.bit_length() - 1
        #: Held by every metadata change (allocation, zeroing, resizing, snapshots, flushing).
        #: Host clusters ``(first, count)`` to release once the metadata no longer pointing to
        #: them is on disk.
        self.frees: list[tuple[int, int]] = []
        # Flushes that wrote metadata back (see write_backs).
        self._flushes = 0
        #: The overlap checks: which clusters hold metadata (from opening for writing on), and
        #: whether the image was marked corrupt.
        self.guard = MetadataGuard(self)
        #: The image file's size when opened for writing: L2 tables unchanged since then map
        #: nothing past it.
        self.open_size = storage.size
        #: L2 tables written since the image was opened (by offset).
        self.rewritten_tables: set[int] = set()
        #: Damaged active L1 entries by index (kept so that the image can be checked and repaired):
        #: their L1 slot holds ``index << 1 | 1``, and reading through it raises the error.
        self.l1_damage: dict[int, CorruptImageError] = {}
        #: Where the next compressed cluster goes (0: start a new host cluster).
        self.compress_cursor = 0
        #: Decompressed clusters by descriptor, least recently used first.
        self.decompressed: OrderedDict[int, bytes] = OrderedDict()
        self.refcounts = Refcounts(
            storage,
            header,
            move_table=self._move_refcount_table,
            guard=self.guard if writable else None,
            after_free=self._forget_freed,
            budget=self.budget,
        )
        # Lazy refcounts: refcount blocks may lag behind the L2 tables while the image is
        # marked dirty on disk; flushing writes them and marks the image clean again.
        self.lazy = writable and header.version >= 3 and bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
        self.dirty_on_disk = False
        entries_class = ExtendedL2 if header.extended_l2 else StandardL2
        self.entries: L2Entries = entries_class(
            header=header, data_storage=data_storage, writable=writable, backing=backing, filename=self.filename
        )
        self.placement: DataPlacement = ExternalDataFile(self) if header.has_data_file else ImageFileData(self)
        if tables is None:
            tables = MetadataCache(
                None,
                self._load_l2,
                self._write_l2,
                storage.flush,
                budget=self.budget,
                entry_size=l2_table_bytes(header.cluster_size),
                sizeof=L2Table.nbytes,
                name=f"the L2 table cache of {self.filename or 'the image'}",
            )
            if not self.lazy:
                # Crash safety: refcount increments reach the disk before the L2 entries using them.
                tables.depends_on(self.refcounts.blocks)
        self.tables = tables

    @functools.cached_property
    def lock(self) -> asyncio.Lock:
        """Held by every metadata change; made on first use (asyncio is not imported before)."""
        import asyncio

        return asyncio.Lock()

    @property
    def write_backs(self) -> int:
        """How many metadata write-backs ran: what a write-back wrote is no longer undone in memory.

        Flushes, and L2 tables written back to make room in the cache (the memory budget): an
        evicted table a caller still holds comes back as the same object, written or not.
        """
        return self._flushes + self.tables.evictions_written

    @property
    def metadata(self) -> MetadataMap:
        """The clusters holding metadata, and what (empty unless opened for writing): the guard's map."""
        return self.guard.map

    @property
    def owns_storages(self) -> bool:
        """Whether closing closes the storages and backing chain (not for snapshot views)."""
        return self.snapshot is None

    def storages(self) -> Sequence[Storage]:
        """The image file, and the external data file if there is one."""
        if self.data_storage is self.storage:
            return (self.storage,)
        return (self.storage, self.data_storage)

    async def update_header(self, **values: int) -> None:
        """Write header fields (adjacent ones in one write), wait until they are on disk, keep them."""
        await self.guard.check_write(Metadata.HEADER, 0, self.header.header_length)
        await write_header_fields(self.storage, values)
        fields: dict[str, Any] = dict(values)
        self.header = self.header.__replace__(**fields)
        if not TABLE_FIELDS.isdisjoint(values):
            self.guard.tables_switched()

    async def write_metadata(self, kind: Metadata, offset: int, data: bytes | bytearray) -> None:
        """Write metadata of *kind* (a table, or entries of one) at *offset*, once the guard let it.

        A write overlapping other metadata marks the image corrupt instead (see
        :meth:`~imago_qcow2.overlap.MetadataGuard.check_write`).
        """
        await self.guard.check_write(kind, offset, len(data))
        await self.storage.writev([memoryview(data)], offset)

    async def write_l1_entries(self, first: int, stop: int) -> None:
        """Write active L1 entries ``[first, stop)`` (with their COPIED flags) in place."""
        raw = encode_l1(self.l1[first:stop], self.l1_copied[first:stop])
        await self.write_metadata(Metadata.ACTIVE_L1, self.header.l1_table_offset + 8 * first, raw)

    async def table(self, offset: int) -> L2Table | None:
        """The L2 table covering guest *offset*, if it exists."""
        l1_index = offset >> self.table_shift
        l1 = self.l1
        l2_offset = l1[l1_index] if l1_index < len(l1) else 0
        if not l2_offset:
            return None
        table = self.tables.peek(l2_offset)
        return table if table is not None else await self.tables.get(l2_offset)

    # --- the L2 table cache ---------------------------------------------------------------------

    async def read_table(self, offset: int) -> L2Table:
        """The L2 table at *offset*, read and validated as the cache loads it (and not cached)."""
        return await self._load_l2(offset)

    async def _load_l2(self, offset: int) -> L2Table:
        if offset & 1:
            raise self.l1_damage[offset >> 1]
        raw = bytearray(self.cluster_size)
        await self.storage.readv([memoryview(raw)], offset)
        image_size = self.storage.size
        data_size = self.placement.data_limit()
        if self.writable and offset not in self.rewritten_tables:
            # Unchanged since opening: what it maps past the file's end then is not its own,
            # even where the file has grown since (those clusters were handed out meanwhile).
            # (Read-only, another process may be writing the image: the file's size now.)
            image_size = self.open_size
            if self.data_storage is self.storage:
                data_size = self.open_size
        return self.entries.table(raw, offset, image_size=image_size, data_size=data_size)

    async def _write_l2(self, offset: int, table: L2Table) -> None:
        await self.guard.check_write(L2_TABLES, offset, self.cluster_size, "L2 table")
        if self.lazy and not self.dirty_on_disk and self.refcounts.blocks.dirty:
            # Refcounts this table relies on are still only in memory.
            await self.set_dirty(True)
        self.rewritten_tables.add(offset)
        await self.storage.writev([memoryview(table.to_bytes())], offset)
        if not table.runs_valid:
            table.recompute_runs()

    def new_table(self, raw: bytes | bytearray, offset: int) -> L2Table:
        """An L2 table this driver is about to write at *offset* (nothing to check against the file)."""
        return self.entries.table(raw, offset, image_size=NO_LIMIT, data_size=NO_LIMIT)

    # --- refcount hooks ---------------------------------------------------------------------------

    async def _move_refcount_table(self, offset: int, clusters: int) -> None:
        """Record a moved refcount table in the header (offset and size fields in one write)."""
        await self.update_header(refcount_table_offset=offset, refcount_table_clusters=clusters)

    async def _forget_freed(self, freed: list[int]) -> None:
        """Freed clusters may be reused: nothing cached from them may be used again.

        (None of them holds metadata: the guard refused that before the refcounts changed.)
        """
        # No compressed data is packed into them, and no L2 table or decompressed cluster read
        # from them is kept.
        self.compress_cursor = 0
        self.decompressed.clear()
        cluster_bits = self.cluster_bits
        for cluster in freed:
            self.tables.discard(cluster << cluster_bits)
        if self.discard_freed:
            # One discard per run of adjacent clusters: emptying a large image frees thousands.
            for first, count in _runs(sorted(freed)):
                await self.storage.discard(first << cluster_bits, count << cluster_bits)

    # --- flushing ---------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write metadata back in crash-safe order, release freed clusters, flush the storages.

        Once the image was marked corrupt, no metadata is written any more (as QEMU stops
        using such an image): flushing then flushes the storages only.
        """
        if not self.writable:
            return
        async with self.lock:
            await self.write_back()

    async def write_back(self) -> None:
        """:meth:`flush` with the lock held."""
        if self.guard.corrupt is not None:
            for storage in self.storages():
                await storage.flush()
            return
        self._flushes += 1
        await self.refcounts.flush()
        await self.tables.flush()
        if self.frees:
            frees, self.frees = self.frees, []
            changes: dict[int, int] = {}
            for cluster, count in frees:
                for current in range(cluster, cluster + count):
                    changes[current] = changes.get(current, 0) - 1
            await self.refcounts.apply(changes)
        await self.placement.flush()
        await self.storage.flush()
        if self.dirty_on_disk:
            await self.set_dirty(False)  # the refcounts on disk are exact again

    async def set_dirty(self, dirty: bool) -> None:
        """Set or clear the dirty bit on disk (lazy refcounts), and wait until it is there."""
        features = self.header.incompatible_features & ~INCOMPAT_DIRTY | (INCOMPAT_DIRTY if dirty else 0)
        await self.update_header(incompatible_features=features)
        self.dirty_on_disk = dirty


def _runs(clusters: list[int]) -> list[tuple[int, int]]:
    """Sorted cluster numbers as ``(first, count)`` runs of adjacent ones."""
    runs: list[tuple[int, int]] = []
    for cluster in clusters:
        if runs and runs[-1][0] + runs[-1][1] == cluster:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif not runs or runs[-1][0] + runs[-1][1] < cluster:
            runs.append((cluster, 1))
    return runs
