"""The ``qcow2`` format driver (reading)."""

from __future__ import annotations

import asyncio
import struct
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Self

import attrs

from imago import (
    Capability,
    CorruptImageError,
    FormatAccess,
    FormatCreateBuilder,
    FormatDriverBuilder,
    ImagoError,
    ImplicitOpenGate,
    InvalidOptionError,
    MetadataCache,
    ReadOnlyError,
    ShallowEof,
    ShallowIndirect,
    ShallowMapping,
    ShallowRaw,
    ShallowSpecial,
    ShallowZero,
    Storage,
    StorageOpenOptions,
    check_local_file_name,
    format_driver,
    probe,
    runtime,
)

from .compression import decompress_cluster
from .create import Qcow2CreateBuilder
from .header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    HEADER_PROBE_BYTES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAGIC,
    Header,
    header_cluster_size,
    parse_header,
)
from .refcounts import Refcounts
from .snapshots import Snapshot, read_snapshot_table
from .snapshotting import Qcow2Snapshotting
from .tables import COMPRESSED, DATA, OFLAG_COPIED, UNALLOCATED, ZERO, L2Table, decode_compressed, parse_l1

__all__ = ["Qcow2", "Qcow2Builder"]

_UNSET: Any = object()
_NO_LIMIT = 1 << 63
# Raw L2 table bytes kept in memory at most (the classified form takes about 2.5 times that).
_L2_CACHE_BYTES = 16 << 20
# Decompressed clusters kept, so that small reads of one compressed cluster decompress it once.
_DECOMPRESSED_CLUSTERS = 16


class Qcow2Builder(FormatDriverBuilder["Qcow2"]):
    """Opens qcow2 images: ``Qcow2.builder(storage).backing(...).data_file(...).open(gate)``."""

    def __init__(self, driver: type[Qcow2], **kwargs: Any) -> None:
        super().__init__(driver, **kwargs)
        self._backing: FormatAccess | None = _UNSET
        self._data_file: Storage | None = _UNSET
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
        """Allow a read-only open of an image whose corrupt bit is set."""
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


class Qcow2(Qcow2Snapshotting):
    """A qcow2 image (versions 2 and 3).

    ``Qcow2.builder_path("vm.qcow2").open_sync(gate)`` follows the backing file and external
    data file the header names, through *gate*; :class:`Qcow2Builder` overrides either.
    """

    name = "qcow2"
    builder_class = Qcow2Builder
    capabilities = frozenset({Capability.RESIZE, Capability.SNAPSHOTS, Capability.COMPRESSED_WRITES})
    create_builder_class = Qcow2CreateBuilder

    def __init__(
        self,
        *,
        storage: Storage,
        header: Header,
        l1: array[int],
        l1_copied: bytearray,
        size: int,
        data_storage: Storage,
        backing: FormatAccess | None,
        snapshots: list[Snapshot],
        tables: MetadataCache[int, L2Table] | None = None,
        owns_storages: bool = True,
        snapshot: Snapshot | None = None,
        writable: bool = False,
        discard_freed: bool = True,
    ) -> None:
        self._storage = storage
        self._header = header
        self._l1 = l1
        self._l1_copied = l1_copied
        self._writable = writable
        self._discard_freed = discard_freed
        self._metadata: set[int] = set()
        self._lock = asyncio.Lock()
        # Host clusters to release once the metadata no longer pointing to them is on disk.
        self._frees: list[tuple[int, int]] = []
        self._size = size
        self._data_storage = data_storage
        self._backing = backing
        self._snapshots = snapshots
        self._owns_storages = owns_storages
        self._snapshot = snapshot
        self._filename = storage.filename
        self._cluster_bits = header.cluster_bits
        self._cluster_mask = header.cluster_size - 1
        self._l2_mask = header.l2_entries - 1
        self._l2_bits = header.l2_entries.bit_length() - 1
        self._table_shift = self._cluster_bits + self._l2_bits
        self._decompressed: OrderedDict[int, bytes] = OrderedDict()
        self._refcounts = Refcounts(
            storage, header, move_table=self._move_refcount_table, on_free=self._metadata.discard
        )
        # Lazy refcounts: refcount blocks may lag behind the L2 tables while the image is
        # marked dirty on disk; flushing writes them and marks the image clean again.
        self._lazy = writable and header.version >= 3 and bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
        self._dirty_on_disk = False
        if tables is None:
            tables = MetadataCache(
                max(_L2_CACHE_BYTES // header.cluster_size, 16), self._load_l2, self._write_l2, storage.flush
            )
            if not self._lazy:
                # Crash safety: refcount increments reach the disk before the L2 entries using them.
                tables.depends_on(self._refcounts.blocks)  # type: ignore[arg-type]
        self._tables = tables

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
        storage = await builder.open_storage(gate)
        opened: list[Storage | FormatAccess] = [storage] if builder.path is not None else []
        try:
            return await cls._open(builder, gate, storage, opened)
        except BaseException:
            for resource in reversed(opened):
                await resource.close()
            raise

    @classmethod
    async def _open(
        cls, builder: Qcow2Builder, gate: ImplicitOpenGate, storage: Storage, opened: list[Storage | FormatAccess]
    ) -> Qcow2:
        filename = storage.filename
        file_size = storage.size
        head = bytearray(min(HEADER_PROBE_BYTES, file_size))
        await storage.readv([memoryview(head)], 0)
        cluster_size = header_cluster_size(bytes(head))
        if cluster_size is not None:
            head = bytearray(min(cluster_size, file_size))
            await storage.readv([memoryview(head)], 0)
        header = parse_header(bytes(head), file_size, filename)

        if header.incompatible_features & INCOMPAT_CORRUPT:
            if builder.writable:
                raise CorruptImageError(filename, 72, "the image is marked corrupt; it cannot be opened for writing")
            if not builder._allow_corrupt:
                raise CorruptImageError(
                    filename, 72, "the image is marked corrupt; open it read-only with allow_corrupt(True) to read it"
                )
        if builder.writable:
            cls._check_writable(storage, header)
        found_autoclear = header.autoclear_features
        if builder.writable:
            header = attrs.evolve(header, autoclear_features=found_autoclear & AUTOCLEAR_DATA_FILE_RAW)

        raw_l1 = bytearray(header.l1_size * 8)
        if raw_l1:
            await storage.readv([memoryview(raw_l1)], header.l1_table_offset)
        l1, l1_copied = parse_l1(
            raw_l1,
            table_offset=header.l1_table_offset,
            cluster_bits=header.cluster_bits,
            file_size=file_size,
            filename=filename,
        )
        snapshots = await read_snapshot_table(storage, header, filename)

        data_storage = storage
        if header.has_data_file:
            data_storage = await cls._open_data_file(builder, gate, storage, header)
            if builder._data_file is _UNSET:
                opened.append(data_storage)
        elif builder._data_file is not _UNSET and builder._data_file is not None:
            raise InvalidOptionError("data_file", f"{filename}: the image has no external data file")

        backing = builder._backing
        if backing is _UNSET:
            backing = await cls._open_backing(builder, gate, storage, header)
            if backing is not None:
                opened.append(backing)
        image = cls(
            storage=storage,
            header=header,
            l1=l1,
            l1_copied=l1_copied,
            size=header.size,
            data_storage=data_storage,
            backing=backing,
            snapshots=snapshots,
            writable=builder.writable,
            discard_freed=builder._discard_freed,
        )
        if builder.writable:
            await image._scan_metadata()
            if header.autoclear_features != found_autoclear:
                # Only now that the image is accepted: features this driver does not maintain
                # are declared invalid, as the specification asks of any writer.
                await storage.writev([memoryview(struct.pack(">Q", header.autoclear_features))], 88)
                await storage.flush()
        return image

    @staticmethod
    def _check_writable(storage: Storage, header: Header) -> None:
        """Refuse what this driver cannot write safely."""
        filename = storage.filename
        if not storage.writable:
            raise ReadOnlyError(filename or "qcow2 image file")
        if header.incompatible_features & INCOMPAT_DIRTY:
            raise ImagoError(
                f"{filename}: the image is dirty (its refcounts may be stale); "
                "repair it (qemu-img check -r all) before writing to it"
            )

    @staticmethod
    async def _open_data_file(
        builder: Qcow2Builder, gate: ImplicitOpenGate, storage: Storage, header: Header
    ) -> Storage:
        given = builder._data_file
        if given is None:
            raise ImagoError(
                f"{storage.filename}: the image keeps its data in an external data file, and none was given"
            )
        if given is not _UNSET:
            assert isinstance(given, Storage)
            return given
        if not header.data_file:
            raise CorruptImageError(storage.filename, 72, "the image needs an external data file but does not name one")
        name = storage.resolve_relative_path(check_local_file_name(header.data_file))
        # The image file's storage options (direct, no_flush, driver) apply to its data file too.
        options = attrs.evolve(builder.given_storage_options, filename=name, writable=builder.writable)
        return await gate.open_storage(options)

    @staticmethod
    async def _open_backing(
        builder: Qcow2Builder, gate: ImplicitOpenGate, storage: Storage, header: Header
    ) -> FormatAccess | None:
        if header.backing_file is None:
            return None
        name = storage.resolve_relative_path(check_local_file_name(header.backing_file))
        if header.backing_format is not None:
            # The recorded format is used as it is: never probed.
            driver = format_driver(header.backing_format)
        else:
            probe_storage = await gate.open_storage(StorageOpenOptions(filename=name))
            try:
                driver = await probe(probe_storage)
            finally:
                await probe_storage.close()
        child = driver.builder_path(name).below(builder)
        return FormatAccess(await gate.open_format(child))

    # --- facts ---------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Virtual disk size."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._writable

    @property
    def storage(self) -> Storage:
        """The image file."""
        return self._storage

    def storages(self) -> Sequence[Storage]:
        """The image file, and the external data file if there is one."""
        if self._data_storage is self._storage:
            return (self._storage,)
        return (self._storage, self._data_storage)

    @property
    def backing(self) -> FormatAccess | None:
        """The backing layer, if opened."""
        return self._backing

    @property
    def header(self) -> Header:
        """The parsed header."""
        return self._header

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return self._header.cluster_size

    @property
    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots."""
        return list(self._snapshots)

    @property
    def implicit_backing_file(self) -> str | None:
        """The backing file name the header records (as recorded)."""
        return self._header.backing_file

    @property
    def implicit_backing_format(self) -> str | None:
        """The backing format the header records."""
        return self._header.backing_format

    @property
    def requires_external_data_file(self) -> bool:
        """Whether the image keeps its data in an external data file."""
        return self._header.has_data_file

    def info(self) -> dict[str, Any]:
        """Header facts, in the shape of ``qemu-img info --output=json``'s format-specific data."""
        header = self._header
        data: dict[str, Any] = {
            "compat": "1.1" if header.version == 3 else "0.10",
            "cluster-size": header.cluster_size,
            "refcount-bits": header.refcount_bits,
            "compression-type": header.compression,
            "corrupt": bool(header.incompatible_features & INCOMPAT_CORRUPT),
            "dirty": bool(header.incompatible_features & 1),
            "extended-l2": header.extended_l2,
        }
        if header.version == 3:
            data["lazy-refcounts"] = bool(header.compatible_features & 1)
        if header.has_data_file:
            data["data-file"] = header.data_file
            data["data-file-raw"] = header.data_file_raw
        info: dict[str, Any] = {
            "format": "qcow2",
            "virtual-size": self._size,
            "cluster-size": header.cluster_size,
            "format-specific": {"type": "qcow2", "data": data},
            "header": header.describe(),
            "feature-names": {f"{kind}:{bit}": name for (kind, bit), name in sorted(header.feature_names.items())},
            "unknown-extensions": [{"type": ext.type, "length": len(ext.data)} for ext in header.extensions],
        }
        if header.backing_file is not None:
            info["backing-filename"] = header.backing_file
            info["full-backing-filename"] = self._storage.resolve_relative_path(header.backing_file)
        if header.backing_format is not None:
            info["backing-filename-format"] = header.backing_format
        if self._snapshots:
            info["snapshots"] = [snapshot.describe() for snapshot in self._snapshots]
        return info

    async def refcount(self, host_offset: int) -> int:
        """The refcount of the host cluster at *host_offset* in the image file."""
        return await self._refcounts.get(host_offset)

    # --- snapshots -----------------------------------------------------------------------------

    async def read_snapshot(self, name_or_id: str) -> Qcow2:
        """A read-only view of an internal snapshot (wrap it in a FormatAccess to read it).

        The view shares this image's storages: close it before closing the image.
        """
        snapshot = self.find_snapshot(name_or_id)
        raw = bytearray(snapshot.l1_size * 8)
        if raw:
            await self._storage.readv([memoryview(raw)], snapshot.l1_table_offset)
        l1, l1_copied = parse_l1(
            raw,
            table_offset=snapshot.l1_table_offset,
            cluster_bits=self._cluster_bits,
            file_size=self._storage.size,
            filename=self._filename,
        )
        return Qcow2(
            storage=self._storage,
            header=attrs.evolve(self._header, size=snapshot.disk_size),
            l1=l1,
            l1_copied=l1_copied,
            size=snapshot.disk_size,
            data_storage=self._data_storage,
            backing=self._backing,
            snapshots=self._snapshots,
            tables=self._tables,
            owns_storages=False,
            snapshot=snapshot,
        )

    def read_snapshot_sync(self, name_or_id: str) -> Qcow2:
        """Synchronous :meth:`read_snapshot`."""
        return runtime.run_sync(self.read_snapshot(name_or_id))

    # --- mappings ------------------------------------------------------------------------------

    async def _load_l2(self, offset: int) -> L2Table:
        raw = bytearray(1 << self._cluster_bits)
        await self._storage.readv([memoryview(raw)], offset)
        header = self._header
        return L2Table(
            raw,
            offset=offset,
            cluster_bits=self._cluster_bits,
            extended=header.extended_l2,
            zero_flag=header.version >= 3,
            external_data=header.has_data_file,
            image_size=self._storage.size,
            # A sparse external data file may end before clusters mapped into it; it reads zero there.
            data_size=_NO_LIMIT if header.has_data_file else self._storage.size,
            filename=self._filename,
        )

    async def _write_l2(self, offset: int, table: L2Table) -> None:
        if self._lazy and not self._dirty_on_disk and self._refcounts.blocks.dirty:
            # Refcounts this table relies on are still only in memory.
            await self._set_dirty(True)
        await self._storage.writev([memoryview(table.to_bytes())], offset)
        if not table.runs_valid:
            table.recompute_runs()

    async def _move_refcount_table(self, offset: int, clusters: int) -> None:
        """Record a moved refcount table in the header (offset and size fields together)."""
        await self._storage.writev([memoryview(struct.pack(">QI", offset, clusters))], 48)
        await self._storage.flush()
        self._header = attrs.evolve(self._header, refcount_table_offset=offset, refcount_table_clusters=clusters)

    def _unallocated(self, offset: int) -> ShallowMapping:
        backing = self._backing
        return ShallowIndirect(backing, offset) if backing is not None else ShallowZero(False)

    async def _table(self, offset: int) -> L2Table | None:
        l1_index = offset >> self._table_shift
        l2_offset = self._l1[l1_index] if l1_index < len(self._l1) else 0
        if not l2_offset:
            return None
        table = self._tables.peek(l2_offset)
        return table if table is not None else await self._tables.get(l2_offset)

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """Where guest *offset* lives, and the length of its run (up to the L2 table's end)."""
        size = self._size
        if offset >= size:
            return ShallowEof(), max_length
        table_end = ((offset >> self._table_shift) + 1) << self._table_shift
        end = table_end if table_end < size else size
        table = await self._table(offset)
        if table is None:
            return self._unallocated(offset), end - offset
        index = (offset >> self._cluster_bits) & self._l2_mask
        if table.extended:
            return self._extended_mapping(table, offset, index, min(end, offset + max_length))
        within = offset & self._cluster_mask
        wanted = ((min(end, offset + max_length) - offset + within - 1) >> self._cluster_bits) + 1
        length = (table.run_length(index, wanted) << self._cluster_bits) - within
        if offset + length > end:
            length = end - offset
        kind = table.kinds[index]
        if kind == DATA:
            in_place = self._writable and bool(table.entries[index] & OFLAG_COPIED)
            return ShallowRaw(self._data_storage, table.hosts[index] + within, in_place), length
        if kind == UNALLOCATED:
            return self._unallocated(offset), length
        if kind == ZERO:
            return ShallowZero(True), length
        return ShallowSpecial(offset), length

    def _extended_mapping(self, table: L2Table, offset: int, index: int, limit: int) -> tuple[ShallowMapping, int]:
        cluster_bits = self._cluster_bits
        sub_bits = cluster_bits - 5
        sub_size = 1 << sub_bits
        entries = table.entries
        kind, host = table.subcluster(index, (offset >> sub_bits) & 31, cluster_bits)
        host_start = host + (offset & (sub_size - 1))
        copied = entries[2 * index] & OFLAG_COPIED
        step_bits = cluster_bits if kind == COMPRESSED else sub_bits
        position = ((offset >> step_bits) + 1) << step_bits
        while position < limit:
            next_index = (position >> cluster_bits) & self._l2_mask
            next_kind, next_host = table.subcluster(next_index, (position >> sub_bits) & 31, cluster_bits)
            if next_kind != kind or (
                kind == DATA
                and (next_host != host_start + position - offset or entries[2 * next_index] & OFLAG_COPIED != copied)
            ):
                break
            position += 1 << step_bits
        length = min(position, limit) - offset
        if kind == DATA:
            # Like standard entries: writable in place where the cluster is ours alone.
            return ShallowRaw(self._data_storage, host_start, self._writable and bool(copied)), length
        if kind == UNALLOCATED:
            return self._unallocated(offset), length
        if kind == ZERO:
            return ShallowZero(True), length
        return ShallowSpecial(offset), length

    # --- compressed clusters ---------------------------------------------------------------

    async def _descriptor(self, guest_cluster_offset: int) -> int:
        table = await self._table(guest_cluster_offset)
        index = (guest_cluster_offset >> self._cluster_bits) & self._l2_mask
        entry = 0
        if table is not None:
            entry = table.entries[2 * index] if table.extended else table.hosts[index]
            if not table.extended and table.kinds[index] != COMPRESSED:
                entry = 0
        if not entry or not entry >> 62 & 1:
            raise ImagoError(f"{self._filename}: no compressed cluster at guest offset {guest_cluster_offset:#x}")
        return entry

    async def readv_special(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Read compressed clusters: read their data, then decompress and copy on all cores."""
        cluster_bits = self._cluster_bits
        cluster_size = 1 << cluster_bits
        # Where each cluster's part of the request goes: [(destination view, offset in cluster)].
        pieces: dict[int, list[tuple[memoryview, int]]] = {}
        position = offset
        for view in bufs:
            done = 0
            while done < view.nbytes:
                within = position & (cluster_size - 1)
                step = min(view.nbytes - done, cluster_size - within)
                pieces.setdefault(position - within, []).append((view[done : done + step], within))
                done += step
                position += step
        work: list[tuple[int, list[tuple[memoryview, int]]]] = []
        for guest, targets in pieces.items():
            entry = await self._descriptor(guest)
            cached = self._decompressed.get(entry)
            if cached is None:
                work.append((entry, targets))
                continue
            for target, within in targets:
                target[:] = cached[within : within + target.nbytes]
        if not work:
            return
        compressed = await self._read_compressed([decode_compressed(entry, cluster_bits) for entry, _ in work])
        compression = self._header.compression_type
        where = self._filename or ""

        def inflate(item: tuple[tuple[memoryview, int], list[tuple[memoryview, int]]]) -> bytes | None:
            (data, host), targets = item
            cluster = decompress_cluster(data, cluster_size, compression, where, host)
            for target, within in targets:
                target[:] = cluster[within : within + target.nbytes]
            # Partly read clusters are kept: the next small read likely wants the rest.
            partial = len(targets) > 1 or targets[0][0].nbytes < cluster_size
            return cluster if partial else None

        results = await runtime.run_parallel(inflate, list(zip(compressed, (t for _, t in work), strict=True)))
        for (entry, _), cluster in zip(work, results, strict=True):
            if cluster is not None:
                self._decompressed[entry] = cluster
                self._decompressed.move_to_end(entry)
        while len(self._decompressed) > _DECOMPRESSED_CLUSTERS:
            self._decompressed.popitem(last=False)

    async def _read_compressed(self, descriptors: list[tuple[int, int]]) -> list[tuple[memoryview, int]]:
        """The compressed bytes of each descriptor (views, no copies), adjacent ones read at once."""
        file_size = self._storage.size
        spans: list[list[int]] = []  # [start, end, first descriptor index, last descriptor index]
        for index, (host, length) in enumerate(descriptors):
            end = min(host + length, file_size)
            if spans and spans[-1][0] <= host <= spans[-1][1] and end - spans[-1][0] <= 8 << 20:
                spans[-1][1] = max(spans[-1][1], end)
                spans[-1][3] = index
            else:
                spans.append([host, end, index, index])
        out: list[tuple[memoryview, int]] = []
        for start, end, low, high in spans:
            data = memoryview(bytearray(end - start))
            await self._storage.readv([data], start)
            for host, length in descriptors[low : high + 1]:
                out.append((data[host - start : min(host + length, file_size) - start], host))
        return out

    # --- life cycle ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Release the image file, data file and backing chain (not for snapshot views)."""
        self._decompressed.clear()
        if not self._owns_storages:
            return
        await super().close()

    def __repr__(self) -> str:
        view = f" snapshot={self._snapshot.name!r}" if self._snapshot else ""
        return f"<Qcow2 {self._filename!r} size={self._size}{view}>"
