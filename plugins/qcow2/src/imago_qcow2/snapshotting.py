"""Internal snapshots of qcow2 images: create, apply (revert to) and delete.

Refcounts count every path from an L1 table, as QEMU counts them (and ``qemu-img check``
verifies): a data cluster reached from the active L1 table and from a snapshot's has
refcount 2, even through one shared L2 table. COPIED flags (refcount exactly 1) are kept in
the active tables only: cleared when a snapshot starts sharing a cluster, set again when
deleting or leaving a snapshot makes it ours alone.

Update order (a crash at any point leaves the image readable as before or after, with at
worst leaked clusters):

* create: refcount increments, then the active tables without COPIED flags, then the
  snapshot's copy of the L1 table and the new snapshot table, then the header switches to
  the new table (one write), and the old table is released last;
* apply: increments for the snapshot's tree, a new active L1 table, one header write for
  size, L1 size and L1 offset; the old active tree is released after it;
* delete: the new snapshot table and header first, the snapshot's tree released after.

Between the increments and the COPIED flags reaching the disk, ``qemu-img check`` would
report flag mismatches (as it does for QEMU's own snapshot code); they are harmless and
``qemu-img check -r all`` repairs them.

Snapshots operate on the whole image: like :meth:`~imago.FormatAccess.resize`, they must not
overlap other requests.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

import attrs

from imago import CorruptImageError, ImagoError, InvalidRequestError, ReadOnlyError, UnsupportedFeatureError, runtime

from .header import MAX_NAME_BYTES, MAX_SNAPSHOTS
from .snapshots import MAX_TABLE_BYTES, Snapshot, encode_snapshot_table, snapshot_table_length
from .tables import L2_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, encode_l1, entry_clusters, table_clusters
from .writing import Qcow2Writing

__all__ = ["Qcow2Snapshotting"]


class Qcow2Snapshotting(Qcow2Writing):
    """Internal snapshot management (mixed into :class:`~imago_qcow2.Qcow2`)."""

    # --- look-ups --------------------------------------------------------------------------

    def find_snapshot(self, name_or_id: str) -> Snapshot:
        """The snapshot with this ID, or else the first with this name (as ``qemu-img snapshot -a``)."""
        return self._find_snapshot(name_or_id, id_first=True)

    def _find_snapshot(self, name_or_id: str, *, id_first: bool) -> Snapshot:
        if not isinstance(name_or_id, str):
            raise InvalidRequestError(f"a snapshot ID or name must be a str, got {type(name_or_id).__name__}")
        fields = ("id", "name") if id_first else ("name", "id")
        for field in fields:
            for snapshot in self._snapshots:
                if getattr(snapshot, field) == name_or_id:
                    return snapshot
        raise ImagoError(f"{self._filename}: no snapshot with ID or name {name_or_id!r}")

    # --- the three operations ----------------------------------------------------------------

    async def create_snapshot(
        self,
        name: str,
        *,
        date_ns: int | None = None,
        vm_clock_nsec: int = 0,
    ) -> Snapshot:
        """Record the current disk as a new snapshot named *name* (``qemu-img snapshot -c``).

        The ID is one more than the largest numeric ID in use, as QEMU picks it. Names need
        not be unique. *date_ns* is the creation time in nanoseconds since the epoch (default:
        now). Refused, with nothing changed, when a refcount would overflow (narrow
        ``refcount_bits``).
        """
        self._check_snapshot_support()
        _check_name(name)
        if date_ns is None:
            date_ns = time.time_ns()
        if not isinstance(date_ns, int) or not 0 <= date_ns < (1 << 32) * 1_000_000_000:
            raise InvalidRequestError(f"snapshot date {date_ns!r} is not a time from 1970 to 2106 in nanoseconds")
        if not isinstance(vm_clock_nsec, int) or not 0 <= vm_clock_nsec < 1 << 64:
            raise InvalidRequestError(f"snapshot VM clock {vm_clock_nsec!r} is not an unsigned 64-bit count")
        if len(self._snapshots) >= MAX_SNAPSHOTS:
            raise InvalidRequestError(f"{self._filename}: the image has {MAX_SNAPSHOTS} snapshots, the most allowed")
        numbers = [int(s.id) for s in self._snapshots if s.id.isascii() and s.id.isdigit()]
        snapshot_id = str(max(numbers, default=0) + 1)
        async with self._lock:
            await self._write_back()
            changes = await self._tree_references(self._l1)
            await self._check_changes(changes)
            l1_offset = await self._allocate_table(len(self._l1) * 8)
            await self._change_refcounts(changes)
            await self._update_copied()
            await self._write_back()
            # The snapshot's L1 table: the active one, without COPIED flags (they only hold there).
            if l1_offset:
                await self._storage.writev([memoryview(encode_l1(self._l1))], l1_offset)
            snapshot = Snapshot(
                id=snapshot_id,
                name=name,
                l1_table_offset=l1_offset,
                l1_size=len(self._l1),
                date_sec=date_ns // 1_000_000_000,
                date_nsec=date_ns % 1_000_000_000,
                vm_clock_nsec=vm_clock_nsec,
                vm_state_size=0,
                disk_size=self._size,
                icount=0,  # what qemu-img records outside record/replay
                extra_data=b"",
                table_offset=0,
            )
            await self._write_snapshot_table([*self._snapshots, snapshot])
            await self._write_back()
        self.mappings_changed()
        return self._snapshots[-1]

    async def apply_snapshot(self, name_or_id: str) -> None:
        """Revert the disk to a snapshot (``qemu-img snapshot -a``): its contents and its size.

        The snapshot is looked up by ID first, then by name. The snapshot itself stays.
        """
        self._check_snapshot_support()
        snapshot = self.find_snapshot(name_or_id)
        async with self._lock:
            await self._write_back()
            l1 = await self._snapshot_l1(snapshot)
            changes = await self._tree_references(l1)
            old_l1 = self._l1
            old_offset, old_entries = self._header.l1_table_offset, len(old_l1)
            releases = await self._tree_releases(old_l1, old_offset, old_entries)
            await self._check_changes(changes, releases)
            await self._change_refcounts(changes)
            new_offset = await self._allocate_table(len(l1) * 8)
            await self._refcounts.flush()
            if new_offset:
                await self._storage.writev([memoryview(encode_l1(l1))], new_offset)
            await self._storage.flush()
            header = self._header
            # Size, L1 size and L1 offset change in one write (bytes 24 to 48).
            fields = struct.pack(">QIIQ", snapshot.disk_size, header.crypt_method, len(l1), new_offset)
            await self._storage.writev([memoryview(fields)], 24)
            await self._storage.flush()
            self._header = attrs.evolve(header, size=snapshot.disk_size, l1_size=len(l1), l1_table_offset=new_offset)
            self._size = snapshot.disk_size
            self._l1 = l1
            self._l1_copied = bytearray(len(l1))
            self.mappings_changed()
            # Nothing on disk refers to the old active tree any more.
            await self._change_refcounts(releases)
            await self._update_copied()
            await self._write_back()
        self.mappings_changed()

    async def delete_snapshot(self, name_or_id: str) -> Snapshot:
        """Delete a snapshot (``qemu-img snapshot -d``), releasing what only it used.

        The first snapshot with this name is deleted, as ``qemu-img snapshot -d`` picks it;
        failing that, the one with this ID (which qemu-img does not look at). Returns the
        deleted snapshot.
        """
        self._check_snapshot_support()
        snapshot = self._find_snapshot(name_or_id, id_first=False)
        async with self._lock:
            await self._write_back()
            l1 = await self._snapshot_l1(snapshot)
            releases = await self._tree_releases(l1, snapshot.l1_table_offset, snapshot.l1_size)
            await self._check_changes(releases)
            await self._write_snapshot_table([s for s in self._snapshots if s is not snapshot])
            await self._change_refcounts(releases)
            await self._update_copied()
            await self._write_back()
        self.mappings_changed()
        return snapshot

    def create_snapshot_sync(self, name: str, *, date_ns: int | None = None, vm_clock_nsec: int = 0) -> Snapshot:
        """Synchronous :meth:`create_snapshot`."""
        return runtime.run_sync(self.create_snapshot(name, date_ns=date_ns, vm_clock_nsec=vm_clock_nsec))

    def apply_snapshot_sync(self, name_or_id: str) -> None:
        """Synchronous :meth:`apply_snapshot`."""
        runtime.run_sync(self.apply_snapshot(name_or_id))

    def delete_snapshot_sync(self, name_or_id: str) -> Snapshot:
        """Synchronous :meth:`delete_snapshot`."""
        return runtime.run_sync(self.delete_snapshot(name_or_id))

    # --- helpers -----------------------------------------------------------------------------

    def _check_snapshot_support(self) -> None:
        if not self._writable:
            raise ReadOnlyError(self._filename or "qcow2 image")
        if self._header.has_data_file:
            # Data clusters in an external file have no refcounts to share them by (QEMU refuses too).
            raise UnsupportedFeatureError("internal snapshots of images with an external data file", self._filename)

    async def _tree_references(self, l1: Sequence[int]) -> dict[int, int]:
        """How many references each host cluster gets through *l1* (its L2 tables included)."""
        cluster_bits = self._cluster_bits
        counts: dict[int, int] = {}
        for l2_offset in l1:
            if not l2_offset:
                continue
            counts[l2_offset >> cluster_bits] = counts.get(l2_offset >> cluster_bits, 0) + 1
            table = await self._tables.get(l2_offset)
            entries = table.entries
            # Extended tables: descriptors at even indices. (Snapshots keep all data in the image file.)
            for index in range(0, len(entries), 2 if table.extended else 1):
                for cluster in entry_clusters(entries[index], cluster_bits):
                    counts[cluster] = counts.get(cluster, 0) + 1
        return counts

    async def _tree_releases(self, l1: Sequence[int], l1_offset: int, l1_entries: int) -> dict[int, int]:
        """The refcount decrements that dropping the tree under *l1* (and *l1* itself) makes."""
        releases = {cluster: -count for cluster, count in (await self._tree_references(l1)).items()}
        for cluster in table_clusters(l1_offset, l1_entries * 8, self._cluster_bits):
            releases[cluster] = releases.get(cluster, 0) - 1
        return releases

    async def _check_changes(self, *stages: dict[int, int]) -> None:
        """Refuse, before anything changes, refcount changes that would leave the valid range.

        *stages* are applied one after another: each must keep every refcount in range. Too
        large: the image has more snapshots than its refcount width counts. Negative: the
        refcounts do not cover the references (a damaged image).
        """
        limit = (1 << self._header.refcount_bits) - 1
        cluster_bits = self._cluster_bits
        total: dict[int, int] = {}
        for stage in stages:
            for cluster, delta in stage.items():
                total[cluster] = total.get(cluster, 0) + delta
            for cluster in stage:
                value = await self._refcounts.get(cluster << cluster_bits) + total[cluster]
                if value > limit:
                    raise InvalidRequestError(
                        f"{self._filename}: the cluster at {cluster << cluster_bits:#x} would need refcount {value}, "
                        f"more than {self._header.refcount_bits}-bit refcounts hold (the image has too many "
                        "snapshots for its refcount_bits)"
                    )
                if value < 0:
                    raise CorruptImageError(
                        self._filename,
                        cluster << cluster_bits,
                        "the refcounts do not cover the references to this cluster (repair: qemu-img check -r all)",
                    )

    async def _update_copied(self) -> None:
        """Set the active tables' COPIED flags exactly where the refcount is 1.

        Tables shared with snapshots are updated too: flags only count in the active tables,
        and ``qemu-img check`` verifies them in every table the active L1 table reaches.
        """
        refcounts = self._refcounts
        l1_changed = False
        for index, l2_offset in enumerate(self._l1):
            if not l2_offset:
                continue
            ours = await refcounts.get(l2_offset) == 1
            if ours != bool(self._l1_copied[index]):
                self._l1_copied[index] = ours
                l1_changed = True
            table = await self._tables.get(l2_offset)
            entries = table.entries
            changed = False
            for slot in range(0, len(entries), 2 if table.extended else 1):
                entry = entries[slot]
                host = entry & L2_OFFSET_MASK
                if not host or entry & OFLAG_COMPRESSED:
                    continue
                wanted = entry | OFLAG_COPIED if await refcounts.get(host) == 1 else entry & ~OFLAG_COPIED
                if wanted != entry:
                    changed = True
                    if table.extended:
                        entries[slot] = wanted
                    else:
                        table.set_entry(slot, wanted)
            if changed:
                self._tables.mark_dirty(l2_offset)
        if l1_changed:
            # The tables (and refcounts) first: the L1 entries then vouch for them.
            await self._tables.flush()
            raw = encode_l1(self._l1, self._l1_copied)
            await self._storage.writev([memoryview(raw)], self._header.l1_table_offset)

    async def _write_snapshot_table(self, snapshots: list[Snapshot]) -> None:
        """Write a new snapshot table, switch the header to it, release the old one."""
        header = self._header
        data, placed = encode_snapshot_table(snapshots)
        if len(data) > MAX_TABLE_BYTES:
            raise InvalidRequestError(f"{self._filename}: the snapshot table would exceed 64 MiB")
        offset = await self._allocate_table(len(data))
        placed = [attrs.evolve(snapshot, table_offset=offset + snapshot.table_offset) for snapshot in placed]
        await self._refcounts.flush()
        if data:
            await self._storage.writev([memoryview(data)], offset)
        await self._storage.flush()
        await self._storage.writev([memoryview(struct.pack(">IQ", len(placed), offset))], 60)
        await self._storage.flush()
        old_length = snapshot_table_length(self._snapshots, header.snapshots_offset)
        self._header = attrs.evolve(header, nb_snapshots=len(placed), snapshots_offset=offset)
        self._snapshots = placed
        releases = {cluster: -1 for cluster in table_clusters(header.snapshots_offset, old_length, self._cluster_bits)}
        await self._change_refcounts(releases)


def _check_name(name: object) -> None:
    if not isinstance(name, str):
        raise InvalidRequestError(f"a snapshot name must be a str, got {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"snapshot name {name!r} cannot be encoded as UTF-8") from None
    if not raw:
        raise InvalidRequestError("a snapshot name must not be empty")
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidRequestError(f"a snapshot name is at most {MAX_NAME_BYTES} bytes of UTF-8, got {len(raw)}")
