"""Internal snapshots of qcow2 images: create, apply (revert to), delete, and read-only views.

Refcounts count every path from an L1 table (see :mod:`imago_qcow2.references`). COPIED flags
are cleared when a snapshot starts sharing a cluster, and set again when deleting or leaving a
snapshot makes it ours alone.

Update order: a crash at any point leaves the image as before or as after, with at worst
leaked clusters, and no COPIED flag that ``qemu-img check`` would call an error. A cluster's
refcount and its COPIED flag cannot change one after the other (in between, the flag is wrong
whichever goes first), so:

* create and delete use a switchover (:mod:`imago_qcow2.switchover`): new refcount blocks and
  table, a new active L1 table over copies of the L2 tables whose flags change, and the new
  snapshot table are written to free clusters, and one header write switches to all of them.
  Creating, the snapshot keeps the current L1 and L2 tables; the active image continues on
  the copies (QEMU shares the L2 tables instead, and copies them on the next write). What
  drops to zero (the deleted snapshot's clusters, the old tables) is released after the
  switch;
* apply needs none: the snapshot's L2 tables lose their COPIED flags while still inactive,
  the refcounts of its tree are increased (leaks until the switch), a new active L1 table
  is written, one header write switches size, L1 size and L1 offset, and the old active
  tree is released after it. Every cluster the new active tree uses is shared with the
  snapshot, so no flag needs setting.

Snapshots operate on the whole image: like :meth:`~imago.FormatAccess.resize`, they must not
overlap other requests.
"""

from __future__ import annotations

import time
from array import array

import attrs

from imago import (
    CorruptImageError,
    FormatDriver,
    InvalidRequestError,
    ReadOnlyError,
    SnapshotNotFoundError,
)

from .layout import MAX_NAME_BYTES, MAX_SNAPSHOTS
from .overlap import Metadata
from .references import References
from .snapshot_table import Snapshot
from .state import Qcow2State
from .switchover import ActiveL1, Switchover
from .tables import L2_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, encode_l1, table_clusters

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
            header=state.header.__replace__(size=snapshot.disk_size),
            l1=l1,
            l1_copied=l1_copied,
            data_storage=state.data_storage,
            backing=state.backing,
            snapshots=state.snapshots,
            tables=state.tables,
            snapshot=snapshot,
            budget=state.budget,
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
            # The snapshot keeps the current L1 table where it is, and the L2 tables; the
            # active image gets a new L1 table, and copies of the L2 tables whose COPIED flags
            # its entries lose (the snapshot now shares them).
            l1 = await self._new_l1(state.l1, changes)
            l1 = attrs.evolve(l1, offset=await state.refcounts.allocate_table(len(state.l1) * 8))
            for index, l2_offset in enumerate(state.l1):
                if l2_offset and l1.entries[index] != l2_offset:
                    changes[l2_offset >> state.cluster_bits] -= 1  # the snapshot's alone, as before
            snapshot = Snapshot(
                id=snapshot_id,
                name=name,
                l1_table_offset=state.header.l1_table_offset if state.l1 else 0,
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
            await Switchover(state).switch(
                changes={cluster: delta for cluster, delta in changes.items() if delta},
                snapshots=[*state.snapshots, snapshot],
                l1=l1,
            )
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
            # Every cluster of the snapshot's tree ends up shared with the snapshot: no COPIED
            # flag may remain in its tables when they become active.
            await self._clear_copied(l1)
            await state.refcounts.apply(changes)
            new_offset = await state.refcounts.allocate_table(len(l1) * 8)
            await state.refcounts.flush()
            if new_offset:
                await state.write_metadata(Metadata.ACTIVE_L1, new_offset, encode_l1(l1))
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
            changes = await self._references.tree_releases(l1, snapshot.l1_table_offset, snapshot.l1_size)
            await self._check_changes(changes)
            # Clusters the active image now holds alone get their COPIED flags: in copies of
            # the L2 tables concerned, under a new active L1 table, switched to with the
            # refcounts.
            new_l1 = await self._new_l1(state.l1, changes)
            if new_l1.copies or new_l1.copied != state.l1_copied:
                new_l1 = attrs.evolve(new_l1, offset=await state.refcounts.allocate_table(len(state.l1) * 8))
                for index, l2_offset in enumerate(state.l1):
                    if l2_offset and new_l1.entries[index] != l2_offset:
                        changes[l2_offset >> state.cluster_bits] = changes.get(l2_offset >> state.cluster_bits, 0) - 1
                for cluster in table_clusters(state.header.l1_table_offset, len(state.l1) * 8, state.cluster_bits):
                    changes[cluster] = changes.get(cluster, 0) - 1
                active: ActiveL1 | None = new_l1
            else:
                active = None
            # What drops to zero is released after the switch (a leak until then).
            keep: dict[int, int] = {}
            releases: dict[int, int] = {}
            for cluster, delta in changes.items():
                if not delta:
                    continue
                if await state.refcounts.get(cluster << state.cluster_bits) + delta:
                    keep[cluster] = delta
                else:
                    releases[cluster] = delta
            await Switchover(state).switch(
                changes=keep,
                snapshots=[s for s in state.snapshots if s is not snapshot],
                l1=active,
                releases=releases,
            )
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

    async def _new_l1(self, l1: array[int], changes: dict[int, int]) -> ActiveL1:
        """A new active L1 table for the refcounts after *changes* (its place still to allocate).

        Its COPIED flags hold for those refcounts; L2 tables whose entries' flags would change
        are copied (to new clusters, with the flags set right) instead of changed in place:
        the copies go to the L2 cache, dirty, to be written before the switch.
        """
        state = self._state
        refcounts = state.refcounts
        entries = state.entries
        cluster_bits = state.cluster_bits

        async def refcount_after(host: int) -> int:
            return await refcounts.get(host) + changes.get(host >> cluster_bits, 0)

        new_entries = array("Q", l1)
        copied = bytearray(len(l1))
        copies = 0
        for index, l2_offset in enumerate(l1):
            if not l2_offset:
                continue
            table = await state.tables.get(l2_offset)
            descriptors = entries.descriptors(table)
            wanted: dict[int, int] = {}
            for slot, entry in enumerate(descriptors):
                host = entry & L2_OFFSET_MASK
                if not host or entry & OFLAG_COMPRESSED:
                    continue
                flag = OFLAG_COPIED if await refcount_after(host) == 1 else 0
                if entry & OFLAG_COPIED != flag:
                    wanted[slot] = entry & ~OFLAG_COPIED | flag
            if not wanted:
                copied[index] = await refcount_after(l2_offset) == 1
                continue
            offset = await refcounts.allocate_table(state.cluster_size)
            copy = state.new_table(table.to_bytes(), offset)
            for slot, entry in wanted.items():
                entries.set(copy, slot, entry)
            state.tables.put(offset, copy, dirty=True)
            copies += 1
            new_entries[index] = offset
            copied[index] = True  # a new table, ours alone
        return ActiveL1(0, new_entries, copied, copies)

    async def _clear_copied(self, l1: array[int]) -> None:
        """Clear the COPIED flags in the L2 tables under *l1* (an inactive L1 table) and write them."""
        state = self._state
        entries = state.entries
        for l2_offset in l1:
            if not l2_offset:
                continue
            table = await state.tables.get(l2_offset)
            changed = False
            for slot, entry in enumerate(entries.descriptors(table)):
                if entry & OFLAG_COPIED:
                    entries.set(table, slot, entry & ~OFLAG_COPIED)
                    changed = True
            if changed:
                state.tables.mark_dirty(l2_offset)
        await state.tables.flush()


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
