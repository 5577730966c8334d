"""The ``vmdk`` format driver: the facade over the extents, the descriptor's facts and the parent."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from imago import (
    Capability,
    DriverContractError,
    FormatAccess,
    FormatCreateBuilder,
    FormatDriver,
    FormatDriverBuilder,
    ImplicitOpenGate,
    InvalidOptionError,
    InvalidRequestError,
    ShallowMapping,
    ShallowRaw,
    Storage,
    UnsupportedFeatureError,
)

from .compressed import CompressedReader, split_by_grain
from .create import VmdkCreateBuilder
from .descriptor import looks_like_descriptor
from .descriptor_text import new_cid, with_new_cid
from .extents import Extent, FlatExtent, RunKind, SparseExtent
from .header import COWD_MAGIC, KDMV_MAGIC
from .opening import OpenedImage, open_image
from .writing import UNALLOCATED, ZEROED, SparseWriter

__all__ = ["Vmdk"]

# What probing reads of a file (QEMU's probe looks at the first 2 KiB too).
_PROBE_BYTES = 2048


class Vmdk(FormatDriver):
    """A VMDK image, opened read-only: ``Vmdk.builder_path("disk.vmdk").open_sync(gate)``.

    Descriptor files (``monolithicFlat``, ``twoGbMaxExtentSparse``/``Flat``, ``vmfs``,
    ``vmfsSparse``) and hosted sparse files (``monolithicSparse``, ``streamOptimized``); extents
    SPARSE, FLAT, VMFS, VMFSSPARSE and ZERO; delta links to a parent image (its CID checked).
    Extent files and the parent are opened through the gate. Images whose extents are all
    hosted sparse (uncompressed) or flat open for writing too; new images are made with
    :meth:`create_builder` (:class:`~imago_vmdk.create.VmdkCreateBuilder`).
    """

    name = "vmdk"
    create_builder_class = VmdkCreateBuilder
    capabilities = frozenset({Capability.COMPRESSED_WRITES})

    def __init__(self, storage: Storage, image: OpenedImage) -> None:
        self._storage = storage
        self._image = image
        self._extents = image.extents
        starts = []
        position = 0
        for extent in image.extents:
            starts.append(position)
            position += extent.size
        self._starts = starts
        self._size = position
        self._compressed = CompressedReader()
        self._writable = image.writable
        self._writers: dict[int, SparseWriter] = {}
        if self._writable:
            for start, extent in zip(starts, image.extents, strict=True):
                if isinstance(extent, SparseExtent):
                    missing = image.parent_hint is not None and image.backing is None
                    self._writers[id(extent)] = SparseWriter(extent, self, start, parent_missing=missing)
        self._cid = image.cid
        self._cid_written = False
        self._appender = image.appender

    @classmethod
    async def open_image(cls, builder: FormatDriverBuilder[Vmdk], gate: ImplicitOpenGate) -> Vmdk:
        """Open the image; extent files and the parent go through *gate*."""
        return await open_image(cls, builder, gate)

    @classmethod
    async def create_image(cls, builder: FormatCreateBuilder[Vmdk]) -> None:
        """Write a new image as *builder* (a :class:`~imago_vmdk.create.VmdkCreateBuilder`) says."""
        if not isinstance(builder, VmdkCreateBuilder):
            raise InvalidOptionError("builder", f"expected a VmdkCreateBuilder, got {type(builder).__name__}")
        await builder.write_image()

    @classmethod
    async def probe(cls, storage: Storage) -> bool:
        """A sparse header magic (``KDMV``, ``COWD``) or a text descriptor (QEMU's rule)."""
        head = bytearray(min(_PROBE_BYTES, storage.size))
        if len(head) < 4:
            return False
        await storage.readv([memoryview(head)], 0)
        return bytes(head[:4]) in (KDMV_MAGIC, COWD_MAGIC) or looks_like_descriptor(bytes(head))

    # --- facts ------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The disk's size: the extents' sizes added up."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._writable

    @property
    def storage(self) -> Storage:
        """The file opened: the descriptor, or the sparse file embedding it."""
        return self._storage

    def storages(self) -> Sequence[Storage]:
        """The image's file and its extents' files."""
        return self._image.storages

    @property
    def backing(self) -> FormatAccess | None:
        """The parent image of a delta link, if it was opened."""
        return self._image.backing

    def allocated_size(self) -> int | None:
        """The allocated bytes of the descriptor's file and of every extent file, each counted once (as QEMU).

        ``None`` when the descriptor's file cannot tell; an extent file that cannot counts nothing.
        """
        own = self.storage.allocated_size()
        if own is None:
            return None
        return own + sum(storage.allocated_size() or 0 for storage in self._image.storages[1:])

    def holes_read_as_data(self, storage: Storage) -> bool:
        """Whether *storage* holds a flat extent: its holes are zero data, as ``qemu-img map`` shows them."""
        return any(type(extent) is FlatExtent and extent.storage is storage for extent in self._extents)

    @property
    def cid(self) -> int:
        """The content ID (``CID``) the descriptor records (a new one once the image changed)."""
        return self._cid

    @property
    def parent_cid(self) -> int:
        """The parent's content ID the descriptor records (``0xffffffff``: no parent)."""
        return self._image.parent_cid

    @property
    def create_type(self) -> str:
        """The descriptor's ``createType`` (QEMU's name for hosted sparse files)."""
        return self._image.create_type

    @property
    def extents(self) -> Sequence[Extent]:
        """The extents, in disk order."""
        return self._extents

    def info(self) -> dict[str, Any]:
        """Facts under ``qemu-img info --output=json``'s names, ``format-specific`` as QEMU reports it."""
        extents = []
        for extent in self._extents:
            if extent.storage is None:
                continue  # (ZERO and NOACCESS extents have no file; QEMU does not list them)
            entry: dict[str, Any] = {
                "filename": extent.storage.filename or "",
                "format": extent.type_name,
                "virtual-size": extent.size,
            }
            if extent.grain_size is not None:
                entry["cluster-size"] = extent.grain_size
            if extent.compressed:
                entry["compressed"] = True
            extents.append(entry)
        data = {
            "create-type": self._image.create_type,
            "cid": self._cid,
            "parent-cid": self._image.parent_cid,
            "extents": extents,
        }
        info: dict[str, Any] = {
            "format": "vmdk",
            "virtual-size": self._size,
            "format-specific": {"type": "vmdk", "data": data},
        }
        first = self._extents[0]
        if first.grain_size is not None and all(
            e.grain_size == first.grain_size and e.compressed == first.compressed for e in self._extents
        ):
            info["cluster-size"] = first.grain_size
        if self._image.parent_hint is not None:
            info["backing-filename"] = self._image.parent_hint
            info["backing-filename-format"] = "vmdk"
        return info

    # --- mappings ---------------------------------------------------------------------------------

    def _extent_at(self, offset: int) -> tuple[int, Extent]:
        index = bisect.bisect_right(self._starts, offset) - 1
        return self._starts[index], self._extents[index]

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """What the extent holding *offset* says lies there: data, a compressed grain, zeroes, the parent."""
        if self._appender is not None:
            raise UnsupportedFeatureError(
                "reading a stream-optimized VMDK while it is written (close it and open it again)",
                self._storage.filename,
            )
        if offset >= self._size:
            return ShallowMapping.Eof(), max_length
        start, extent = self._extent_at(offset)
        run = await extent.lookup(offset - start, max_length)
        kind = run.kind
        if kind is RunKind.DATA:
            assert extent.storage is not None
            return ShallowMapping.Raw(extent.storage, run.host_offset, self._writable), run.length
        if kind is RunKind.COMPRESSED:
            return ShallowMapping.Special(offset), run.length
        if kind is RunKind.ZERO:
            return ShallowMapping.Zero(True), run.length
        backing = self._image.backing
        if backing is not None:
            return ShallowMapping.Indirect(backing, offset), run.length
        return ShallowMapping.Zero(False), run.length

    async def readv_special(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Read compressed grains: their data read, inflated on all cores."""
        position = offset
        pending = list(bufs)
        while pending:
            start, extent = self._extent_at(position)
            if not isinstance(extent, SparseExtent) or not extent.compressed:
                raise DriverContractError("vmdk", "no compressed grains at this offset", position)
            room = start + extent.size - position
            taken: list[memoryview] = []
            while pending and room > 0:
                view = pending[0]
                if view.nbytes <= room:
                    taken.append(view)
                    room -= view.nbytes
                    pending.pop(0)
                else:
                    taken.append(view[:room])
                    pending[0] = view[room:]
                    room = 0
            await self._compressed.read(extent, split_by_grain(taken, position - start, extent.layout.grain_size))
            position += sum(view.nbytes for view in taken)

    # --- writing ----------------------------------------------------------------------------------

    @property
    def writes_compressed(self) -> bool:
        """True for a stream-optimized image opened for writing: it takes whole grains, in order."""
        return self._appender is not None

    @property
    def cluster_size(self) -> int:
        """The unit of :meth:`write_compressed`: the grain (64 KiB for flat images, as QEMU reports)."""
        if self._appender is not None:
            return self._appender.cluster_size
        grains = [e.grain_size for e in self._extents if e.grain_size is not None]
        return grains[0] if grains else 65536

    async def write_compressed(self, data: memoryview, offset: int) -> None:
        """Whole grains: appended compressed to a stream-optimized image; elsewhere written as they are.

        QEMU does the same: only stream-optimized extents store grains compressed.
        """
        if self._appender is not None:
            await self._appender.write_compressed(data, offset)  # (first: its place is taken when it starts)
            return
        cluster = self.cluster_size
        end = offset + len(data)
        if offset % cluster or end > self._size or (len(data) % cluster and end != self._size):
            raise InvalidRequestError(
                f"{self._storage.filename}: compressed writes must be whole grains of {cluster} bytes "
                f"({len(data)} bytes at {offset})"
            )
        position = offset
        while position < end:
            mapping, mapped = await self.ensure_data_mapping(position, end - position, True)
            assert isinstance(mapping, ShallowRaw)
            mapped = min(mapped, end - position)
            try:
                await mapping.storage.writev([data[position - offset : position - offset + mapped]], mapping.offset)
            except BaseException:
                self.data_write_failed(position, mapped)
                raise
            position += mapped

    def _no_stream(self, what: str) -> None:
        if self._appender is not None:
            raise UnsupportedFeatureError(
                f"{what} in a stream-optimized VMDK (it takes compressed grains, in order)", self._storage.filename
            )

    async def _changing(self) -> None:
        """Before the first change: record a new CID (deltas over this image see it changed)."""
        if self._cid_written:
            return
        self._cid_written = True
        cid = new_cid()
        storage = self._storage
        descriptor_at, room = self._image.descriptor_area
        data = bytearray(min(room, storage.size - descriptor_at))
        if data:
            await storage.readv([memoryview(data)], descriptor_at)
        text = with_new_cid(bytes(data), cid)
        if text is None or (descriptor_at and len(text) >= len(data)):
            return  # (no CID line, or no room for the longer line in the embedded area: left as it is)
        if descriptor_at:  # (embedded: the area keeps its size, the text ends at a NUL)
            await storage.writev([memoryview(text.ljust(len(data), b"\0"))], descriptor_at)
        else:
            await storage.writev([memoryview(text)], 0)
            if len(text) < storage.size:
                await storage.resize(len(text))
        await storage.flush()
        self._cid = cid

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        """Flat extents: in place; sparse: the grains held, or new ones at the end of the extent file."""
        self._no_stream("writing uncompressed data")
        await self._changing()
        start, extent = self._extent_at(offset)
        length = min(length, start + extent.size - offset)
        if isinstance(extent, FlatExtent):
            assert extent.storage is not None
            return ShallowRaw(extent.storage, extent.start + offset - start, True), length
        writer = self._writers.get(id(extent))
        if writer is None:
            raise DriverContractError("vmdk", "a write into an extent that is not writable", offset)
        host, mapped = await writer.ensure_data(offset - start, length)
        assert extent.storage is not None
        return ShallowRaw(extent.storage, host, True), mapped

    def data_write_failed(self, offset: int, length: int) -> None:
        """Take back the grains given to a write that failed (where nothing else used them)."""
        start, extent = self._extent_at(offset)
        writer = self._writers.get(id(extent))
        if writer is not None:
            writer.write_failed(offset - start, length)

    async def _set_grains(self, offset: int, length: int, how: str) -> tuple[int, int]:
        """Set whole grains' entries from the first whole grain of the range on, across sparse extents.

        *how*: ``zero`` (must read as zero, may stay allocated), ``zero-free`` (must read as
        zero), ``any`` (anything), ``backing`` (the parent's data). Returns the part handled.
        """
        if self._appender is not None:
            if how == "any":
                return offset, 0
            self._appender.zero(offset, length)  # (ranges no grain reached yet read as zeroes)
            return offset, length
        await self._changing()
        handled_start: int | None = None
        position = offset
        end = offset + length
        no_parent = self._image.backing is None and self._image.parent_hint is None
        while position < end:
            start, extent = self._extent_at(position)
            writer = self._writers.get(id(extent))
            if writer is None:
                break
            first, last = writer.whole_grains(position - start, min(end, start + extent.size) - position)
            if last <= first:
                break
            if handled_start is None:
                handled_start = position = start + first
            elif start + first != position:
                break
            if how in ("backing", "any"):
                entry, keep = UNALLOCATED, False
            elif writer.zero_grains:
                entry, keep = ZEROED, False
            elif no_parent:
                # Unallocated grains read as zero already; allocated ones keep their space (zero) or lose it.
                entry, keep = UNALLOCATED, how == "zero"
            else:
                break
            done = await writer.set_entries(first, last - first, entry, only_allocated_stay=keep)
            position = start + first + done
            if done < last - first or last < extent.size:
                break
        if handled_start is None:
            return offset, 0
        return handled_start, position - handled_start

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Zeroed grains where the extent has them; unallocated grains stay so when there is no parent."""
        return await self._set_grains(offset, length, "zero")

    async def discard_to_zero(self, offset: int, length: int) -> tuple[int, int]:
        """Zeroed grains, or (no parent) unallocated ones."""
        return await self._set_grains(offset, length, "zero-free")

    async def discard_to_any(self, offset: int, length: int) -> tuple[int, int]:
        """Whole grains of sparse extents become unallocated (their space is not reused)."""
        return await self._set_grains(offset, length, "any")

    async def discard_to_backing(self, offset: int, length: int) -> tuple[int, int]:
        """Whole grains of sparse extents become unallocated: they read from the parent again."""
        return await self._set_grains(offset, length, "backing")

    async def flush(self) -> None:
        """Grains first, then the changed grain tables (both copies), then every file flushed."""
        if self._appender is not None:
            await self._appender.flush()
        for writer in self._writers.values():
            writer.confirm()
        for extent in self._extents:
            if isinstance(extent, SparseExtent) and id(extent) in self._writers:
                await extent.tables.flush()
        for storage in self.storages():
            await storage.flush()
