"""Internal snapshots of qcow2 images: create, apply (revert to), delete, and read-only views.

Refcounts count every path from an L1 table (see :mod:`imago_qcow2.references`). COPIED flags
are cleared when a snapshot starts sharing a cluster, and set again when deleting or leaving a
snapshot makes it ours alone.

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

import time

import attrs

from imago import (
    CorruptImageError,
    FormatDriver,
    InvalidRequestError,
    ReadOnlyError,
    SnapshotNotFoundError,
)

from .layout import MAX_NAME_BYTES, MAX_SNAPSHOTS
from .references import References
from .snapshot_table import MAX_TABLE_BYTES, Snapshot, encode_snapshot_table, snapshot_table_length
from .state import Qcow2State
from .tables import encode_l1, table_clusters

__all__ = ["Snapshots"]


class Snapshots:
    """The internal snapshots of one image."""

    def __init__(self, state: Qcow2State, driver: FormatDriver, references: References) -> None:
        self._state = state
        self._driver = driver
        self._references = references

    # --- look-ups --------------------------------------------------------------------------

    def find(self, name_or_id: str, *, id_first: bool = True) -> Snapshot:
        """The snapshot with this ID, or else the first with this name (*id_first*; else the other way)."""
        if not isinstance(name_or_id, str):
            raise InvalidRequestError(f"a snapshot ID or name must be a str, got {type(name_or_id).__name__}")
        fields = ("id", "name") if id_first else ("name", "id")
        for field in fields:
            for snapshot in self._state.snapshots:
                if getattr(snapshot, field) == name_or_id:
                    return snapshot
        raise SnapshotNotFoundError(self._state.filename, name_or_id)

    async def view_state(self, name_or_id: str) -> Qcow2State:
        """The state of a read-only view of a snapshot: the image's storages and L2 cache, its L1 table."""
        state = self._state
        snapshot = self.find(name_or_id)
        l1, l1_copied = await self._references.snapshot_l1(snapshot)
        return Qcow2State(
            storage=state.storage,
            header=attrs.evolve(state.header, size=snapshot.disk_size),
            l1=l1,
            l1_copied=l1_copied,
            data_storage=state.data_storage,
            backing=state.backing,
            snapshots=state.snapshots,
            tables=state.tables,
            snapshot=snapshot,
        )

    # --- the three operations ----------------------------------------------------------------

    async def create(self, name: str, *, date_ns: int | None = None, vm_clock_nsec: int = 0) -> Snapshot:
        """Record the current disk as a new snapshot named *name* (``qemu-img snapshot -c``).

        The ID is one more than the largest numeric ID in use, as QEMU picks it. Names need
        not be unique. *date_ns* is the creation time in nanoseconds since the epoch (default:
        now). Refused, with nothing changed, when a refcount would overflow (narrow
        ``refcount_bits``).
        """
        state = self._state
        self._check_support()
        _check_name(name)
        if date_ns is None:
            date_ns = time.time_ns()
        if not isinstance(date_ns, int) or not 0 <= date_ns < (1 << 32) * 1_000_000_000:
            raise InvalidRequestError(f"snapshot date {date_ns!r} is not a time from 1970 to 2106 in nanoseconds")
        if not isinstance(vm_clock_nsec, int) or not 0 <= vm_clock_nsec < 1 << 64:
            raise InvalidRequestError(f"snapshot VM clock {vm_clock_nsec!r} is not an unsigned 64-bit count")
        if len(state.snapshots) >= MAX_SNAPSHOTS:
            raise InvalidRequestError(f"{state.filename}: the image has {MAX_SNAPSHOTS} snapshots, the most allowed")
        numbers = [int(s.id) for s in state.snapshots if s.id.isascii() and s.id.isdigit()]
        snapshot_id = str(max(numbers, default=0) + 1)
        async with state.lock:
            await state.write_back()
            changes = await self._references.tree_references(state.l1)
            await self._check_changes(changes)
            l1_offset = await state.refcounts.allocate_table(len(state.l1) * 8)
            await state.refcounts.apply(changes)
            await self._references.update_copied()
            await state.write_back()
            # The snapshot's L1 table: the active one, without COPIED flags (they only hold there).
            if l1_offset:
                await state.storage.writev([memoryview(encode_l1(state.l1))], l1_offset)
            snapshot = Snapshot(
                id=snapshot_id,
                name=name,
                l1_table_offset=l1_offset,
                l1_size=len(state.l1),
                date_sec=date_ns // 1_000_000_000,
                date_nsec=date_ns % 1_000_000_000,
                vm_clock_nsec=vm_clock_nsec,
                vm_state_size=0,
                disk_size=state.size,
                icount=0,  # what qemu-img records outside record/replay
                extra_data=b"",
                table_offset=0,
            )
            await self._write_table([*state.snapshots, snapshot])
            await state.write_back()
        self._driver.mappings_changed()
        return state.snapshots[-1]

    async def apply(self, name_or_id: str) -> None:
        """Revert the disk to a snapshot (``qemu-img snapshot -a``): its contents and its size.

        The snapshot is looked up by ID first, then by name. The snapshot itself stays.
        """
        state = self._state
        self._check_support()
        snapshot = self.find(name_or_id)
        async with state.lock:
            await state.write_back()
            l1, _ = await self._references.snapshot_l1(snapshot)
            changes = await self._references.tree_references(l1)
            old_l1 = state.l1
            old_offset, old_entries = state.header.l1_table_offset, len(old_l1)
            releases = await self._references.tree_releases(old_l1, old_offset, old_entries)
            await self._check_changes(changes, releases)
            await state.refcounts.apply(changes)
            new_offset = await state.refcounts.allocate_table(len(l1) * 8)
            await state.refcounts.flush()
            if new_offset:
                await state.storage.writev([memoryview(encode_l1(l1))], new_offset)
            await state.storage.flush()
            # Size, L1 size and L1 offset change in one write (bytes 24 to 48, crypt_method between).
            await state.update_header(
                size=snapshot.disk_size,
                crypt_method=state.header.crypt_method,
                l1_size=len(l1),
                l1_table_offset=new_offset,
            )
            state.size = snapshot.disk_size
            state.l1 = l1
            state.l1_copied = bytearray(len(l1))
            self._driver.mappings_changed()
            # Nothing on disk refers to the old active tree any more.
            await state.refcounts.apply(releases)
            await self._references.update_copied()
            await state.write_back()
        self._driver.mappings_changed()

    async def delete(self, name_or_id: str) -> Snapshot:
        """Delete a snapshot (``qemu-img snapshot -d``), releasing what only it used.

        The first snapshot with this name is deleted, as ``qemu-img snapshot -d`` picks it;
        failing that, the one with this ID (which qemu-img does not look at). Returns the
        deleted snapshot.
        """
        state = self._state
        self._check_support()
        snapshot = self.find(name_or_id, id_first=False)
        async with state.lock:
            await state.write_back()
            l1, _ = await self._references.snapshot_l1(snapshot)
            releases = await self._references.tree_releases(l1, snapshot.l1_table_offset, snapshot.l1_size)
            await self._check_changes(releases)
            await self._write_table([s for s in state.snapshots if s is not snapshot])
            await state.refcounts.apply(releases)
            await self._references.update_copied()
            await state.write_back()
        self._driver.mappings_changed()
        return snapshot

    # --- helpers -----------------------------------------------------------------------------

    def _check_support(self) -> None:
        state = self._state
        if not state.writable:
            raise ReadOnlyError(state.filename or "qcow2 image")
        # Data clusters in an external file have no refcounts to share them by (QEMU refuses too).
        state.placement.require_image_file("internal snapshots of images with an external data file")

    async def _check_changes(self, *stages: dict[int, int]) -> None:
        """Refuse, before anything changes, refcount changes that would leave the valid range.

        *stages* are applied one after another: each must keep every refcount in range. Too
        large: the image has more snapshots than its refcount width counts. Negative: the
        refcounts do not cover the references (a damaged image).
        """
        state = self._state
        limit = (1 << state.header.refcount_bits) - 1
        cluster_bits = state.cluster_bits
        total: dict[int, int] = {}
        for stage in stages:
            for cluster, delta in stage.items():
                total[cluster] = total.get(cluster, 0) + delta
            for cluster in stage:
                value = await state.refcounts.get(cluster << cluster_bits) + total[cluster]
                if value > limit:
                    raise InvalidRequestError(
                        f"{state.filename}: the cluster at {cluster << cluster_bits:#x} would need refcount {value}, "
                        f"more than {state.header.refcount_bits}-bit refcounts hold (the image has too many "
                        "snapshots for its refcount_bits)"
                    )
                if value < 0:
                    raise CorruptImageError(
                        state.filename,
                        cluster << cluster_bits,
                        "the refcounts do not cover the references to this cluster (repair: qemu-img check -r all)",
                    )

    async def _write_table(self, snapshots: list[Snapshot]) -> None:
        """Write a new snapshot table, switch the header to it, release the old one."""
        state = self._state
        old_offset = state.header.snapshots_offset
        data, placed = encode_snapshot_table(snapshots)
        if len(data) > MAX_TABLE_BYTES:
            raise InvalidRequestError(f"{state.filename}: the snapshot table would exceed 64 MiB")
        offset = await state.refcounts.allocate_table(len(data))
        placed = [attrs.evolve(snapshot, table_offset=offset + snapshot.table_offset) for snapshot in placed]
        await state.refcounts.flush()
        if data:
            await state.storage.writev([memoryview(data)], offset)
        await state.storage.flush()
        await state.update_header(nb_snapshots=len(placed), snapshots_offset=offset)
        old_length = snapshot_table_length(state.snapshots, old_offset)
        state.snapshots = placed
        releases = {cluster: -1 for cluster in table_clusters(old_offset, old_length, state.cluster_bits)}
        await state.refcounts.apply(releases)


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
