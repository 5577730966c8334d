"""The ``vmdk`` format driver: the facade over the extents, the descriptor's facts and the parent."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from imago import (
    DriverContractError,
    FormatAccess,
    FormatDriver,
    FormatDriverBuilder,
    ImplicitOpenGate,
    ShallowMapping,
    Storage,
)

from .compressed import CompressedReader, split_by_grain
from .descriptor import looks_like_descriptor
from .extents import Extent, RunKind, SparseExtent
from .header import COWD_MAGIC, KDMV_MAGIC
from .opening import OpenedImage, open_image

__all__ = ["Vmdk"]

# What probing reads of a file (QEMU's probe looks at the first 2 KiB too).
_PROBE_BYTES = 2048


class Vmdk(FormatDriver):
    """A VMDK image, opened read-only: ``Vmdk.builder_path("disk.vmdk").open_sync(gate)``.

    Descriptor files (``monolithicFlat``, ``twoGbMaxExtentSparse``/``Flat``, ``vmfs``,
    ``vmfsSparse``) and hosted sparse files (``monolithicSparse``, ``streamOptimized``); extents
    SPARSE, FLAT, VMFS, VMFSSPARSE and ZERO; delta links to a parent image (its CID checked).
    Extent files and the parent are opened through the gate. Writing is not supported yet.
    """

    name = "vmdk"

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

    @classmethod
    async def open_image(cls, builder: FormatDriverBuilder[Vmdk], gate: ImplicitOpenGate) -> Vmdk:
        """Open the image; extent files and the parent go through *gate*."""
        return await open_image(cls, builder, gate)

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
        """Always false: this version reads VMDK images only."""
        return False

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

    @property
    def cid(self) -> int:
        """The content ID (``CID``) the descriptor records."""
        return self._image.cid

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
            "cid": self._image.cid,
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
        if offset >= self._size:
            return ShallowMapping.Eof(), max_length
        start, extent = self._extent_at(offset)
        run = await extent.lookup(offset - start, max_length)
        kind = run.kind
        if kind is RunKind.DATA:
            assert extent.storage is not None
            return ShallowMapping.Raw(extent.storage, run.host_offset, False), run.length
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
