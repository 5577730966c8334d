"""The ``qcow2`` format driver: a facade over the image's state and its collaborators.

:class:`Qcow2` holds one :class:`~imago_qcow2.state.Qcow2State` and hands each request to the
collaborator for its concern: :mod:`~imago_qcow2.mapping` (reads),
:mod:`~imago_qcow2.allocation` (writes), :mod:`~imago_qcow2.zeroing`,
:mod:`~imago_qcow2.compressed`, :mod:`~imago_qcow2.resize`, :mod:`~imago_qcow2.snapshots`;
opening is :mod:`~imago_qcow2.opening`, creating :mod:`~imago_qcow2.create`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self

from imago import (
    Capability,
    CheckResult,
    CorruptImageError,
    FormatAccess,
    FormatCreateBuilder,
    FormatDriver,
    FormatDriverBuilder,
    ImplicitOpenGate,
    InvalidOptionError,
    PreallocateMode,
    ReadOnlyError,
    RepairMode,
    ShallowMapping,
    Storage,
    runtime,
)

from .allocation import Allocation
from .amend import AMEND_OPTION_NAMES
from .create import Qcow2CreateBuilder
from .header import Header
from .layout import INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAGIC
from .mapping import Mapper
from .opening import NOT_GIVEN, NotGiven, open_image
from .snapshot_table import Snapshot
from .state import Qcow2State
from .zeroing import Zeroing

# What only some operations need (compressed clusters and their codecs, resizing, snapshots,
# check and repair, amend) is imported when first used: ``imago info`` needs none of it.
if TYPE_CHECKING:
    from .compressed import CompressedClusters
    from .resize import Resizer
    from .snapshots import Snapshots

__all__ = ["Qcow2", "Qcow2Builder"]


class Qcow2Builder(FormatDriverBuilder["Qcow2"]):
    """Opens qcow2 images: ``Qcow2.builder(storage).backing(...).data_file(...).open(gate)``."""

    def __init__(self, driver: type[Qcow2], **kwargs: Any) -> None:
        super().__init__(driver, **kwargs)
        self._backing: FormatAccess | NotGiven | None = NOT_GIVEN
        self._data_file: Storage | NotGiven | None = NOT_GIVEN
        self._allow_corrupt = False
        self._discard_freed = True

    def backing(self, backing: FormatAccess | None) -> Self:
        """The backing layer: ``None`` opens none, a :class:`FormatAccess` is used as given.

        Not calling this opens what the header names, through the gate.
        """
        if backing is not None and not isinstance(backing, FormatAccess):
            raise InvalidOptionError("backing", f"expected a FormatAccess or None, got {type(backing).__name__}")
        self._backing = backing
        return self

    def data_file(self, storage: Storage | None) -> Self:
        """The external data file: ``None`` opens none, a :class:`Storage` is used as given.

        Not calling this opens what the header names, through the gate.
        """
        if storage is not None and not isinstance(storage, Storage):
            raise InvalidOptionError("data_file", f"expected a Storage or None, got {type(storage).__name__}")
        self._data_file = storage
        return self

    def allow_corrupt(self, allow: bool = True) -> Self:
        """Allow opening an image whose corrupt bit is set: read-only, or for writing a repair only.

        Opened for writing, every write but a repair (``check`` with a fix, as ``qemu-img
        check -r`` opens such images) is refused until the repair cleared the bit.
        """
        self._allow_corrupt = bool(allow)
        return self

    def discard_freed(self, discard: bool = True) -> Self:
        """Punch clusters the image no longer uses out of the file (the default), or keep them.

        Keeping them allocated avoids fragmenting the file where clusters are soon reused.
        """
        if not isinstance(discard, bool):
            raise InvalidOptionError("discard_freed", f"must be True or False, got {discard!r}")
        self._discard_freed = discard
        return self

    @property
    def given_backing(self) -> FormatAccess | NotGiven | None:
        """What :meth:`backing` set (``NOT_GIVEN``: open what the header names)."""
        return self._backing

    @property
    def given_data_file(self) -> Storage | NotGiven | None:
        """What :meth:`data_file` set (``NOT_GIVEN``: open what the header names)."""
        return self._data_file

    @property
    def allows_corrupt(self) -> bool:
        """Whether :meth:`allow_corrupt` allowed opening an image marked corrupt (read-only)."""
        return self._allow_corrupt

    @property
    def discards_freed(self) -> bool:
        """Whether freed clusters are punched out of the file (:meth:`discard_freed`)."""
        return self._discard_freed


class Qcow2(FormatDriver):
    """A qcow2 image (versions 2 and 3).

    ``Qcow2.builder_path("vm.qcow2").open_sync(gate)`` follows the backing file and external
    data file the header names, through *gate*; :class:`Qcow2Builder` overrides either.
    """

    name = "qcow2"
    builder_class = Qcow2Builder
    create_builder_class = Qcow2CreateBuilder
    capabilities = frozenset(
        {
            Capability.RESIZE,
            Capability.SNAPSHOTS,
            Capability.COMPRESSED_WRITES,
            Capability.CHECK,
            Capability.CHANGE_BACKING,
            Capability.AMEND,
        }
    )
    #: The options :meth:`amend` accepts (``qemu-img amend -o help``).
    amend_option_names = AMEND_OPTION_NAMES

    def __init__(self, state: Qcow2State) -> None:
        self._state = state
        self._mapper = Mapper(state)
        self._allocation = Allocation(state, self)
        # The hot paths, bound once: no facade call between the engine and the collaborator.
        self.get_mapping = self._mapper.get_mapping  # type: ignore[method-assign]
        self.ensure_data_mapping = self._allocation.ensure_data_mapping  # type: ignore[method-assign]
        self._zeroing = Zeroing(state, self, self._allocation)
        #: Why writes are refused until a repair (damaged metadata found when opening), if they are.
        self._damage: CorruptImageError | None = None
        #: Why snapshots cannot be read (a snapshot table entry naming an unusable L1 table).
        self._snapshot_damage: CorruptImageError | None = None

    @functools.cached_property
    def _compressed(self) -> CompressedClusters:
        from .compressed import CompressedClusters

        return CompressedClusters(self._state, self, self._allocation)

    @functools.cached_property
    def _resizer(self) -> Resizer:
        from .resize import Resizer

        return Resizer(self._state, self, self._allocation, self._zeroing)

    @functools.cached_property
    def _snapshots(self) -> Snapshots:
        from .references import References
        from .snapshots import Snapshots

        return Snapshots(self._state, self, References(self._state))

    def refuse_writes(self, damage: CorruptImageError | None) -> None:
        """Refuse every write but a repair (:meth:`check` with a fix) with *damage*; ``None``: allow them.

        An image opened for writing whose metadata only a repair can make safe to write (as
        ``qemu-img check -r all`` would) stays open for that repair.
        """
        self._damage = damage
        if damage is None:
            self.ensure_data_mapping = self._allocation.ensure_data_mapping  # type: ignore[method-assign]
        else:
            self.ensure_data_mapping = self._refused_data_mapping  # type: ignore[method-assign]

    def refuse_snapshot_views(self, damage: CorruptImageError | None) -> None:
        """Refuse to read internal snapshots with *damage* (a damaged snapshot table); ``None``: allow it."""
        self._snapshot_damage = damage

    def _require_intact(self) -> None:
        if self._damage is not None:
            raise self._damage

    async def _refused_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        self._require_intact()
        return await self._allocation.ensure_data_mapping(offset, length, overwrite)

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    async def create_image(cls, builder: FormatCreateBuilder[Qcow2]) -> None:
        """Write a new, empty image as *builder* says (the storage is emptied first)."""
        assert isinstance(builder, Qcow2CreateBuilder)
        await builder.write_image()

    @classmethod
    async def probe(cls, storage: Storage) -> bool:
        """Whether *storage* starts with the qcow2 magic."""
        magic = bytearray(4)
        await storage.readv([memoryview(magic)], 0)
        return bytes(magic) == MAGIC

    @classmethod
    async def open_image(cls, builder: FormatDriverBuilder[Qcow2], gate: ImplicitOpenGate) -> Qcow2:
        """Open and validate the image; open its data file and backing chain as *builder* says."""
        assert isinstance(builder, Qcow2Builder)
        return await open_image(cls, builder, gate)

    # --- facts ---------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Virtual disk size."""
        return self._state.size

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._state.writable

    @property
    def storage(self) -> Storage:
        """The image file."""
        return self._state.storage

    def storages(self) -> Sequence[Storage]:
        """The image file, and the external data file if there is one."""
        return self._state.storages()

    @property
    def backing(self) -> FormatAccess | None:
        """The backing layer, if opened."""
        return self._state.backing

    @property
    def header(self) -> Header:
        """The parsed header."""
        return self._state.header

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return self._state.cluster_size

    @property
    def implicit_backing_file(self) -> str | None:
        """The backing file name the header records (as recorded)."""
        return self._state.header.backing_file

    @property
    def implicit_backing_format(self) -> str | None:
        """The backing format the header records."""
        return self._state.header.backing_format

    @property
    def requires_external_data_file(self) -> bool:
        """Whether the image keeps its data in an external data file."""
        return self._state.header.has_data_file

    def info(self) -> dict[str, Any]:
        """Facts under ``qemu-img info --output=json``'s names, plus imago's own header details.

        ``format-specific`` holds exactly what qemu-img prints for qcow2 (in QEMU's field order);
        ``header``, ``feature-names`` and ``unknown-extensions`` are imago's additions.
        """
        state = self._state
        header = state.header
        data: dict[str, Any] = {"compat": "1.1" if header.version == 3 else "0.10"}
        if header.version == 3:
            if header.has_data_file:
                data["data-file"] = header.data_file
                data["data-file-raw"] = header.data_file_raw
            data["extended-l2"] = header.extended_l2
            data["lazy-refcounts"] = bool(header.compatible_features & 1)
            data["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
        data["refcount-bits"] = header.refcount_bits
        data["compression-type"] = header.compression
        info: dict[str, Any] = {
            "format": "qcow2",
            "dirty-flag": bool(header.incompatible_features & INCOMPAT_DIRTY),
            "virtual-size": state.size,
            "cluster-size": header.cluster_size,
            "format-specific": {"type": "qcow2", "data": data},
            "header": header.describe(),
            "feature-names": {f"{kind}:{bit}": name for (kind, bit), name in sorted(header.feature_names.items())},
            "unknown-extensions": [{"type": ext.type, "length": len(ext.data)} for ext in header.extensions],
        }
        if header.backing_file is not None:
            info["backing-filename"] = header.backing_file
            info["full-backing-filename"] = state.storage.resolve_relative_path(header.backing_file)
        if header.backing_format is not None:
            info["backing-filename-format"] = header.backing_format
        if state.snapshots:
            info["snapshots"] = [snapshot.describe() for snapshot in state.snapshots]
        return info

    async def refcount(self, host_offset: int) -> int:
        """The refcount of the host cluster at *host_offset* in the image file."""
        return await self._state.refcounts.get(host_offset)

    # --- mappings and writes -------------------------------------------------------------------

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """Where guest *offset* lives, and the length of its run (up to the L2 table's end)."""
        return await self._mapper.get_mapping(offset, max_length)  # (bound per instance in __init__)

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        """A writable mapping for (a prefix of) the range.

        Clusters of our own are written in place; others are allocated, with copy-on-write of
        the parts of the first and last cluster that the caller does not write. A damaged
        image whose L2 entries map guest data onto its metadata is refused.
        """
        return await self._allocation.ensure_data_mapping(offset, length, overwrite)  # (bound in __init__)

    def data_write_failed(self, offset: int, length: int) -> None:
        """A failed data write: the clusters bound for it are unbound again (unless something else used them)."""
        self._allocation.data_write_failed(offset, length)

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Zero flag on whole clusters, keeping allocations (version 3; version 2 writes zeroes)."""
        self._require_intact()
        return await self._zeroing.ensure_zero_mapping(offset, length)

    async def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        """Zero flag on whole clusters, releasing their space."""
        self._require_intact()
        return await self._zeroing.discard_to_zero(offset, length)

    async def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        """Unallocate whole clusters (they read from the backing image, or as zero)."""
        self._require_intact()
        return await self._zeroing.discard_to_any(offset, length)

    async def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        """Unallocate the range so it reads from the backing image again (whole clusters only)."""
        self._require_intact()
        return await self._zeroing.discard_to_backing(offset, length)

    async def readv_special(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Read compressed clusters: read their data, then decompress and copy on all cores."""
        await self._compressed.readv_special(bufs, offset)

    async def write_compressed(self, data: memoryview, offset: int) -> None:
        """Write whole clusters compressed, compressing them on all cores.

        *offset* must be cluster-aligned and the data whole clusters (a shorter last cluster is
        allowed at the end of the disk). A cluster that does not shrink is written as is.
        """
        self._require_intact()
        await self._compressed.write_compressed(data, offset)

    async def resize(self, new_size: int, prealloc: PreallocateMode = PreallocateMode.NONE) -> None:
        """Grow (L1 table first, the size last) or shrink (clusters past the end released).

        Shrinking below the disk size an internal snapshot records is refused. Growing over a
        larger backing file makes the new area read as zero, not as the backing file.
        """
        self._require_intact()
        await self._resizer.resize(new_size, prealloc)

    # --- backing file and amend -------------------------------------------------------------

    async def change_backing_file(self, filename: str | None, format: str | None) -> None:
        """Record another backing file (``None``: none) and its format in the header.

        Only the reference changes (``qemu-img rebase -u``); the header is rewritten in one
        write of its cluster, then flushed. See :mod:`~imago_qcow2.backing_change`.
        """
        self._require_intact()
        from .backing_change import change_backing_file

        await change_backing_file(self._state, filename, format)

    async def amend(self, options: dict[str, Any], *, force: bool = False) -> None:
        """Change creation options of the image (``qemu-img amend -o``); see :mod:`~imago_qcow2.amend`."""
        self._require_intact()
        from .amend import amend_image

        await amend_image(self, self._state, options, force=force)

    # --- snapshots -----------------------------------------------------------------------------

    @property
    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots (a damaged snapshot table raises its :class:`CorruptImageError`)."""
        if self._snapshot_damage is not None:
            raise self._snapshot_damage
        return list(self._state.snapshots)

    def find_snapshot(self, name_or_id: str) -> Snapshot:
        """The snapshot with this ID, or else the first with this name (as ``qemu-img snapshot -a``)."""
        return self._snapshots.find(name_or_id)

    async def read_snapshot(self, name_or_id: str) -> Qcow2:
        """A read-only view of an internal snapshot (wrap it in a FormatAccess to read it).

        The view shares this image's storages: close it before closing the image.
        """
        if self._snapshot_damage is not None:
            raise self._snapshot_damage
        return Qcow2(await self._snapshots.view_state(name_or_id))

    def read_snapshot_sync(self, name_or_id: str) -> Qcow2:
        """Synchronous :meth:`read_snapshot`."""
        return runtime.run_sync(self.read_snapshot(name_or_id))

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
        self._require_intact()
        return await self._snapshots.create(name, date_ns=date_ns, vm_clock_nsec=vm_clock_nsec)

    async def apply_snapshot(self, name_or_id: str) -> None:
        """Revert the disk to a snapshot (``qemu-img snapshot -a``): its contents and its size.

        The snapshot is looked up by ID first, then by name. The snapshot itself stays.
        """
        self._require_intact()
        await self._snapshots.apply(name_or_id)

    async def delete_snapshot(self, name_or_id: str) -> Snapshot:
        """Delete a snapshot (``qemu-img snapshot -d``), releasing what only it used.

        The first snapshot with this name is deleted, as ``qemu-img snapshot -d`` picks it;
        failing that, the one with this ID (which qemu-img does not look at). Returns the
        deleted snapshot.
        """
        self._require_intact()
        return await self._snapshots.delete(name_or_id)

    def create_snapshot_sync(self, name: str, *, date_ns: int | None = None, vm_clock_nsec: int = 0) -> Snapshot:
        """Synchronous :meth:`create_snapshot`."""
        return runtime.run_sync(self.create_snapshot(name, date_ns=date_ns, vm_clock_nsec=vm_clock_nsec))

    def apply_snapshot_sync(self, name_or_id: str) -> None:
        """Synchronous :meth:`apply_snapshot`."""
        runtime.run_sync(self.apply_snapshot(name_or_id))

    def delete_snapshot_sync(self, name_or_id: str) -> Snapshot:
        """Synchronous :meth:`delete_snapshot`."""
        return runtime.run_sync(self.delete_snapshot(name_or_id))

    # --- check and repair ---------------------------------------------------------------------

    async def check(self, fix: RepairMode | None = None) -> CheckResult:
        """Check the image as ``qemu-img check`` does; with *fix*, repair it first (``-r leaks|all``).

        Every structure using clusters is counted in memory and compared with the stored
        refcounts; COPIED flags, alignment and placement are verified. A repair fixes what the
        mode allows (``ALL``: rebuilding the refcount structure when it is itself damaged),
        then the image is checked again and the open image reloaded from the disk. The
        findings carry qemu-img's lines (``Leaked cluster 5 refcount=2 reference=1``, ...).
        """
        state = self._state
        if fix is not None and not state.writable:
            raise ReadOnlyError(f"{state.filename or 'qcow2 image'} (repairing needs an image opened for writing)")
        from .check import check_image, reload_state

        result = await check_image(state, fix)
        if fix is not None:
            # The repair changed the metadata behind the open image's back: read it again.
            async with state.lock:
                try:
                    await reload_state(state)
                except CorruptImageError as damage:
                    state.tables.clear()
                    self.refuse_writes(damage)
                else:
                    self.refuse_writes(None)
                    self.refuse_snapshot_views(None)
            self.mappings_changed()
        return result

    # --- life cycle ---------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write metadata back in crash-safe order, release freed clusters, flush the storages."""
        await self._state.flush()

    async def sync(self) -> None:
        """:meth:`flush`, then make everything durable."""
        await self.flush()
        for storage in self.storages():
            await storage.sync()

    async def close(self) -> None:
        """Release the image file, data file and backing chain (not for snapshot views)."""
        self._state.decompressed.clear()
        if not self._state.owns_storages:
            return
        await super().close()

    def __repr__(self) -> str:
        snapshot = self._state.snapshot
        view = f" snapshot={snapshot.name!r}" if snapshot else ""
        return f"<Qcow2 {self._state.filename!r} size={self._state.size}{view}>"
