r"""The ``vpc`` format driver: VHD images (Virtual PC, Hyper-V, Azure).

Virtual size (QEMU's rule, which imago follows): the CHS geometry of the footer
(cylinders x heads x sectors per track, in 512-byte sectors), except that the footer's
``current_size`` is used when the creator application is one whose tools size disks by it
(``win `` Hyper-V, ``qem2`` qemu-img's ``force_size``, ``d2v `` disk2vhd, ``tap\0``
XenServer, ``CTXS`` XenConverter, ``wa\0\0`` Azure) or when the geometry is the largest
one (65535/16/255, disks over 127 GiB). Disks over 2040 GiB are refused, as QEMU refuses them.

Reads: a fixed image is its file up to the footer; a dynamic image's allocated blocks are read
whole (QEMU ignores their sector bitmaps too: the blocks it allocates are zero-filled), its
unallocated blocks read as zeroes; a differencing image follows each allocated block's sector
bitmap (a set bit: the block's sector, a clear one: the parent's), and its unallocated blocks
read from the parent (QEMU 7.2 reads them as zeroes: imago reads the parent's data).

Writes: fixed images in place; dynamic images allocate blocks at the end of the file
(:mod:`imago_vpc.writing`); differencing images are read-only.
"""

from __future__ import annotations

from typing import Any

from imago import (
    FormatAccess,
    FormatCreateBuilder,
    FormatDriver,
    FormatDriverBuilder,
    ImplicitOpenGate,
    InvalidOptionError,
    MetadataCache,
    ReadOnlyError,
    ShallowMapping,
    Storage,
)

from .create import VpcCreateBuilder
from .footer import FOOTER_SIZE, SECTOR, TYPE_DIFFERENCING, TYPE_FIXED
from .opening import UNALLOCATED, OpenedImage, open_image, read_at
from .writing import BlockAllocator

__all__ = ["Vpc"]


class Vpc(FormatDriver):
    """A VHD image: ``Vpc.builder_path("disk.vhd").open_sync(gate)``.

    Fixed, dynamic and differencing images are read (a differencing image's parent through
    the gate, its UUID checked), fixed and dynamic ones written; new ones are made with
    :meth:`create_builder` (:class:`~imago_vpc.create.VpcCreateBuilder`).
    """

    name = "vpc"
    create_builder_class = VpcCreateBuilder

    def __init__(self, storage: Storage, image: OpenedImage, writable: bool) -> None:
        self._storage = storage
        self._image = image
        self._footer = image.footer
        self._size = image.size
        self._writable = writable
        header = image.header
        self._block_size = header.block_size if header is not None else 0
        self._bitmap_size = header.bitmap_size if header is not None else 0
        self._bitmaps: MetadataCache[int, bytes] | None = None
        self._allocator: BlockAllocator | None = None
        if writable and header is not None:
            assert image.bat is not None
            self._allocator = BlockAllocator(storage, header, image.bat, image.footer, image.footer_at)
        if header is not None and self._footer.disk_type == TYPE_DIFFERENCING:
            self._bitmaps = MetadataCache(
                None,
                self._load_bitmap,
                budget=image.budget,
                entry_size=self._bitmap_size,
                name=f"the block bitmaps of {storage.filename or 'the image'}",
            )

    @classmethod
    async def open_image(cls, builder: FormatDriverBuilder[Vpc], gate: ImplicitOpenGate) -> Vpc:
        """Open the image; a differencing image's parent goes through *gate*."""
        return await open_image(cls, builder, gate)

    @classmethod
    async def create_image(cls, builder: FormatCreateBuilder[Vpc]) -> None:
        """Write a new image as *builder* (a :class:`~imago_vpc.create.VpcCreateBuilder`) says."""
        if not isinstance(builder, VpcCreateBuilder):
            raise InvalidOptionError("builder", f"expected a VpcCreateBuilder, got {type(builder).__name__}")
        await builder.write_image()

    @classmethod
    async def probe(cls, storage: Storage) -> bool:
        """The footer's copy (cookie ``conectix``) at the start of the file: dynamic and differencing images.

        As QEMU, fixed images are not probed (their footer is at the end, after guest data
        that a raw disk's guest could shape into a footer): open them with the format named.
        """
        return storage.size >= FOOTER_SIZE and await read_at(storage, 0, 8) == b"conectix"

    # --- facts ------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The disk's size (the rule is in the module's description)."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether the image was opened for writing."""
        return self._writable

    @property
    def storage(self) -> Storage:
        """The image's file."""
        return self._storage

    @property
    def backing(self) -> FormatAccess | None:
        """A differencing image's parent, if it was opened."""
        return self._image.backing

    def holes_read_as_data(self, storage: Storage) -> bool:
        """A fixed image's file: its holes are zero data, as ``qemu-img map`` shows them."""
        return self._footer.disk_type == TYPE_FIXED and storage is self._storage

    @property
    def uuid(self) -> bytes:
        """The footer's unique id (a differencing child records its parent's)."""
        return self._footer.uuid

    @property
    def subformat(self) -> str:
        """``fixed``, ``dynamic`` or ``differencing``."""
        return self._footer.type_name

    @property
    def creator_app(self) -> bytes:
        r"""The footer's creator application (``qemu``, ``qem2``, ``win ``, ``wa\0\0``, ...)."""
        return self._footer.creator_app

    def info(self) -> dict[str, Any]:
        """Facts under ``qemu-img info --output=json``'s names."""
        info: dict[str, Any] = {"format": "vpc", "virtual-size": self._size}
        if self._footer.disk_type != TYPE_FIXED:
            info["cluster-size"] = self._block_size
        if self._image.parent_name is not None:
            info["backing-filename"] = self._image.parent_name
            info["backing-filename-format"] = "vpc"
        return info

    # --- mappings ---------------------------------------------------------------------------------

    async def _load_bitmap(self, block: int) -> bytes:
        assert self._image.bat is not None
        return await read_at(self._storage, self._image.bat[block] * SECTOR, self._bitmap_size)

    async def get_mapping(self, offset: int, max_length: int) -> tuple[ShallowMapping, int]:
        """Fixed: the file; dynamic: a block's data or zeroes; differencing: by the block's bitmap."""
        if offset >= self._size:
            return ShallowMapping.Eof(), max_length
        end = min(self._size, offset + max_length)
        if self._footer.disk_type == TYPE_FIXED:
            return ShallowMapping.Raw(self._storage, offset, self._writable), end - offset
        bat = self._image.bat
        assert bat is not None
        block_size = self._block_size
        index = offset // block_size
        block_end = min(end, (index + 1) * block_size)
        entry = bat[index]
        if entry == UNALLOCATED:
            stop = block_end
            while stop < end and bat[stop // block_size] == UNALLOCATED:
                stop = min(end, stop + block_size)
            return self._absent(offset), stop - offset
        data = entry * SECTOR + self._bitmap_size
        within = offset - index * block_size
        if self._bitmaps is None:
            return ShallowMapping.Raw(self._storage, data + within, self._writable), block_end - offset
        bitmap = await self._bitmaps.get(index)
        sector = within // SECTOR
        present = _bit(bitmap, sector)
        last = (block_end - index * block_size - 1) // SECTOR
        while sector < last and _bit(bitmap, sector + 1) == present:
            sector += 1
        length = min(block_end, index * block_size + (sector + 1) * SECTOR) - offset
        if present:
            return ShallowMapping.Raw(self._storage, data + within, self._writable), length
        return self._absent(offset), length

    def _absent(self, offset: int) -> ShallowMapping:
        backing = self._image.backing
        if backing is not None:
            return ShallowMapping.Indirect(backing, offset)
        # A dynamic image's unallocated blocks are its zeroes (QEMU maps them present, as zero).
        return ShallowMapping.Zero(self._bitmaps is None)

    # --- writing ----------------------------------------------------------------------------------

    async def ensure_data_mapping(self, offset: int, length: int, overwrite: bool) -> tuple[ShallowMapping, int]:
        """Fixed: the file in place; dynamic: the block, allocated at the end of the file if it was not."""
        if not self._writable:
            raise ReadOnlyError(self._storage.filename or "the image")
        if self._footer.disk_type == TYPE_FIXED:
            return ShallowMapping.Raw(self._storage, offset, True), min(length, self._size - offset)
        assert self._allocator is not None
        block_size = self._block_size
        index = offset // block_size
        within = offset - index * block_size
        at = await self._allocator.block(index, -(-(within + length) // block_size))
        return ShallowMapping.Raw(self._storage, at + self._bitmap_size + within, True), min(
            length, block_size - within, self._size - offset
        )

    async def ensure_zero_mapping(self, offset: int, length: int) -> tuple[int, int]:
        """Dynamic: whole unallocated blocks read as zeroes already (the first run of them is handled)."""
        if self._allocator is None:
            return offset, 0
        return self._allocator.unallocated_run(offset, min(length, self._size - offset))

    async def flush(self) -> None:
        """Everything is written as it happens: the file is flushed."""
        await self._storage.flush()


def _bit(bitmap: bytes, sector: int) -> bool:
    """The bitmap's bit of *sector*: bytes in order, the most significant bit first."""
    return bool(bitmap[sector >> 3] & (0x80 >> (sector & 7)))
